"""
PROXY-protocol listeners (``haproxy:``): the protocol starts only once the
header is read, sees the client's address, and a connection without a valid
header is dropped; ``haproxy:ssl:`` listens in the clear and starts TLS after
the header. Over ``StringTransport`` and ``MemoryReactorClock``.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from proxy.endpoints import HEADER_TIMEOUT, HeaderFirstEndpoint, serverEndpoint
from tests.upstream.certs import make_pki

V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\n"
V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
    + bytes([192, 0, 2, 7, 198, 51, 100, 1])
    + (40000).to_bytes(2, "big")
    + (143).to_bytes(2, "big")
)


class App(Protocol):
    def __init__(self) -> None:
        self.peer = None
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


def listen(tls=None):
    """A ``HeaderFirstEndpoint`` listening on a memory reactor: (reactor, app, connect)."""
    reactor = MemoryReactorClock()
    app = App()
    inner = serverEndpoint(reactor, "tcp:143")
    HeaderFirstEndpoint(inner, reactor, tls).listen(Factory.forProtocol(lambda: app))
    factory = reactor.tcpServers[0][1]

    def connect() -> tuple[Protocol, StringTransport]:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        protocol = factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return protocol, transport

    return reactor, app, connect


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_theProtocolStartsAfterTheHeaderAndSeesTheClient(header):
    """Nothing reaches the protocol before the header; then it sees the client's address."""
    reactor, app, connect = listen()
    wrapper, transport = connect()
    wrapper.dataReceived(header[:20])
    assert app.peer is None
    wrapper.dataReceived(header[20:] + b"a1 NOOP\r\n")
    assert app.peer == IPv4Address("TCP", "192.0.2.7", 40000)
    assert app.received == b"a1 NOOP\r\n"
    assert reactor.getDelayedCalls() == []  # the header deadline was cancelled


@pytest.mark.parametrize(
    "data", [b"a1 LOGIN x y\r\n", b"PROXY BOGUS 1 2 3 4\r\n"], ids=["no-header", "bad-header"]
)
def test_aConnectionWithoutAValidHeaderIsDropped(data):
    _reactor, app, connect = listen()
    wrapper, transport = connect()
    wrapper.dataReceived(data)
    assert transport.disconnecting
    assert app.peer is None


def test_aConnectionThatSendsNoHeaderIsDroppedAfterTheDeadline():
    reactor, app, connect = listen()
    _wrapper, transport = connect()
    reactor.advance(HEADER_TIMEOUT - 0.1)
    assert not transport.disconnecting
    reactor.advance(0.1)
    assert transport.disconnecting
    assert app.peer is None


def test_haproxySslListensInTheClearAndStartsTLSAfterTheHeader():
    """``haproxy:ssl:`` is a TCP listener whose connections start TLS once the header is read."""
    with tempfile.TemporaryDirectory() as d:
        pki = make_pki(os.path.join(d, "pki"))
        reactor = MemoryReactorClock()
        endpoint = serverEndpoint(
            reactor,
            f"haproxy:ssl:993:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
        )
        app = App()
        endpoint.listen(Factory.forProtocol(lambda: app))
    assert reactor.sslServers == []
    ((port, factory, backlog, interface),) = reactor.tcpServers
    assert (port, backlog, interface) == (993, 1024, "127.0.0.1")
    started = []
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    transport.startTLS = started.append  # type: ignore[attr-defined]
    wrapper = factory.buildProtocol(transport.getPeer())
    wrapper.makeConnection(transport)
    wrapper.dataReceived(V1)
    assert started == [factory.tls]
    assert app.peer == IPv4Address("TCP", "192.0.2.7", 40000)
