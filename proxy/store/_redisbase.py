"""
The Redis store's connection and life cycle (``RedisStore``'s base class):
opening (and checking the secret key against the store), closing, running as
a service, and sending commands and scripts with a deadline, failures mapped
to ``StoreError`` / ``StoreUnavailable``. The data operations are in
``proxy.store.redis``.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.logger import Logger

from ..encryption import Secrets
from ._errors import KEY_CHECK, MarkerWatch, StoreError, StoreUnavailable, keyMatches, wrongKey
from ._records import newMarker
from ._redisconn import (
    _TRANSIENT,
    _UNAVAILABLE,
    _blockingCommand,
    _RedisProtocol,
    _SentinelRedisProtocol,
    parseRedisURL,
)
from ._redislua import _OPEN
from ._redissentinel import WAIT_MS, SentinelLink, discoverBlocking, sameServer

SCHEMA = "1"


class _RedisStoreBase(Service):
    """
    Connecting to Redis and the store's life cycle; see ``RedisStore`` for
    the parameters.
    """

    log = Logger()
    # Reconnection back-off after an outage, in seconds.
    retryInitialDelay = 0.2
    retryMaxDelay = 2.0

    def __init__(
        self,
        url: str,
        secrets: Secrets,
        reactor: Any = None,
        *,
        timeout: float = 2.0,
        poolSize: int = 3,
    ):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.address = parseRedisURL(url)
        # Where the store is, without credentials: SQLiteStore.path's counterpart.
        self.path = self.address.describe()
        self._secrets = secrets
        self._reactor = reactor
        self.timeout = timeout
        self.poolSize = poolSize
        self._redis: Any = None
        # The sentinels, for a redis+sentinel:// store (made with the connections).
        self._link: SentinelLink | None = None
        self._replicasShort = False
        self._open = False
        self._closed = False
        self._available = True
        self._lastConnectError: str | None = None
        self._pending: set[Deferred[Any]] = set()
        self._marker = MarkerWatch(self.path, "Redis restarted empty?")

    @property
    def secrets(self) -> Secrets:
        return self._secrets

    def key(self, *parts: str) -> str:
        return self.address.prefix + ":".join(parts)

    _key = key

    # -- life cycle -----------------------------------------------------------

    def open(self) -> Deferred[None]:
        """
        Connect, and check the key against the store (creating the check on
        first use).

        :return: Deferred firing when the store is usable; errback
            ``StoreError`` when Redis cannot be reached or the key is wrong.
        """
        if self._closed:
            return fail(StoreError("the store is closed"))
        self._open = True
        return ensureDeferred(self._openAsync())

    async def _openAsync(self) -> None:
        try:
            try:
                stored = await self._eval(_OPEN, [self._key("meta")], self._openArgs())
            except StoreUnavailable:
                why = f": {self._lastConnectError}" if self._lastConnectError else ""
                raise StoreUnavailable(
                    f"the Redis store {self.address.describe()} is unavailable{why}"
                ) from None
            self._checkKey(stored)
        except BaseException:
            self._open = False
            redis, self._redis = self._redis, None
            if redis is not None:
                await redis.disconnect()
            raise

    def openBlocking(self) -> None:
        """
        Check the connection and the key in the calling thread, over a plain
        socket: only before the reactor runs (``twistd`` and the CLI check a
        store before they start). The store is then open; its connections
        are made when it is first used, from the reactor.
        """
        if self._closed:
            raise StoreError("the store is closed")
        command = ["EVAL", _OPEN, "1", self._key("meta"), *self._openArgs()]
        address = self.address
        if address.sentinels:
            host, port = discoverBlocking(address, self.timeout)
            address = attrs.evolve(address, host=host, port=port, sentinels=())
        self._checkKey(_blockingCommand(address, self.timeout, command))
        self._open = True

    def closeBlocking(self) -> None:
        """Undo ``openBlocking`` (no connection is open yet), to open again."""
        if self._redis is None:
            self._open = False

    _closeBlocking = closeBlocking

    def _openArgs(self) -> list[str]:
        """What ``_OPEN`` writes when the store is new: key check, layout, marker."""
        return [self._secrets.encrypt(KEY_CHECK), SCHEMA, newMarker(), repr(time.time())]

    def _checkKey(self, stored: list[Any]) -> None:
        value, schema, marker = stored
        if schema != SCHEMA:
            raise StoreError(
                f"the Redis store {self.address.describe()} has data layout {schema!r}; "
                f"this version of imapproxy knows {SCHEMA!r}"
            )
        if not keyMatches(self._secrets, value):
            raise wrongKey(self.address.describe())
        self._marker.expected = marker

    def checkHealth(self) -> Deferred[None]:
        d = self._call("hget", self._key("meta"), "store_id")
        return d.addCallback(self._marker.check)

    def close(self) -> Deferred[None]:
        """Close the connections; operations still waiting fail with StoreError."""
        if self._closed:
            return succeed(None)
        self._closed = True
        self._open = False
        for d in list(self._pending):
            d.cancel()
        redis, self._redis = self._redis, None
        link, self._link = self._link, None
        closing = []
        if link is not None:
            closing.append(link.close())
        if redis is not None:
            closing.append(redis.disconnect())
        return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        if not self._open:
            self.open().addErrback(self._openFailed)

    def _openFailed(self, failure: Any) -> None:
        self.log.failure("the store could not be opened", failure)
        self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

    # -- talking to Redis ---------------------------------------------------------

    def _client(self) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        if not self._open:
            raise StoreError("the store is not open")
        if self._redis is None:
            self._redis = self._connect()
        return self._redis

    def _connect(self) -> Any:
        a = self.address
        factory = txredisapi.RedisFactory(
            a.describe(),
            a.db or None,
            self.poolSize,
            isLazy=True,
            password=a.password,
            username=a.username,
            replyTimeout=self.timeout,
            # Values are text: "007" must not come back as 7.
            convertNumbers=False,
        )
        factory.protocol = _RedisProtocol
        factory.initialDelay = self.retryInitialDelay
        factory.maxDelay = self.retryMaxDelay
        # Fires only when a connection is refused for good (bad password or
        # database); txredisapi then stops trying, and says why here.
        factory.deferred.addErrback(self._connectFailed)
        if a.sentinels:
            factory.protocol = _SentinelRedisProtocol
            # A master that stays up but is one no more: reconnect (to the new one).
            self._sentinels().watch(lambda: [c.transport.loseConnection() for c in factory.pool])
        factory.startConnecting(self.endpoint())
        return factory.handler

    def _sentinels(self) -> SentinelLink:
        if self._link is None:
            self._link = SentinelLink(self.address, self._reactor, self.timeout)
        return self._link

    def endpoint(self) -> Any:
        """Where a new connection goes: the master the sentinels name now, if any."""
        a = self.address
        if a.sentinels:
            return self._sentinels().endpoint()
        if a.path is not None:
            return UNIXClientEndpoint(self._reactor, a.path, timeout=self.timeout)
        return HostnameEndpoint(self._reactor, a.host or "localhost", a.port, timeout=self.timeout)

    def _connectFailed(self, failure: Any) -> None:
        self._lastConnectError = failure.getErrorMessage()
        self.log.error(
            "the Redis store {where} refused the connection: {why}",
            where=self.address.describe(),
            why=self._lastConnectError,
        )
        # Nothing will connect now: fail what waits for a connection.
        for d in list(self._pending):
            d.cancel()

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        """One command (or script) with a deadline; Redis errors as StoreError."""
        try:
            client = self._client()
        except StoreError as e:
            return fail(e)
        if not self._available and not client._factory.pool:
            # Known down and not reconnected yet: say so at once rather than
            # make every login wait for the timeout.
            return fail(StoreUnavailable("the Redis store is unavailable"))
        d = getattr(client, method)(*args)
        # A little longer than the reply timeout, which also drops a hung
        # connection; this one bounds the wait for a connection too.
        d.addTimeout(self.timeout + 0.5, self._reactor)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d.addCallbacks(self._succeeded, self._failed)

    def _eval(
        self, script: str, keys: list[str], args: list[str], durable: bool = False
    ) -> Deferred[Any]:
        """
        A script (txredisapi runs EVALSHA once a connection has seen it);
        ``durable``: a write that must survive a failover, so it waits (up to
        ``WAIT_MS``) for the URL's ``replicas`` to have it, and says when
        fewer did (the write stands: it is on the master).
        """
        replicas = self.address.replicas
        if not (durable and replicas):
            return self._call("eval", script, keys, args)
        d = self._call("evalWait", script, keys, args, replicas, WAIT_MS)
        return d.addCallback(lambda reply: ensureDeferred(self._waited(reply, replicas)))

    async def _waited(self, reply: tuple[Any, int, tuple[str, int]], replicas: int) -> Any:
        result, acknowledged, where = reply
        short = acknowledged < replicas
        if short and self._link is not None:
            # No replica has it: is that server still the master (a manual
            # failover leaves the old one up, taking writes it will lose)?
            try:
                master = await self._link.discover()
            except Exception:
                master = where
            if not sameServer(master, where):
                raise StoreUnavailable(
                    "the Redis master changed during a write: it may be lost, try again"
                )
        if short and not self._replicasShort:
            self.log.warn(
                "the Redis store {where}: {n} of {replicas} replicas acknowledged a write "
                "within {ms}ms; it is on the master only until they catch up",
                where=self.address.describe(),
                n=acknowledged,
                replicas=replicas,
                ms=WAIT_MS,
            )
        elif not short and self._replicasShort:
            self.log.info(
                "the Redis store {where}: writes reach the replicas again",
                where=self.address.describe(),
            )
        self._replicasShort = short
        return result

    # What the refresh lock and the session bus use (``IRedisAccess``).
    command = _call
    script = _eval

    def _succeeded(self, result: Any) -> Any:
        if not self._available:
            self._available = True
            self.log.info("the Redis store {where} is available", where=self.address.describe())
        return result

    def _failed(self, failure: Any) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        unavailable = failure.check(*_UNAVAILABLE) is not None
        if failure.check(txredisapi.ResponseError):
            message = str(failure.value).strip()
            if message.split(" ", 1)[0] not in _TRANSIENT:
                raise StoreError(f"the Redis store refused a command: {message[:200]}")
            unavailable = True
        if failure.check(txredisapi.InvalidData):
            raise StoreError("a value cannot be stored: it is not valid text")
        if not unavailable and failure.check(txredisapi.RedisError):
            raise StoreError("the Redis store gave an unexpected reply")
        if not unavailable:
            return failure
        if self._available:
            self._available = False
            self.log.warn(
                "the Redis store {where} is unavailable: {why}",
                where=self.address.describe(),
                why=(
                    f"no answer within {self.timeout:g}s"
                    if failure.check(defer.TimeoutError, error.TimeoutError)
                    else failure.getErrorMessage() or failure.type.__name__
                ),
            )
        raise StoreUnavailable("the Redis store is unavailable")
