"""
What several proxy instances sharing one Redis store coordinate through it:

- ``RefreshLock``: one OAuth2 refresh per account at a time across instances,
  a lease with an expiry that its holder renews while its request is out, so a
  holder that crashed blocks the others for one lease at most.
- ``SessionBus``: requests to close live sessions (a token revoked with
  ``disconnect``, an account deleted) reach every instance. Each request is
  appended to a short capped stream and announced with PUBLISH; an instance
  whose subscription was lost reads what it missed from the stream when it
  subscribes again, so a Redis hiccup does not leave a revoked session open.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ._interfaces import IRedisAccess

log = Logger()

# -- the refresh lock -----------------------------------------------------------------

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RefreshLock:
    """
    :param store: the ``RedisStore`` (its connections and key prefix).
    """

    def __init__(self, store: IRedisAccess):
        self._store = store

    def _lockKey(self, accountId: str) -> str:
        return str(self._store.key("lock", "refresh", accountId))

    def acquire(self, accountId: str, ttl: float) -> Deferred[str | None]:
        """:return: the lease (to renew and release it), or None when held elsewhere."""
        lease = secrets.token_hex(16)
        # SET key value NX PX ttl (txredisapi: expire, pexpire, only_if_not_exists).
        d = self._store.command("set", self._lockKey(accountId), lease, None, _ms(ttl), True)
        return d.addCallback(lambda ok: lease if ok else None)

    def renew(self, accountId: str, lease: str, ttl: float) -> Deferred[bool]:
        """:return: whether the lease was still ours."""
        d = self._store.script(_RENEW, [self._lockKey(accountId)], [lease, str(_ms(ttl))])
        return d.addCallback(lambda n: int(n) == 1)

    def release(self, accountId: str, lease: str) -> Deferred[bool]:
        d = self._store.script(_RELEASE, [self._lockKey(accountId)], [lease])
        return d.addCallback(lambda n: int(n) == 1)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


# -- the session bus ------------------------------------------------------------------

# Append a close request to the capped stream and announce it; the stream
# expires when nobody has written to it for a day.
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], 86400000)
local n = redis.call('PUBLISH', ARGV[3], id .. ' ' .. ARGV[2])
return {id, n}
"""

STREAM_LENGTH = 1000
# Bound on a close request's body: two ids and an instance name.
MAX_MESSAGE = 4096


class SessionBus(Service):
    """
    :param store: the ``RedisStore``.
    :param close: ``(account, tokenId) -> int``: closes this instance's
        matching sessions (``SessionRegistry.close``).
    :param ping: seconds between PINGs on the subscription, which find a
        connection that died quietly; it is dropped and made again.
    :param end: ``(sessionId) -> bool``: ends one session of this instance
        (``SessionRegistry.end``), for ``publish(session=)``.
    """

    retryInitialDelay = 0.2
    retryMaxDelay = 2.0

    def __init__(
        self,
        store: IRedisAccess,
        close: Callable[[str | None, str | None], int],
        reactor: Any,
        ping: float = 5.0,
        end: Callable[[str], bool] | None = None,
    ):
        self._store = store
        self._close = close
        self._end = end
        self._reactor = reactor
        self._ping = ping
        self.instance = secrets.token_hex(8)
        a = store.address
        # PUBLISH is not scoped by database: the channel names it.
        self.channel = f"{a.prefix}{a.db}:sessions"
        self.stream = str(store.key("sessions", "closes"))
        self._last: tuple[int, int] | None = None
        self._service: ClientService | None = None
        self._subscribed = False
        # Messages that arrive while catching up, applied after it.
        self._held: list[str] | None = None

    # -- sending --------------------------------------------------------------

    def publish(
        self, account: str | None = None, tokenId: str | None = None, session: str | None = None
    ) -> Deferred[int]:
        """
        Ask every other instance to close the matching sessions, or to end
        the one session ``session`` (its owner does, the others ignore it).

        :return: Deferred firing with how many instances were listening.
        """
        request = {"from": self.instance, "account": account, "token": tokenId}
        if session is not None:
            request["session"] = session
        body = json.dumps(request)
        d = self._store.script(_PUBLISH, [self.stream], [str(STREAM_LENGTH), body, self.channel])
        return d.addCallback(lambda reply: max(int(reply[1]) - 1, 0))

    # -- receiving ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(lambda: _Subscriber(self))
        factory.noisy = False
        self._service = ClientService(
            self._store.endpoint(),
            factory,
            retryPolicy=backoffPolicy(self.retryInitialDelay, self.retryMaxDelay),
            clock=self._reactor,
        )
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        service, self._service = self._service, None
        if service is None:
            return succeed(None)
        return service.stopService()  # type: ignore[no-any-return]

    @inlineCallbacks
    def _caughtUp(self) -> Any:
        """
        Subscribed: apply what was published while this instance was not
        (read over the store's connections: a subscribed one may not XRANGE),
        then what arrived meanwhile.
        """
        self._held = []
        try:
            if self._last is None:
                newest = yield self._store.command(
                    "execute_command", "XREVRANGE", self.stream, "+", "-", "COUNT", "1"
                )
                self._last = _streamId(newest[0][0]) if newest else (0, 0)
            else:
                start = "(%d-%d" % self._last
                missed = yield self._store.command(
                    "execute_command", "XRANGE", self.stream, start, "+", "COUNT", "10000"
                )
                for entry in missed or []:
                    fields = entry[1]
                    self._apply(_streamId(entry[0]), fields[1] if len(fields) >= 2 else "")
        finally:
            held, self._held = self._held, None
        for message in held or []:
            self._message(message)
        if not self._subscribed:
            self._subscribed = True
            log.info("listening for session closes on {channel}", channel=self.channel)

    def _message(self, message: str) -> None:
        if self._held is not None:
            if len(self._held) < STREAM_LENGTH:
                self._held.append(message)
            return
        head, _, body = message.partition(" ")
        try:
            entry = _streamId(head)
        except ValueError:
            log.warn("ignored a malformed session close message")
            return
        self._apply(entry, body)

    def _apply(self, entry: tuple[int, int], body: str) -> None:
        if self._last is not None and entry <= self._last:
            return
        try:
            request = json.loads(body[:MAX_MESSAGE])
            origin, account, token = request["from"], request["account"], request["token"]
            session = request.get("session")
            if not all(v is None or isinstance(v, str) for v in (account, token, session)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            # Not ours: it does not move the catch-up position either.
            log.warn("ignored a malformed session close request")
            return
        self._last = entry
        if origin == self.instance:
            return
        if session is not None:
            if self._end is not None and self._end(session):
                log.info("ended session {id} at the request of instance {o}", id=session, o=origin)
            return
        if account is None and token is None:
            return
        n = self._close(account, token)
        if n:
            log.info("closed {n} sessions at the request of instance {origin}", n=n, origin=origin)

    def _lost(self) -> None:
        if self._subscribed and self.running:
            self._subscribed = False
            log.warn(
                "lost the session close subscription on {channel}; reconnecting",
                channel=self.channel,
            )


def _streamId(value: Any) -> tuple[int, int]:
    ms, dash, seq = str(value).partition("-")
    if not (dash and ms.isdigit() and seq.isdigit()):
        raise ValueError(f"not a stream id: {str(value)[:40]!r}")
    return int(ms), int(seq)


class _Subscriber(txredisapi.SubscriberProtocol):
    """One subscription connection: logs in, subscribes, catches up, pings."""

    def __init__(self, bus: SessionBus):
        a = bus._store.address
        super().__init__(
            password=a.password,
            username=a.username,
            replyTimeout=bus._store.timeout,
            convertNumbers=False,
        )
        self.bus = bus
        self._pinger: LoopingCall | None = None

    @inlineCallbacks
    def connectionMade(self) -> Any:
        # txredisapi's own connectionMade needs its factory; this one logs in
        # and subscribes itself, and any failure just drops the connection
        # (the ClientService makes another).
        self.connected = 1
        self._ready = True
        try:
            if self.password is not None:
                yield self.auth(self.password, self.username)
            yield self.subscribe(self.bus.channel)
            yield self.bus._caughtUp()
        except Exception as e:
            log.warn("subscribing to session closes failed: {why}", why=str(e)[:200])
            self.transport.abortConnection()
            return
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.bus._reactor
        self._pinger.start(self.bus._ping, now=False).addErrback(lambda _: None)

    def _ping(self) -> Any:
        d = self.execute_command("PING")
        d.addTimeout(self.bus._store.timeout, self.bus._reactor)
        return d.addErrback(lambda _: self.transport.abortConnection())

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        self.bus._message(str(message)[: MAX_MESSAGE + 64])

    def connectionLost(self, why: Any) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        super().connectionLost(why)
        self.bus._lost()
