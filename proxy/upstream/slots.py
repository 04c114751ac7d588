"""
Per-account connection slots: the proxy holds at most ``maxConnections``
connections to an account's provider, by protocol, spares included and
counted across every instance that shares a Redis store. A provider that
sees one connection too many refuses it (Gmail's ``[ALERT] Too many
simultaneous connections``) and may lock the account out for a while; a
client refused here (``NO [LIMIT]``, SMTP ``421 4.7.0``) only has to close
another of its clients.

A login takes a slot before it connects and gives it back when its
connection closes, whatever way it ends. At the cap, a spare of the
account is given up first; otherwise the login waits in a short queue,
first come first served per account, bounded in length and in time.

The counting itself is an ``ISlotCounter``: ``LocalSlots`` in this process
(SQLite and in-memory stores), ``proxy.store.RedisSlots`` in a sorted set
per account whose members expire unless their instance's heartbeat renews
them (a killed instance's slots come back within ``expiry`` seconds).
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import TooManyConnections
from ..model import Account, Upstream
from ..presets import presetMaxConnections
from ..store import ISlotCounter

log = Logger(namespace="proxy.upstream")

# A slot that could not be had waits for one freed elsewhere (another
# instance, an expiry): polled, from FIRST_POLL doubling to LAST_POLL.
FIRST_POLL = 0.05
LAST_POLL = 0.4
# Seconds between looks for spares a login on another instance waits for.
SPARE_CHECK = 1.0


@implementer(ISlotCounter)
class LocalSlots:
    """Slots counted in this process only: one instance, SQLite or memory store."""

    shared = False

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}

    def tryAcquire(self, key: str, cap: int, holder: str, now: float) -> Deferred[bool]:
        held = self._held.setdefault(key, set())
        if len(held) >= cap:
            return succeed(False)
        held.add(holder)
        return succeed(True)

    def release(self, key: str, holder: str) -> Deferred[None]:
        held = self._held.get(key)
        if held is not None:
            held.discard(holder)
            if not held:
                del self._held[key]
        return succeed(None)

    def refresh(self, held: list[tuple[str, str]], now: float) -> Deferred[None]:
        return succeed(None)

    def count(self, key: str, now: float) -> Deferred[int]:
        return succeed(len(self._held.get(key, ())))

    def want(self, key: str, seconds: float) -> Deferred[None]:
        # One process: its own spare was given up at once (``giveUpSpare``).
        return succeed(None)

    def wanted(self, keys: list[str]) -> Deferred[list[str]]:
        return succeed([])


@attrs.define(eq=False)
class Slot:
    """
    One upstream connection's place under its account's cap. ``release``
    is idempotent: every way a connection ends may call it.
    """

    keeper: SlotKeeper
    key: str
    holder: str
    protocol: str
    waited: float = 0.0
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.keeper._release(self)


@attrs.define(eq=False)
class _Waiter:
    deferred: Deferred[Slot]
    cap: int
    protocol: str
    started: float
    timer: Any = None


class SlotKeeper:
    """
    :param counter: an ``ISlotCounter``.
    :param clock: ``IReactorTime``.
    :param wait: seconds a login waits for a slot at most.
    :param maxWaiting: logins waiting per account at most; past it, refused
        at once (a client that reconnects in a loop cannot grow a queue).
    :param default: the cap of an account whose server is no preset's and
        that sets none; 0: no cap.
    :ivar giveUpSpare: ``account id -> None``: log out that account's spare
        (its slot comes back when it closes); None: there are no spares.
    :ivar spareAccounts: ``() -> iterable of account ids``: the accounts
        this instance holds a spare of (``checkSpares``).
    :ivar onRefused: ``(account id, protocol, waited seconds) -> None``,
        called for each login refused at the cap (metrics, audit).
    """

    giveUpSpare: Callable[[str], None] | None = None
    spareAccounts: Callable[[], Any] | None = None
    onRefused: Callable[[str, str, float], None] | None = None

    def __init__(
        self,
        counter: Any,
        clock: Any,
        wait: float = 5.0,
        maxWaiting: int = 50,
        default: int = 0,
    ):
        self._counter = counter
        self._clock = clock
        self.wait = wait
        self.maxWaiting = maxWaiting
        self.default = default
        self.instance = uuid.uuid4().hex[:12]
        self._serial = itertools.count(1)
        self._held: dict[str, Slot] = {}
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._busy: set[str] = set()
        self._polls: dict[str, Any] = {}
        self._backoff: dict[str, float] = {}
        # For metrics: logins refused at the cap, by protocol, and by
        # (account, protocol) (as many entries as accounts, at most two each).
        self.refused = {"imap": 0, "smtp": 0}
        self.refusedBy: dict[tuple[str, str], int] = {}

    # -- caps ---------------------------------------------------------------------

    def capFor(self, upstream: Upstream, protocol: str) -> int:
        """The account's cap for ``protocol`` on ``upstream``; 0: none."""
        if upstream.maxConnections is not None:
            return upstream.maxConnections
        preset = presetMaxConnections(protocol, upstream.host)
        return preset if preset is not None else self.default

    # -- figures (metrics) ----------------------------------------------------------

    def inUse(self) -> dict[tuple[str, str], int]:
        """Slots this instance holds, by (account, protocol)."""
        out: dict[tuple[str, str], int] = {}
        for slot in self._held.values():
            account = slot.key.rsplit("/", 1)[0]
            out[(account, slot.protocol)] = out.get((account, slot.protocol), 0) + 1
        return out

    def waiting(self) -> dict[tuple[str, str], int]:
        """Logins waiting for a slot here, by (account, protocol)."""
        out: dict[tuple[str, str], int] = {}
        for key, queue in self._waiting.items():
            if queue:
                account, protocol = key.rsplit("/", 1)
                out[(account, protocol)] = len(queue)
        return out

    # -- taking and giving back -------------------------------------------------------

    async def acquire(
        self, account: Account, protocol: str, upstream: Upstream, wait: bool = True
    ) -> Slot | None:
        """
        A slot for a connection of ``account`` to ``upstream``.

        :param wait: False for a spare: none rather than wait or give one up.
        :return: the slot, or None when the account has no cap (nothing is
            counted), or, with ``wait`` False, when it is at its cap.
        :raises TooManyConnections: at the cap after the wait, or with the
            queue full.
        """
        cap = self.capFor(upstream, protocol)
        if cap <= 0:
            return None
        key = f"{account.id}/{protocol}"
        queue = self._waiting.get(key)
        if not queue:
            # Nobody waits: try at once (never ahead of those who wait).
            holder = self._newHolder()
            now = self._clock.seconds()
            if await self._counter.tryAcquire(key, cap, holder, now):
                return self._hold(key, holder, protocol, 0.0)
        if not wait:
            return None
        if protocol == "imap" and self.giveUpSpare is not None:
            self.giveUpSpare(account.id)
            if self._counter.shared:
                # A spare of another instance: that one gives it up (checkSpares).
                d = self._counter.want(key, self.wait)
                d.addErrback(lambda f: log.warn("asking for spares failed: {e}", e=f.type.__name__))
        queue = self._waiting.setdefault(key, deque())
        if len(queue) >= self.maxWaiting:
            self._refuse(key, protocol, 0.0)
        waiter = _Waiter(Deferred(), cap, protocol, self._clock.seconds())
        # A login given up while it waits (its Deferred cancelled) leaves the queue.
        waiter.deferred = Deferred(lambda _: self._leave(key, waiter))
        waiter.timer = self._clock.callLater(self.wait, self._timedOut, key, waiter)
        queue.append(waiter)
        self._pump(key)
        return await waiter.deferred

    def _newHolder(self) -> str:
        return f"{self.instance}:{next(self._serial)}"

    def _hold(self, key: str, holder: str, protocol: str, waited: float) -> Slot:
        slot = Slot(self, key, holder, protocol, waited)
        self._held[holder] = slot
        return slot

    def _refuse(self, key: str, protocol: str, waited: float) -> None:
        self.refused[protocol] = self.refused.get(protocol, 0) + 1
        account = key.rsplit("/", 1)[0]
        self.refusedBy[(account, protocol)] = self.refusedBy.get((account, protocol), 0) + 1
        log.info(
            "{protocol} login of {account} refused: at its connection cap after {waited:.1f} s",
            protocol=protocol,
            account=account,
            waited=waited,
        )
        if self.onRefused is not None:
            self.onRefused(account, protocol, waited)
        raise TooManyConnections()

    def _timedOut(self, key: str, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()  # stopping: refused before its time
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._tidy(key)
        waited = self._clock.seconds() - waiter.started
        try:
            self._refuse(key, waiter.protocol, waited)
        except TooManyConnections as e:
            waiter.deferred.errback(e)

    def _leave(self, key: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._tidy(key)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def _release(self, slot: Slot) -> None:
        self._held.pop(slot.holder, None)
        d = self._counter.release(slot.key, slot.holder)
        # The store down: the slot expires there (Redis) instead.
        d.addErrback(lambda f: log.warn("giving a slot back failed: {e}", e=f.type.__name__))
        d.addCallback(lambda _: self._pump(slot.key))

    # -- the queue -------------------------------------------------------------------

    def _pump(self, key: str) -> None:
        """Give free slots to the waiters of ``key``, first come first served."""
        queue = self._waiting.get(key)
        if not queue or key in self._busy:
            return
        self._busy.add(key)
        head = queue[0]
        holder = self._newHolder()
        d = self._counter.tryAcquire(key, head.cap, holder, self._clock.seconds())
        d.addCallbacks(self._pumped, self._pumpFailed, (key, head, holder), None, (key,), None)

    def _pumped(self, got: bool, key: str, head: _Waiter, holder: str) -> None:
        self._busy.discard(key)
        queue = self._waiting.get(key)
        if not got:
            self._poll(key)
            return
        if queue is None or not queue or queue[0] is not head:
            # The waiter gave up meanwhile: the slot is the next one's.
            self._counter.release(key, holder).addBoth(lambda _: self._pump(key))
            return
        queue.popleft()
        self._tidy(key)
        self._backoff.pop(key, None)
        if head.timer is not None and head.timer.active():
            head.timer.cancel()
        waited = self._clock.seconds() - head.started
        head.deferred.callback(self._hold(key, holder, head.protocol, waited))
        self._pump(key)

    def _pumpFailed(self, failure: Any, key: str) -> None:
        self._busy.discard(key)
        log.warn("connection slots unavailable: {error}", error=failure.type.__name__)
        self._poll(key)

    def _poll(self, key: str) -> None:
        """Try again later where a slot may be freed out of sight (another instance)."""
        if not self._counter.shared or not self._waiting.get(key) or key in self._polls:
            return
        delay = self._backoff.get(key, FIRST_POLL)
        self._backoff[key] = min(delay * 2, LAST_POLL)
        self._polls[key] = self._clock.callLater(delay, self._polled, key)

    def _polled(self, key: str) -> None:
        del self._polls[key]
        self._pump(key)

    def _tidy(self, key: str) -> None:
        if not self._waiting.get(key):
            self._waiting.pop(key, None)
            self._backoff.pop(key, None)
            poll = self._polls.pop(key, None)
            if poll is not None and poll.active():
                poll.cancel()

    # -- the heartbeat -------------------------------------------------------------------

    def heartbeat(self) -> Deferred[None]:
        """Renew this instance's slots (``TimerService``, well within the expiry)."""
        held = [(s.key, s.holder) for s in self._held.values()]
        if not held:
            return succeed(None)
        d = self._counter.refresh(held, self._clock.seconds())
        d.addErrback(lambda f: log.warn("renewing connection slots failed: {e}", e=f.type.__name__))
        return d

    def checkSpares(self) -> Deferred[None]:
        """
        Give up this instance's spares that a login on another instance
        waits for (``TimerService``, every second or so: well within the wait).
        """
        accounts = list(self.spareAccounts()) if self.spareAccounts is not None else []
        if not accounts or not self._counter.shared or self.giveUpSpare is None:
            return succeed(None)
        giveUp = self.giveUpSpare

        def given(keys: list[str]) -> None:
            for key in keys:
                account = key.rsplit("/", 1)[0]
                log.info("a login elsewhere waits: the spare of {account} goes", account=account)
                giveUp(account)

        d = self._counter.wanted([f"{a}/imap" for a in accounts])
        d.addCallback(given)
        d.addErrback(
            lambda f: log.warn("checking for wanted spares failed: {e}", e=f.type.__name__)
        )
        return d

    def stop(self) -> None:
        """Refuse every waiting login (shutting down)."""
        for key in list(self._waiting):
            for waiter in list(self._waiting.get(key, ())):
                self._timedOut(key, waiter)


async def withSlot(
    keeper: SlotKeeper | None,
    account: Account,
    protocol: str,
    upstream: Upstream,
    connect: Callable[[], Awaitable[Any]],
    wait: bool = True,
) -> Any:
    """
    ``connect`` holding a slot of ``account``'s cap: given back when the
    connection closes (its ``notifyClosed``), or at once if it fails.

    :return: the connected protocol; None, with ``wait`` False, when the
        account is at its cap (no connection made).
    """
    slot = await keeper.acquire(account, protocol, upstream, wait) if keeper is not None else None
    if slot is None and keeper is not None and not wait and keeper.capFor(upstream, protocol) > 0:
        return None
    try:
        proto = await connect()
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    if slot is not None:
        proto.slot = slot
        proto.notifyClosed().addBoth(lambda _: slot.release())
    return proto
