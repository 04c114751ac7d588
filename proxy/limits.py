"""
Connection limits for the front doors (IMAP, SMTP submission, the HTTP API),
in the spirit of Dovecot's login limits and HAProxy's ``maxconn``: whoever
opens connections without logging in can hold only so many, from one
address and in all, so that one client can neither lock others out nor run
the process out of files.

- Connections not yet logged in (pre-auth) are capped per client address
  (IPv6: per /64, which one host or site gets) and in all. A connection past
  its address's cap is refused at once; past the total, the oldest pre-auth
  connection is dropped to admit the new one, as Dovecot's login processes
  do. A logged-in session no longer counts (``loggedIn``).
- All connections together, logged in or not, are capped by what the
  open-files limit leaves room for; past it a new one is refused unless a
  pre-auth one can be dropped.
- TLS handshakes under way are capped in all (each holds ~60 KiB of OpenSSL
  state until it ends) and each gets a short deadline; past the cap the
  oldest handshake is dropped.

The address is the one the protocol sees: behind a ``haproxy:`` listener,
the client's from the PROXY header, since this wrapper starts only after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ipaddress
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IHandshakeListener, INegotiated, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import Interface, directlyProvides, implementer, providedBy

log = Logger()


@attrs.frozen
class Limits:
    """
    :ivar maxPreauth: pre-auth connections in all.
    :ivar maxPreauthPerAddress: pre-auth connections from one address.
    :ivar maxHandshakes: TLS handshakes under way in all.
    :ivar handshakeTimeout: seconds a TLS handshake may take.
    :ivar maxOpen: connections in all, logged in or not (None: no cap).
    """

    maxPreauth: int = 1000
    maxPreauthPerAddress: int = 50
    maxHandshakes: int = 200
    handshakeTimeout: float = 10.0
    maxOpen: int | None = None


@attrs.frozen
class Refusals:
    """
    What a refused or dropped connection is told, in its protocol (None:
    closed without a word). A connection still in its TLS handshake is
    always closed without a word: a reply would first need the handshake.
    """

    address: bytes | None
    busy: bytes | None
    dropped: bytes | None


IMAP = Refusals(
    address=b"* BYE Too many connections from your address\r\n",
    busy=b"* BYE Too many connections, try again later\r\n",
    dropped=b"* BYE Too many connections, try again later\r\n",
)
SMTP = Refusals(
    address=b"421 4.7.0 Too many connections from your address\r\n",
    busy=b"421 4.7.0 Too many connections, try again later\r\n",
    dropped=b"421 4.7.0 Too many connections, try again later\r\n",
)
_HTTP_BODY = b'{"error": "Too many connections, try again later", "statusCode": 503}'
_HTTP_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(_HTTP_BODY)
) + _HTTP_BODY
HTTP = Refusals(address=_HTTP_BUSY, busy=_HTTP_BUSY, dropped=None)

# After a refusal or a drop, how long the peer has to take the message and go.
CLOSE_GRACE = 2.0
# At most one log line per kind of refusal in this many seconds.
LOG_INTERVAL = 60.0
# Seconds after a limit was hit before freed memory is handed back.
TRIM_DELAY = 5.0


@functools.lru_cache(maxsize=4096)
def addressKey(host: str) -> str:
    """The key a client's connections are counted under: its IPv4 address or IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def openBudget(filesLimit: int, reserve: int) -> int | None:
    """
    How many client connections the open-files limit leaves room for, each
    holding two files (its own and, logged in or logging in, its upstream
    connection) after ``reserve`` files for everything else (listeners, the
    store, spare upstream connections, the API). None when unknown.
    """
    if filesLimit <= 0:
        return None
    return max((filesLimit - reserve) // 2, 1)


@functools.lru_cache(maxsize=1)
def _mallocTrim() -> Any:
    path = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(path), "malloc_trim", None) if path else None
    except OSError:
        return None


def releaseMemory() -> bool:
    """
    Hand the heap memory freed since the last call back to the system
    (glibc's public ``malloc_trim(0)``; elsewhere nothing). After a flood of
    connections glibc keeps the freed memory of their TLS state, so the
    process would stay at its peak. It can take some milliseconds: call it
    in a thread. :return: whether there was a ``malloc_trim`` to call.
    """
    trim = _mallocTrim()
    if trim is None:
        return False
    trim(0)
    return True


class ILimitedConnection(Interface):
    """What the protocol on a limited connection tells its limiter."""

    def loggedIn() -> None:
        """The connection is a logged-in session: no longer pre-auth."""

    def handshakeStarting() -> None:
        """A TLS handshake starts (STARTTLS): it gets the deadline and counts."""


def loggedIn(transport: Any) -> None:
    """Tell the limiter under ``transport``, if any, that its connection logged in."""
    connection = ILimitedConnection(transport, None)
    if connection is not None:
        connection.loggedIn()


def handshakeStarting(transport: Any) -> None:
    """Tell the limiter under ``transport``, if any, that a TLS handshake starts."""
    connection = ILimitedConnection(transport, None)
    if connection is not None:
        connection.handshakeStarting()


class ConnectionLimiter:
    """
    The counts for one front door, shared by all its listeners.

    :param clock: ``IReactorTime``, for deadlines and for spacing log lines.
    :param name: the front door, in log lines.
    :param trim: called ``TRIM_DELAY`` after a limit was hit (at most once in
        that time), to give the memory of the connections that were cut back
        to the system (``releaseMemory``, in a thread).
    """

    def __init__(
        self,
        limits: Limits,
        clock: Any,
        name: str = "IMAP",
        trim: Callable[[], object] | None = None,
    ):
        self.limits = limits
        self.clock = clock
        self.name = name
        self._trim = trim
        self._trimCall: Any = None
        # Insertion-ordered: the oldest first.
        self._preauth: dict[LimitedProtocol, None] = {}
        self._handshakes: dict[LimitedProtocol, None] = {}
        self._open: set[LimitedProtocol] = set()
        self._byAddress: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._lastLog: dict[str, float] = {}

    @property
    def preauth(self) -> int:
        return len(self._preauth)

    @property
    def handshakes(self) -> int:
        return len(self._handshakes)

    @property
    def open(self) -> int:
        return len(self._open)

    def fromAddress(self, key: str) -> int:
        return self._byAddress[key]

    def admit(self, conn: LimitedProtocol) -> str | None:
        """:return: None when ``conn`` may go on, else why not (``address`` or ``busy``)."""
        if self._byAddress[conn.key] >= self.limits.maxPreauthPerAddress:
            self._note("address", conn.key)
            return "address"
        maxOpen = self.limits.maxOpen
        if maxOpen is not None and len(self._open) >= maxOpen:
            if not self._preauth:
                self._note("busy", conn.key)
                return "busy"
            self._drop(next(iter(self._preauth)), "dropped-preauth")
        elif len(self._preauth) >= self.limits.maxPreauth:
            self._drop(next(iter(self._preauth)), "dropped-preauth")
        self._open.add(conn)
        self._preauth[conn] = None
        self._byAddress[conn.key] += 1
        return None

    def loggedIn(self, conn: LimitedProtocol) -> None:
        if conn in self._preauth:
            del self._preauth[conn]
            self._uncount(conn.key)

    def handshakeStarting(self, conn: LimitedProtocol) -> None:
        if conn not in self._open:
            return
        if len(self._handshakes) >= self.limits.maxHandshakes:
            self._drop(next(iter(self._handshakes)), "dropped-handshake")
        self._handshakes[conn] = None

    def handshakeEnded(self, conn: LimitedProtocol) -> None:
        self._handshakes.pop(conn, None)

    def handshakeTimedOut(self, conn: LimitedProtocol) -> None:
        self._note("handshake-timeout", conn.key)

    def closed(self, conn: LimitedProtocol) -> None:
        self.loggedIn(conn)
        self._handshakes.pop(conn, None)
        self._open.discard(conn)

    def _uncount(self, key: str) -> None:
        self._byAddress[key] -= 1
        if self._byAddress[key] <= 0:
            del self._byAddress[key]

    def _drop(self, conn: LimitedProtocol, why: str) -> None:
        self._note(why, conn.key)
        self.closed(conn)
        conn.drop()

    def _trimNow(self) -> None:
        self._trimCall = None
        assert self._trim is not None
        self._trim()

    def stop(self) -> None:
        """Cancel the pending memory trim (at shutdown)."""
        if self._trimCall is not None and self._trimCall.active():
            self._trimCall.cancel()
        self._trimCall = None

    def _note(self, kind: str, key: str) -> None:
        """Count a refusal; one log line per kind per ``LOG_INTERVAL`` at most."""
        self.refused[kind] += 1
        self._unlogged[kind] += 1
        if self._trim is not None and self._trimCall is None:
            self._trimCall = self.clock.callLater(TRIM_DELAY, self._trimNow)
        now = self.clock.seconds()
        last = self._lastLog.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self._lastLog[kind] = now
        n, self._unlogged[kind] = self._unlogged[kind], 0
        log.warn(
            "{door} connection limits: {n} x {kind} (last from {address}); "
            "{preauth} pre-auth, {handshakes} handshaking, {open} open",
            door=self.name,
            n=n,
            kind=kind,
            address=key,
            preauth=len(self._preauth),
            handshakes=len(self._handshakes),
            open=len(self._open),
        )


@implementer(ILimitedConnection, IHandshakeListener)
class LimitedProtocol(ProtocolWrapper, TimeoutMixin):
    """
    Admits its connection through the limiter before the protocol it wraps
    starts, and times the TLS handshake.
    """

    factory: LimitedFactory
    transport: Any
    wrappedProtocol: Any
    key = ""
    _admitted = False
    _handshaking = False
    _closing = False

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper.makeConnection, with the admission first.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        limiter = self.factory.limiter
        self.key = addressKey(getattr(transport.getPeer(), "host", ""))
        refusal = limiter.admit(self)
        if refusal is not None:
            self._close(getattr(self.factory.refusals, refusal))
            return
        self._admitted = True
        self.factory.registerProtocol(self)
        if INegotiated.providedBy(transport) or ISSLTransport.providedBy(transport):
            self.handshakeStarting()
        self.wrappedProtocol.makeConnection(self)

    def callLater(self, period: float, func: Any) -> Any:
        # TimeoutMixin's deadlines on the limiter's clock.
        return self.factory.limiter.clock.callLater(period, func)

    def loggedIn(self) -> None:
        self.factory.limiter.loggedIn(self)
        if not self._handshaking:
            # No handshake left to time (STARTTLS comes before a login): reads
            # go straight to the session, one step fewer on every relayed read.
            self.dataReceived = self.wrappedProtocol.dataReceived  # type: ignore[method-assign]

    def handshakeStarting(self) -> None:
        if self._handshaking or self._closing:
            return
        self._handshaking = True
        self.factory.limiter.handshakeStarting(self)
        if not self._closing:
            self.setTimeout(self.factory.limiter.limits.handshakeTimeout)

    def handshakeCompleted(self) -> None:
        self._handshakeEnded()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _handshakeEnded(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self.factory.limiter.handshakeEnded(self)
            if not self._closing:
                self.setTimeout(None)

    def dataReceived(self, data: bytes) -> None:
        # Application data arrives only after the handshake: where the TLS
        # layer does not report its end to us (below a PROXY wrapper), this does.
        if self._handshaking:
            self._handshakeEnded()
        self.wrappedProtocol.dataReceived(data)

    def timeoutConnection(self) -> None:
        if self._handshaking and not self._closing:
            self.factory.limiter.handshakeTimedOut(self)
        self.transport.abortConnection()

    def drop(self) -> None:
        """Dropped by the limiter to make room."""
        self._close(self.factory.refusals.dropped)

    def _close(self, message: bytes | None) -> None:
        if self._closing:
            return
        self._closing = True
        if message is None or self._handshaking or not self._admitted and self._inTLS():
            self.setTimeout(None)
            self.transport.abortConnection()
            return
        self.transport.write(message)
        self.setTimeout(CLOSE_GRACE)
        self.transport.loseConnection()

    def _inTLS(self) -> bool:
        return INegotiated.providedBy(self.transport) or ISSLTransport.providedBy(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self.factory.limiter.closed(self)
        vars(self).pop("dataReceived", None)  # set by loggedIn: it holds the session
        if self._admitted:
            ProtocolWrapper.connectionLost(self, reason)


class LimitedFactory(WrappingFactory):
    """
    Wraps a front door's factory (one for all its listeners).

    :param refusals: what refused and dropped connections are told.
    """

    protocol = LimitedProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrappedFactory: Any, limiter: ConnectionLimiter, refusals: Refusals):
        super().__init__(wrappedFactory)
        self.limiter = limiter
        self.refusals = refusals
