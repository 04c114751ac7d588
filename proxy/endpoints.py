"""
PROXY-protocol listeners that hand the connection to the IMAP or API
protocol only once the header has been read.

Twisted's ``haproxy:`` endpoint starts the wrapped protocol at once, before
the header arrives, so a protocol that looks at ``getPeer()`` when it
connects (the greeting, the plaintext-login policy, IP restrictions) sees the
load balancer instead of the client.

``haproxy:ssl:…`` is TLS passthrough: the balancer sends the PROXY header in
the clear and then relays the client's own TLS (HAProxy's ``mode tcp`` with
``send-proxy-v2``), so TLS starts after the header, with the ``ssl:``
listener's certificate. (Twisted's own ``haproxy:ssl:`` expects the header
inside TLS, which no balancer sends.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from .relay import ProxyHeaderReader, proxyHeaderProblem

HEADER_TIMEOUT = 10.0


class _HeaderFirstWrapper(ProtocolWrapper):
    """Reads the PROXY header, then starts the wrapped protocol (with TLS first for ``ssl:``)."""

    _started = False
    _timer: Any = None
    _proxyInfo: Any = None

    def __init__(self, factory: Any, wrappedProtocol: Any):
        super().__init__(factory, wrappedProtocol)
        self._reader = ProxyHeaderReader()

    def getPeer(self) -> Any:
        # The client, as the balancer saw it.
        if self._proxyInfo is not None and self._proxyInfo.source is not None:
            return self._proxyInfo.source
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> Any:
        if self._proxyInfo is not None and self._proxyInfo.destination is not None:
            return self._proxyInfo.destination
        return self.transport.getHost()  # type: ignore[union-attr]

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper.makeConnection, minus starting the wrapped
        # protocol: that waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._noHeader)

    def _noHeader(self) -> None:
        self._timer = None
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        try:
            info, remaining = self._reader.feed(data)
        except ValueError:
            self.loseConnection()
            return
        if info is None:
            return
        self._proxyInfo = info
        self._started = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        tls = self.factory.tls
        transport: Any = self.transport
        if tls is not None:
            # From here on the transport decrypts and hands us the cleartext.
            transport.startTLS(tls)
            directlyProvides(self, providedBy(transport))
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            if tls is not None:
                # The client's first TLS bytes, read before TLS started.
                transport.protocol.dataReceived(remaining)
            else:
                self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        self.factory.unregisterProtocol(self)


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirstWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrappedFactory: Any, clock: Any, tls: Any = None):
        super().__init__(wrappedFactory)
        self.clock = clock
        self.tls = tls

    def logPrefix(self) -> str:
        return "PROXY-protocol " + self.wrappedFactory.logPrefix()  # type: ignore[attr-defined]


class HeaderFirstEndpoint:
    """``haproxy:<inner endpoint>`` with the header read before anything else."""

    def __init__(self, inner: Any, clock: Any, tls: Any = None):
        self._inner = inner
        self._clock = clock
        self._tls = tls

    def listen(self, factory: Any) -> Any:
        return self._inner.listen(_HeaderFirstFactory(factory, self._clock, self._tls))


class _ClearTLSReactor:
    """
    The reactor as an ``ssl:`` endpoint sees it, but listening in the clear:
    ``listenSSL`` listens with TCP and starts TLS (with the endpoint's own
    certificate options) once the PROXY header is read.
    """

    def __init__(self, reactor: Any):
        self._reactor = reactor

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        wrapped = _HeaderFirstFactory(factory, self._reactor, contextFactory)
        return self._reactor.listenTCP(port, wrapped, backlog, interface)


# Connections the kernel queues for accept(): Twisted's 50 is too few for
# thousands of clients reconnecting at once (after a restart or a network
# blip), which then see SYN retries of a second or more.
BACKLOG = 1024
_BACKLOG_KINDS = ("tcp:", "tcp6:", "ssl:", "unix:")


def withBacklog(description: str) -> str:
    """``description`` with ``backlog=BACKLOG`` added when it names none."""
    inner = description[len("haproxy:") :] if description.startswith("haproxy:") else description
    if not inner.startswith(_BACKLOG_KINDS) or "backlog=" in inner:
        return description
    return description + f":backlog={BACKLOG}"


def serverEndpoint(reactor: Any, description: str) -> Any:
    """``serverFromString``, with ``haproxy:`` served by ``HeaderFirstEndpoint``."""
    description = withBacklog(description)
    if description.startswith("haproxy:"):
        problem = proxyHeaderProblem()
        if problem is not None:
            raise ValueError(f"haproxy: listeners cannot work: {problem}")
        inner = description[len("haproxy:") :]
        if inner.startswith("ssl:"):
            # Listen in the clear; TLS starts once the header is read.
            return endpoints.serverFromString(_ClearTLSReactor(reactor), inner)
        return HeaderFirstEndpoint(endpoints.serverFromString(reactor, inner), reactor)
    return endpoints.serverFromString(reactor, description)
