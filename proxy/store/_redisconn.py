"""
Reaching Redis, for the Redis store (``proxy.store.redis``): where it is
(``RedisAddress``, ``parseRedisURL``; behind Sentinel, ``_redissentinel``),
which failures mean "unavailable, retry" rather than "refused", txredisapi's
protocol made to keep reconnecting, and a small blocking client for
``RedisStore.openBlocking``.
"""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import txredisapi
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks

from ._errors import StoreError, StoreUnavailable
from ._redissentinel import SCHEME as SENTINEL_SCHEME
from ._redissentinel import describeSentinels, isDemoted, parseSentinelURL

__all__ = ["DEFAULT_PREFIX", "RedisAddress", "StoreUnavailable", "parseRedisURL"]

DEFAULT_PREFIX = "imapproxy:"


# -- addresses ----------------------------------------------------------------


@attrs.frozen
class RedisAddress:
    """
    Where the store lives: ``path`` (a Unix socket), ``host``/``port``, or
    the master of ``service`` as the ``sentinels`` say (``host`` None);
    writes that matter then wait for ``replicas`` replicas.
    """

    host: str | None = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    replicas: int = 0
    sentinelUsername: str | None = None
    sentinelPassword: str | None = attrs.field(default=None, repr=False)

    def describe(self) -> str:
        """The URL without its credentials: safe for messages and logs."""
        if self.sentinels:
            return describeSentinels(self)
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """
    ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix:///path/to/socket[?db=N]``; both take ``?prefix=`` (the key
    prefix), and a Unix socket ``?password=`` (and ``?username=``); or
    ``redis+sentinel://…`` (``parseSentinelURL``).

    :raises StoreError: for anything else.
    """
    if url.startswith(SENTINEL_SCHEME + ":"):
        return RedisAddress(**parseSentinelURL(url))
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "unix"):
        raise StoreError(
            f"not a Redis store URL: scheme {parts.scheme!r} "
            "(use redis://, unix:// or redis+sentinel://)"
        )
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("db", "prefix", "password", "username") or name in query:
            raise StoreError(f"the Redis store URL has an unknown or repeated parameter {name!r}")
        query[name] = value
    dbText = query.get("db")
    if parts.scheme == "redis":
        if "password" in query or "username" in query:
            raise StoreError("give the Redis password as redis://:password@host/")
        try:
            port = parts.port or 6379
        except ValueError:
            raise StoreError("the Redis store URL has a bad port") from None
        path = parts.path.strip("/")
        if path:
            if dbText is not None:
                raise StoreError("the Redis store URL gives the database twice")
            dbText = path
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        address = RedisAddress(
            host=parts.hostname or "localhost", port=port, username=username, password=password
        )
    else:
        if parts.netloc:
            raise StoreError("a unix:// store URL names a socket path: unix:///path/to/socket")
        if not parts.path:
            raise StoreError("the unix:// store URL names no socket")
        address = RedisAddress(
            host=None,
            path=unquote(parts.path),
            username=query.get("username") or None,
            password=query.get("password") or None,
        )
    db = 0
    if dbText is not None:
        if not dbText.isdigit() or not dbText.isascii():
            raise StoreError(f"the Redis database must be a number, not {dbText!r}")
        db = int(dbText)
    return attrs.evolve(address, db=db, prefix=query.get("prefix", DEFAULT_PREFIX))


# -- failures ----------------------------------------------------------------------

_UNAVAILABLE = (
    defer.CancelledError,
    defer.TimeoutError,
    txredisapi.ConnectionError,
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
)
# Redis error replies that mean "not now" rather than "never".
_TRANSIENT = (
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "READONLY",
    "NOREPLICAS",
    "NOAUTH",
)


# -- the asynchronous client ---------------------------------------------------------


class _RedisProtocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol, except that a login or SELECT that gets no answer
    (Redis hung, or the connection lost) is retried by reconnecting, where
    txredisapi would stop reconnecting for good. A refusal (wrong password, no
    such database) still stops it.
    """

    _waiting_for_connect: list[Deferred[Any]]

    @inlineCallbacks
    def connectionMade(self) -> Generator[Deferred[Any], Any, None]:
        try:
            if self.password is not None:
                yield self.auth(self.password, self.username)
            if not (yield self.admitted()):
                self.transport.abortConnection()
                return
            if self.dbid is not None:
                yield self.select(self.dbid)
        except txredisapi.ResponseError as e:
            if str(e).split(" ", 1)[0] not in _TRANSIENT:
                self.factory.stopTrying()
                self.transport.loseConnection()
                self.factory.connectionError(f"could not log in or select the database: {e}")
                return
            self.transport.abortConnection()
            return
        except Exception:
            self.transport.abortConnection()
            return
        self.connected = 1
        self._ready = True
        waiting, self._waiting_for_connect = self._waiting_for_connect, []
        for d in waiting:
            d.callback(self)

    def admitted(self) -> Deferred[bool]:
        """Whether this server, logged in to, is one to use (any, here)."""
        return defer.succeed(True)

    def evalWait(
        self, script: str, keys: list[str], args: list[str], replicas: int, ms: int
    ) -> Deferred[tuple[Any, int, tuple[str, int]]]:
        """
        A script, then ``WAIT replicas ms`` on this same connection (WAIT
        counts the replicas that have this connection's writes).

        :return: Deferred with the script's reply, the replicas that
            acknowledged, and the server's (host, port).
        """
        peer = self.transport.getPeer()
        where = (str(getattr(peer, "host", "")), int(getattr(peer, "port", 0)))

        def wait(reply: Any) -> Deferred[tuple[Any, int, tuple[str, int]]]:
            d = self.execute_command("WAIT", replicas, ms)
            return d.addCallback(lambda n: (reply, int(n), where))  # type: ignore[no-any-return]

        return self.eval(script, keys, args).addCallback(wait)  # type: ignore[no-any-return]


class _SentinelRedisProtocol(_RedisProtocol):
    """
    A connection to the master the sentinels named: used only once the
    server says (ROLE) that it is the master, and dropped when it answers a
    write with READONLY (it has become a replica) or NOREPLICAS (a master
    cut off from its replicas, with ``min-replicas-to-write``), so that the
    next connection asks the sentinels again.
    """

    @inlineCallbacks
    def admitted(self) -> Generator[Deferred[Any], Any, bool]:
        """Only the master: a server the sentinels named may have been demoted since."""
        role = yield self.role()
        return bool(role) and role[0] == "master"

    def replyReceived(self, reply: Any) -> None:
        super().replyReceived(reply)
        if isDemoted(reply):
            self.transport.loseConnection()


# -- a blocking client, for openBlocking only -------------------------------------------


def _blockingCommand(address: RedisAddress, timeout: float, command: list[str]) -> Any:
    """
    Run one command over a fresh socket (after AUTH and SELECT), blocking.

    :raises StoreError: when Redis cannot be reached or answers with an error.
    """
    where = address.describe()
    commands: list[list[str]] = []
    if address.password is not None:
        auth = [address.username] if address.username else []
        commands.append(["AUTH", *auth, address.password])
    commands += [["SELECT", str(address.db)], command]
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address.path)
        else:
            sock = socket.create_connection((address.host, address.port), timeout)
        with sock, sock.makefile("rb") as replies:
            sock.sendall(b"".join(_encode(c) for c in commands))
            results = [_readReply(replies) for _ in commands]
    except (OSError, ValueError) as e:
        raise StoreUnavailable(f"the Redis store {where} is unavailable: {e}") from None
    for result in results:
        if isinstance(result, _ErrorReply):
            raise StoreError(f"the Redis store {where} refused: {str(result)[:200]}")
    return results[-1]


class _ErrorReply(str):
    pass


def _encode(args: list[str]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


# What the blocking client accepts from the server in one reply: more is refused
# (ValueError, so StoreUnavailable) rather than read into memory. openBlocking's
# replies are a few short strings.
MAX_REPLY_BYTES = 1024 * 1024  # of string data, in all
MAX_REPLY_ELEMENTS = 10_000  # of array elements, in all
MAX_REPLY_DEPTH = 4  # arrays within arrays
MAX_REPLY_LINE = 64 * 1024  # a status, error, integer or length line


def _readReply(f: Any) -> Any:
    """
    Read one reply (RESP2) from the binary file ``f``.

    :raises ValueError: when the connection closes, the reply is malformed, or
        it is larger or deeper than the limits above.
    """
    return _ReplyReader(f).read(0)


class _ReplyReader:
    """One reply's reader, and what it may still read."""

    def __init__(self, f: Any):
        self.f = f
        self.bytesLeft = MAX_REPLY_BYTES
        self.elementsLeft = MAX_REPLY_ELEMENTS

    def read(self, depth: int) -> Any:
        line = self.f.readline(MAX_REPLY_LINE + 2)
        if not line.endswith(b"\r\n"):
            if len(line) >= MAX_REPLY_LINE + 2:
                raise ValueError("a reply line is too long")
            raise ValueError("the connection was closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode("utf-8")
        if kind == b"-":
            return _ErrorReply(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            if n > self.bytesLeft:
                raise ValueError(f"a reply is too long ({n} bytes)")
            self.bytesLeft -= n
            data = self.f.read(n + 2)
            if len(data) != n + 2:
                raise ValueError("the connection was closed")
            return data[:-2].decode("utf-8")
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            if depth >= MAX_REPLY_DEPTH:
                raise ValueError("a reply is nested too deeply")
            if n > self.elementsLeft:
                raise ValueError(f"a reply has too many elements ({n})")
            self.elementsLeft -= n
            return [self.read(depth + 1) for _ in range(n)]
        raise ValueError(f"not a Redis reply: {line[:20]!r}")
