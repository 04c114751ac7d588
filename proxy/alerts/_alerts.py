"""
What the rest of the proxy calls when something worth an alert happens: an
account changed state, a token was revoked. Each call returns at once (the
delivery is the receivers' business, from the reactor) and never raises.

Once per cluster: a state change is sent by the instance whose store update
changed it (``setAccountState`` answers the state it replaced, atomically),
and, as a belt, each event id is claimed in Redis (``SET NX`` with a TTL)
before it is queued, so that an event two instances both produce (a token
revoked by two requests at once has one id) goes out once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.logger import Logger

from ._deliver import Receiver
from ._event import Event, accountEvent, tokenEvent

log = Logger(namespace="proxy.alerts")

# Seconds an event id stays claimed: longer than any delivery is retried.
CLAIM_TTL = 24 * 3600

_CLAIM = "return redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) and 1 or 0"


def redisClaim(store: Any) -> Callable[[str], Awaitable[bool]]:
    """
    :param store: an ``IRedisAccess`` (the Redis store).
    :return: ``claim(eventId)``, True for the first instance to ask.
    """

    async def claim(eventId: str) -> bool:
        reply = await store.script(_CLAIM, [store.key("webhook-event", eventId)], [str(CLAIM_TTL)])
        return int(reply) == 1

    return claim


class Alerts:
    """
    :param receivers: one ``Receiver`` per ``--webhook``; none: every call
        is a no-op.
    :param clock: ``IReactorTime``.
    :param claim: ``claim(eventId) -> Awaitable[bool]`` with a shared store,
        else None.
    :param counters: ``Counters`` (the metrics) or None.
    """

    def __init__(
        self,
        receivers: Iterable[Receiver] = (),
        clock: Any = None,
        claim: Callable[[str], Awaitable[bool]] | None = None,
        counters: Any = None,
    ):
        self.receivers = list(receivers)
        self._clock = clock
        self._claim = claim
        self.counters = counters
        self._emitting: set[Deferred[None]] = set()

    def __bool__(self) -> bool:
        return bool(self.receivers)

    def depth(self) -> int:
        """Events waiting, all receivers together (the queue gauge)."""
        return sum(len(r) for r in self.receivers)

    def accountState(self, account: str, old: str | None, new: str, reason: str) -> None:
        """An account went from ``old`` to ``new`` (``reason``: a fixed code)."""
        if self and old is not None:
            event = accountEvent(account, old, new, reason, self._clock.seconds())
            if event is not None:
                self.emit(event)

    def tokenRevoked(self, tokenId: str, account: str | None, reason: str, actor: str) -> None:
        if self:
            self.emit(tokenEvent(tokenId, account, reason, actor, self._clock.seconds()))

    def changed(
        self, update: Deferred[str | None], account: str, new: str, reason: str
    ) -> Deferred[str | None]:
        """
        After a store's ``setAccountState(account, new, …)``: an event when
        this update is the one that changed the state.

        :param update: its Deferred (the state it replaced, or None).
        """

        def check(old: str | None) -> str | None:
            if old is not None and old != new:
                self.accountState(account, old, new, reason)
            return old

        return update.addCallback(check)

    def emit(self, event: Event) -> None:
        """Fire and forget: claim, count and queue ``event``."""
        d = ensureDeferred(self._emit(event))
        d.addErrback(lambda f: log.failure("webhook event {id}", f, id=event.id))
        self._emitting.add(d)
        d.addBoth(lambda _: self._emitting.discard(d))

    async def settle(self, timeout: float) -> int:
        """
        For a short-lived process (the admin command): wait until every
        event is delivered or given up, at most ``timeout`` seconds, then
        stop.

        :return: how many deliveries were still waiting (then lost).
        """
        waiting = [*self._emitting]
        try:
            await gatherResults(waiting, consumeErrors=True).addTimeout(timeout, self._clock)
            idle = [r.whenIdle() for r in self.receivers]
            await gatherResults(idle, consumeErrors=True).addTimeout(timeout, self._clock)
        except Exception:
            pass  # what is left is counted below
        left = self.depth()
        self.stop()
        return left

    async def _emit(self, event: Event) -> None:
        if self._claim is not None:
            try:
                first = await self._claim(event.id)
            except Exception as e:
                # At least once: a store that cannot say is no reason to stay quiet.
                log.warn(
                    "webhook event {id}: the claim failed ({error}), sent anyway",
                    id=event.id,
                    error=type(e).__name__,
                )
                first = True
            if not first:
                log.info("webhook event {id} is another instance's", id=event.id)
                return
        if self.counters is not None:
            self.counters.event(event.type)
        for receiver in self.receivers:
            receiver.add(event)

    def stop(self) -> None:
        for receiver in self.receivers:
            receiver.stop()


def stateChanged(admin: Any, account: str, old: str | None, new: str, reason: str) -> None:
    """For code that holds an ``Admin`` (onboarding): an event if it alerts."""
    alerts = getattr(admin, "alerts", None)
    if alerts is not None:
        alerts.accountState(account, old, new, reason)


class AlertsService(Service):
    """Stops the deliveries (and their timers and connections) at shutdown."""

    def __init__(self, alerts: Alerts, pool: Any = None):
        self.alerts = alerts
        self._pool = pool

    def stopService(self) -> Any:
        super().stopService()
        self.alerts.stop()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None
