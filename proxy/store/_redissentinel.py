"""
A Redis store behind Redis Sentinel (``redis+sentinel://`` URLs): parsing
the URL, finding the master through the sentinels (txredisapi's
``Sentinel``), an endpoint that asks them before every connection, so that
the store's pool and the session bus's subscriber reconnect to whichever
server is the master after a failover, and a watch that drops connections
to a server that is no longer the master while it stays up (a manual
failover, a partition that healed).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import parse_qsl, unquote

import txredisapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ._errors import StoreError, StoreUnavailable

log = Logger()

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
# Replicas a write that matters waits for (WAIT), unless the URL says ?replicas=N.
DEFAULT_REPLICAS = 1
# How long such a write waits for them, in milliseconds (then it is logged).
WAIT_MS = 500
# Seconds between asking the sentinels whether the master moved.
WATCH_INTERVAL = 5.0
_PARAMETERS = ("db", "prefix", "replicas", "sentinel_password", "sentinel_username")


def parseSentinelURL(url: str) -> dict[str, Any]:
    """
    ``redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]``
    with ``?prefix=``, ``?replicas=N``, ``?sentinel_password=`` and
    ``?sentinel_username=``: the USER/PASSWORD are the Redis servers' (as in
    ``redis://``), the ``sentinel_*`` ones the sentinels' own, when they
    require one; sentinel PORTs default to 26379.

    :return: the ``RedisAddress`` fields it gives.
    :raises StoreError: for anything else.
    """
    scheme, sep, rest = url.partition("://")
    if scheme != SCHEME or not sep:
        raise StoreError(f"not a Redis Sentinel store URL (use {SCHEME}://)")
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise StoreError("the Redis Sentinel store URL has a #fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    fields: dict[str, Any] = {"host": None}
    if at:
        user, colon, password = userinfo.partition(":")
        if not colon:
            raise StoreError("give the Redis password as redis+sentinel://:password@host/")
        fields["username"] = unquote(user) or None
        fields["password"] = unquote(password)
    fields["sentinels"] = tuple(_hostPort(h) for h in hostlist.split(","))
    names = path.split("/")
    if not names[0] or len(names) > 2 or (len(names) == 2 and not names[1]):
        raise StoreError(f"the Redis Sentinel store URL names no service: {SCHEME}://HOST/SERVICE")
    fields["service"] = unquote(names[0])
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _PARAMETERS or name in params:
            raise StoreError(f"the Redis store URL has an unknown or repeated parameter {name!r}")
        params[name] = value
    dbText = names[1] if len(names) == 2 else None
    if "db" in params:
        if dbText is not None:
            raise StoreError("the Redis store URL gives the database twice")
        dbText = params["db"]
    fields["db"] = _number(dbText, "database") if dbText is not None else 0
    replicas = params.get("replicas")
    fields["replicas"] = DEFAULT_REPLICAS if replicas is None else _number(replicas, "replicas")
    fields["sentinelPassword"] = params.get("sentinel_password") or None
    fields["sentinelUsername"] = params.get("sentinel_username") or None
    if "prefix" in params:
        fields["prefix"] = params["prefix"]
    return fields


def _number(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise StoreError(f"the Redis {what} must be a number, not {text[:20]!r}")
    return int(text)


def _hostPort(text: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise StoreError(f"the Redis Sentinel store URL has a bad address {text[:60]!r}")
        port = port[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host:
        raise StoreError("the Redis Sentinel store URL has an empty sentinel address")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not port.isascii() or not 0 < int(port) < 65536:
        raise StoreError(f"the Redis Sentinel store URL has a bad port {port[:10]!r}")
    return host, int(port)


def describeSentinels(address: Any) -> str:
    """The URL without credentials, for messages and logs."""
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in address.sentinels)
    return f"{SCHEME}://{hosts}/{address.service}/{address.db}"


# -- finding the master ----------------------------------------------------------------


class SentinelLink:
    """
    The sentinels of one store, asked where its master is: before every
    new connection (``endpoint``), and every ``WATCH_INTERVAL`` seconds while
    ``watch`` runs, which calls ``moved()`` when the answer changes.

    :param address: a ``RedisAddress`` with ``sentinels``.
    :param timeout: seconds to wait for the sentinels' answer, and to connect.
    """

    def __init__(self, address: Any, reactor: Any, timeout: float):
        self.address = address
        self._reactor = reactor
        self.timeout = timeout
        self._sentinel: Any = None
        self.master: tuple[str, int] | None = None
        self._watch: LoopingCall | None = None
        self._moved: list[Any] = []
        # Questions to the sentinels still out (cancelled by close).
        self._asking: set[Deferred[Any]] = set()
        self._closed = False

    def _manager(self) -> Any:
        if self._sentinel is None:
            a = self.address
            self._sentinel = txredisapi.Sentinel(
                list(a.sentinels),
                password=a.sentinelPassword,
                username=a.sentinelUsername,
                replyTimeout=self.timeout,
                connectTimeout=self.timeout,
                convertNumbers=False,
            )
        return self._sentinel

    def discover(self) -> Deferred[tuple[str, int]]:
        """
        The master's (host, port) as the first sentinel to answer says (one
        that sees it down, or as a replica, does not count); ``StoreUnavailable``
        when none has within ``timeout``.
        """
        if self._closed:
            return fail(StoreUnavailable("the store is closed"))
        manager = self._manager()
        result: Deferred[tuple[str, int]] = Deferred()
        asked = [c.sentinel_masters() for c in manager.sentinels]
        left = len(asked)

        def answered(masters: Any) -> None:
            state = masters.get(self.address.service) if isinstance(masters, dict) else None
            if not result.called and state and manager.check_master_state(state):
                result.callback((state["ip"], state["port"]))

        def done(_: Any) -> None:
            nonlocal left
            left -= 1
            if not left and not result.called:
                result.errback(txredisapi.MasterNotFoundError())

        for d in asked:
            self._asking.add(d)
            d.addTimeout(self.timeout, self._reactor)
            d.addCallback(answered).addErrback(lambda _: None)
            d.addBoth(lambda _, d=d: self._asking.discard(d)).addCallback(done)
        result.addCallbacks(self._found, self._notFound)
        return result

    def _found(self, where: Any) -> tuple[str, int]:
        host, port = str(where[0]), int(where[1])
        if self.master is not None and self.master != (host, port):
            log.warn(
                "Redis Sentinel: the master of {service} moved from {old} to {new}",
                service=self.address.service,
                old="%s:%d" % self.master,
                new=f"{host}:{port}",
            )
            for moved in list(self._moved):
                moved()
        self.master = (host, port)
        return host, port

    def _notFound(self, failure: Any) -> Any:
        if failure.check(txredisapi.MasterNotFoundError):
            raise StoreUnavailable(
                f"no sentinel of {describeSentinels(self.address)} knows a live master"
            )
        return failure

    def endpoint(self) -> IStreamClientEndpoint:
        return _MasterEndpoint(self)

    def watch(self, moved: Any) -> None:
        """Call ``moved()`` when the sentinels name another master."""
        self._moved.append(moved)
        if self._watch is None:
            self._watch = LoopingCall(self._check)
            self._watch.clock = self._reactor
            self._watch.start(WATCH_INTERVAL, now=False).addErrback(lambda _: None)

    def _check(self) -> None:
        self.discover().addErrback(lambda _: None)

    def close(self) -> Deferred[Any]:
        self._closed = True
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._moved = []
        for d in list(self._asking):
            d.cancel()
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is None:
            return succeed(None)
        return sentinel.disconnect()  # type: ignore[no-any-return]


@implementer(IStreamClientEndpoint)
class _MasterEndpoint:
    """Connects to the master the sentinels name at the time of connecting."""

    def __init__(self, link: SentinelLink):
        self._link = link

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        link = self._link

        def connect(where: tuple[str, int]) -> Deferred[Any]:
            host, port = where
            endpoint = HostnameEndpoint(link._reactor, host, port, timeout=link.timeout)
            return endpoint.connect(protocolFactory)  # type: ignore[no-any-return]

        return link.discover().addCallback(connect)


def isDemoted(reply: Any) -> bool:
    """
    Whether ``reply`` is the error a replica gives for a write, or a master
    that lost its replicas (``min-replicas-to-write``).
    """
    return isinstance(reply, txredisapi.ResponseError) and str(reply).startswith(
        ("READONLY", "NOREPLICAS")
    )


def sameServer(named: tuple[str, int], connected: tuple[str, int]) -> bool:
    """
    Whether the sentinels' ``named`` master is the server a connection
    reached (its peer address); a name that is not an address (Sentinel's
    ``announce-hostnames``) is judged by the port alone.
    """
    try:
        ipaddress.ip_address(named[0])
    except ValueError:
        return named[1] == connected[1]
    return ipaddress.ip_address(named[0]) == _address(connected[0]) and named[1] == connected[1]


def _address(host: str) -> Any:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# -- before the reactor runs -------------------------------------------------------------


def discoverBlocking(address: Any, timeout: float) -> tuple[str, int]:
    """
    The master's address from the first sentinel that answers, over plain
    sockets (``RedisStore.openBlocking``).

    :raises StoreUnavailable: when none answers with an address.
    """
    from ._redisconn import _encode, _ErrorReply, _readReply

    commands: list[list[str]] = []
    if address.sentinelPassword is not None:
        user = [address.sentinelUsername] if address.sentinelUsername else []
        commands.append(["AUTH", *user, address.sentinelPassword])
    commands.append(["SENTINEL", "GET-MASTER-ADDR-BY-NAME", address.service])
    why = "no sentinel answered"
    for host, port in address.sentinels:
        try:
            with socket.create_connection((host, port), timeout) as sock:
                with sock.makefile("rb") as replies:
                    sock.sendall(b"".join(_encode(c) for c in commands))
                    results = [_readReply(replies) for _ in commands]
        except (OSError, ValueError) as e:
            why = f"{host}:{port}: {e}"
            continue
        error = next((r for r in results if isinstance(r, _ErrorReply)), None)
        if error is not None:
            why = f"{host}:{port} refused: {str(error)[:200]}"
            continue
        reply = results[-1]
        if isinstance(reply, list) and len(reply) == 2:
            return str(reply[0]), int(reply[1])
        why = f"{host}:{port} knows no master named {address.service!r}"
    raise StoreUnavailable(f"the Redis store {describeSentinels(address)} is unavailable: {why}")
