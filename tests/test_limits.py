"""
Tests for ``proxy.limits``: the connection limiter of the front doors, over
``StringTransport`` and a ``MemoryReactorClock``, and with the real
``ProxyServer`` behind it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import INegotiated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from proxy import limits
from proxy.cred import IUpstreamSession
from proxy.imap import ProxyFactory, ServerPolicy
from proxy.limits import (
    HTTP,
    IMAP,
    ConnectionLimiter,
    LimitedFactory,
    Limits,
    addressKey,
    openBudget,
)
from tests.test_imap import TOKEN, FakePortal, FakeSession, FakeUpstream


class Recorder(Protocol):
    """A front door's protocol that only records what happens to it."""

    made = 0
    lost = 0

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost += 1


@implementer(INegotiated)
class TLSTransport(StringTransport):
    """A connection whose TLS handshake has not finished."""

    negotiatedProtocol = None


class LimiterTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.open: list[tuple[Any, StringTransport]] = []
        self.addCleanup(self.closeAll)

    def closeAll(self) -> None:
        for proto, transport in self.open:
            if not getattr(transport, "_lostReported", False):
                transport._lostReported = True  # type: ignore[attr-defined]
                proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [], "a timer was left behind")

    def factory(self, refusals: Any = IMAP, **kw: Any) -> LimitedFactory:
        self.limiter = ConnectionLimiter(Limits(**kw), self.clock)
        inner = Factory.forProtocol(Recorder)
        return LimitedFactory(inner, self.limiter, refusals)

    def connect(
        self, factory: LimitedFactory, host: str = "192.0.2.1", transport: Any = None
    ) -> tuple[Any, StringTransport]:
        addr = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        transport = transport or StringTransport()
        transport.peerAddr = addr
        proto.makeConnection(transport)
        self.open.append((proto, transport))
        return proto, transport

    def lose(self, proto: Any, transport: Any) -> None:
        transport._lostReported = True
        proto.connectionLost(Failure(ConnectionDone()))


class PerAddressTests(LimiterTestCase):
    def test_perAddressCap(self):
        """Past its address's cap a connection is told BYE and closed; other addresses go on."""
        factory = self.factory(maxPreauthPerAddress=2)
        for _ in range(2):
            proto, transport = self.connect(factory)
            self.assertEqual(proto.wrappedProtocol.made, 1)
        proto, transport = self.connect(factory)
        self.assertEqual(transport.value(), b"* BYE Too many connections from your address\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proto.wrappedProtocol.made, 0)
        other, _ = self.connect(factory, host="192.0.2.2")
        self.assertEqual(other.wrappedProtocol.made, 1)
        self.assertEqual((self.limiter.preauth, self.limiter.fromAddress("192.0.2.1")), (3, 2))
        self.clock.advance(limits.CLOSE_GRACE)
        self.assertTrue(transport.disconnected, "a peer that stays is cut")
        self.lose(proto, transport)
        self.assertEqual(self.limiter.preauth, 3)

    def test_closingFreesTheSlot(self):
        """A closed connection no longer counts."""
        factory = self.factory(maxPreauthPerAddress=1)
        proto, transport = self.connect(factory)
        inner = proto.wrappedProtocol
        self.lose(proto, transport)
        self.assertEqual(inner.lost, 1)
        self.assertEqual(self.limiter.preauth, 0)
        again, _ = self.connect(factory)
        self.assertEqual(again.wrappedProtocol.made, 1)

    def test_loggedInNoLongerCounts(self):
        """A logged-in connection leaves room for the next pre-auth one from its address."""
        factory = self.factory(maxPreauthPerAddress=1)
        proto, transport = self.connect(factory)
        limits.loggedIn(proto.wrappedProtocol.transport)
        self.assertEqual((self.limiter.preauth, self.limiter.open), (0, 1))
        # Its reads now go straight to the session, until it is lost.
        self.assertEqual(proto.dataReceived, proto.wrappedProtocol.dataReceived)
        again, _ = self.connect(factory)
        self.assertEqual(again.wrappedProtocol.made, 1)
        self.lose(proto, transport)
        self.assertNotIn("dataReceived", vars(proto))

    def test_addressKeys(self):
        """IPv4 and IPv4-mapped addresses count alone; IPv6 ones by their /64."""
        self.assertEqual(addressKey("192.0.2.7"), "192.0.2.7")
        self.assertEqual(addressKey("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(addressKey("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(addressKey("2001:db8::ffff:1"), "2001:db8::/64")
        self.assertEqual(addressKey("2001:db8:0:1::1"), "2001:db8:0:1::/64")
        self.assertEqual(addressKey("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(addressKey("unix"), "unix")

    def test_ipv6ByPrefix(self):
        """Two addresses of one /64 share its cap."""
        factory = self.factory(maxPreauthPerAddress=1)
        self.connect(factory, host="2001:db8::1")
        _, transport = self.connect(factory, host="2001:db8::2")
        self.assertTrue(transport.disconnecting)
        other, _ = self.connect(factory, host="2001:db8:0:1::1")
        self.assertEqual(other.wrappedProtocol.made, 1)


class TotalTests(LimiterTestCase):
    def test_fullDropsTheOldestPreauth(self):
        """With the total full, the oldest pre-auth connection is dropped for the new one."""
        factory = self.factory(maxPreauth=2)
        first, t1 = self.connect(factory, host="192.0.2.1")
        second, t2 = self.connect(factory, host="192.0.2.2")
        limits.loggedIn(second.wrappedProtocol.transport)
        third, t3 = self.connect(factory, host="192.0.2.3")
        fourth, t4 = self.connect(factory, host="192.0.2.4")
        self.assertEqual(t1.value(), b"* BYE Too many connections, try again later\r\n")
        self.assertTrue(t1.disconnecting)
        self.assertFalse(t2.disconnecting, "a logged-in session is never dropped")
        self.assertFalse(t3.disconnecting or t4.disconnecting)
        self.assertEqual(fourth.wrappedProtocol.made, 1)
        self.assertEqual((self.limiter.preauth, self.limiter.open), (2, 3))
        self.lose(first, t1)
        self.assertEqual(self.limiter.preauth, 2)
        fifth, t5 = self.connect(factory, host="192.0.2.5")
        self.assertTrue(t3.disconnecting, "then the next oldest")
        self.assertEqual(fifth.wrappedProtocol.made, 1)
        self.assertEqual(self.limiter.refused["dropped-preauth"], 2)

    def test_openCapRefusesWhenAllLoggedIn(self):
        """Past the open-files budget a new connection is refused unless a pre-auth one can go."""
        factory = self.factory(maxOpen=2)
        a, _ = self.connect(factory, host="192.0.2.1")
        limits.loggedIn(a.wrappedProtocol.transport)
        b, tb = self.connect(factory, host="192.0.2.2")
        c, tc = self.connect(factory, host="192.0.2.3")
        self.assertTrue(tb.disconnecting, "the pre-auth one made room")
        self.assertEqual(c.wrappedProtocol.made, 1)
        limits.loggedIn(c.wrappedProtocol.transport)
        d, td = self.connect(factory, host="192.0.2.4")
        self.assertEqual(td.value(), b"* BYE Too many connections, try again later\r\n")
        self.assertEqual(d.wrappedProtocol.made, 0)

    def test_openBudget(self):
        """Each connection may hold two files, after the reserve."""
        self.assertEqual(openBudget(1200, 64), 568)
        self.assertEqual(openBudget(10, 64), 1)
        self.assertIsNone(openBudget(-1, 64))

    def test_httpRefusal(self):
        """The API's refusal is an HTTP 503 with a JSON body of the stated length."""
        factory = self.factory(refusals=HTTP, maxPreauthPerAddress=1)
        self.connect(factory)
        _, transport = self.connect(factory)
        head, body = transport.value().split(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertIn(b'"statusCode": 503', body)

    def test_refusalsLoggedOncePerInterval(self):
        """Refusals are counted, and logged at most once per kind and interval."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = self.factory(maxPreauthPerAddress=1)
        for _ in range(50):
            self.connect(factory)
        self.assertEqual(self.limiter.refused["address"], 49)
        self.assertEqual(len(events), 1)
        self.clock.advance(limits.LOG_INTERVAL)
        self.connect(factory)
        self.assertEqual(len(events), 2)
        self.assertIn("1 x address", events[0]["log_format"].format(**events[0]))
        self.assertIn("49 x address", events[1]["log_format"].format(**events[1]))


class HandshakeTests(LimiterTestCase):
    def test_deadline(self):
        """A TLS handshake that does not finish in time is cut."""
        factory = self.factory(handshakeTimeout=10.0)
        proto, transport = self.connect(factory, transport=TLSTransport())
        self.assertEqual(self.limiter.handshakes, 1)
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.limiter.refused["handshake-timeout"], 1)
        self.lose(proto, transport)
        self.assertEqual((self.limiter.handshakes, self.limiter.preauth), (0, 0))

    def test_completedHandshake(self):
        """A finished handshake (reported, or shown by data) stops the deadline."""
        factory = self.factory(handshakeTimeout=10.0)
        proto, transport = self.connect(factory, transport=TLSTransport())
        proto.handshakeCompleted()
        other, t2 = self.connect(factory, transport=TLSTransport(), host="192.0.2.2")
        other.dataReceived(b"a NOOP\r\n")
        self.assertEqual(other.wrappedProtocol.received, [b"a NOOP\r\n"])
        self.assertEqual(self.limiter.handshakes, 0)
        self.clock.advance(60)
        self.assertFalse(transport.disconnected or t2.disconnected)

    def test_capDropsTheOldestHandshake(self):
        """Past max-handshakes the oldest handshake is cut, without a word."""
        factory = self.factory(maxHandshakes=2)
        _, t1 = self.connect(factory, transport=TLSTransport(), host="192.0.2.1")
        self.connect(factory, transport=TLSTransport(), host="192.0.2.2")
        third, t3 = self.connect(factory, transport=TLSTransport(), host="192.0.2.3")
        self.assertTrue(t1.disconnected)
        self.assertEqual(t1.value(), b"")
        self.assertEqual(third.wrappedProtocol.made, 1)
        self.assertEqual(self.limiter.handshakes, 2)

    def test_refusedDuringHandshakeIsCutSilently(self):
        """A TLS connection past its address's cap is cut at once: a BYE would need a handshake."""
        factory = self.factory(maxPreauthPerAddress=1)
        self.connect(factory, transport=TLSTransport())
        _, transport = self.connect(factory, transport=TLSTransport())
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_starttls(self):
        """STARTTLS through the server starts the handshake deadline."""
        factory = self.factory(handshakeTimeout=5.0)
        proto, transport = self.connect(factory)
        limits.handshakeStarting(proto.wrappedProtocol.transport)
        self.assertEqual(self.limiter.handshakes, 1)
        self.clock.advance(5.0)
        self.assertTrue(transport.disconnected)


class ProxyServerTests(LimiterTestCase):
    """The IMAP server tells its limiter when a connection logs in and starts TLS."""

    def imapFactory(self, portal: Any, **kw: Any) -> LimitedFactory:
        self.limiter = ConnectionLimiter(Limits(**kw), self.clock)
        inner = ProxyFactory(portal, ServerPolicy(), clock=self.clock)
        return LimitedFactory(inner, self.limiter, IMAP)

    def test_splicedSessionLeavesPreauth(self):
        """A spliced session no longer counts as pre-auth; a failed login still does."""
        portal = FakePortal()
        factory = self.imapFactory(portal, maxPreauthPerAddress=1)
        proto, transport = self.connect(factory, host="127.0.0.1")
        server = proto.wrappedProtocol
        self.assertTrue(transport.value().startswith(b"* OK imapproxy ready"))
        server.dataReceived(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.limiter.preauth, 1)
        session = FakeSession(FakeUpstream())
        portal.logins[-1][3].callback((IUpstreamSession, session, session.logout))
        self.assertEqual((self.limiter.preauth, self.limiter.open), (0, 1))
        second, _ = self.connect(factory, host="127.0.0.1")
        self.assertEqual(self.limiter.preauth, 1)
        self.lose(proto, transport)
        self.assertEqual(self.limiter.open, 1)

    def test_starttlsCounted(self):
        """STARTTLS through the real server counts a handshake, with its deadline."""
        factory = self.imapFactory(FakePortal(), handshakeTimeout=3.0)

        class StartTLSTransport(StringTransport):
            def startTLS(self, options: Any) -> None:
                self.tls = options

        proto, transport = self.connect(factory, host="127.0.0.1", transport=StartTLSTransport())
        server = proto.wrappedProtocol
        server.ctx = object()
        server.canStartTLS = True
        server.dataReceived(b"a STARTTLS\r\n")
        self.assertEqual(self.limiter.handshakes, 1)
        self.clock.advance(3.0)
        self.assertTrue(transport.disconnected)


class MemoryTests(LimiterTestCase):
    def test_trimAfterALimitWasHit(self):
        """Freed memory is handed back once, TRIM_DELAY after limits were hit."""
        trims: list[None] = []
        self.limiter = ConnectionLimiter(
            Limits(maxPreauthPerAddress=1), self.clock, trim=lambda: trims.append(None)
        )
        factory = LimitedFactory(Factory.forProtocol(Recorder), self.limiter, IMAP)
        self.connect(factory)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for _ in range(3):
            self.connect(factory)
        self.clock.advance(limits.TRIM_DELAY + limits.CLOSE_GRACE)
        self.assertEqual(len(trims), 1)

    def test_stopCancelsTheTrim(self):
        """Stopping the limiter leaves no timer behind."""
        self.limiter = ConnectionLimiter(
            Limits(maxPreauthPerAddress=1), self.clock, trim=lambda: None
        )
        factory = LimitedFactory(Factory.forProtocol(Recorder), self.limiter, IMAP)
        self.connect(factory)
        proto, transport = self.connect(factory)
        self.lose(proto, transport)
        self.limiter.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_releaseMemory(self):
        """releaseMemory calls glibc's malloc_trim where there is one."""
        self.assertIsInstance(limits.releaseMemory(), bool)


class APITests(LimiterTestCase):
    def test_siteBehindTheLimiter(self):
        """An API Site behind the limiter answers as before, and 503 past an address's cap."""
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Health(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b'{"status": "ok"}'

        self.limiter = ConnectionLimiter(Limits(maxPreauthPerAddress=1), self.clock, "API")
        factory = LimitedFactory(Site(Health(), reactor=self.clock), self.limiter, HTTP)
        proto, transport = self.connect(factory)
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b'{"status": "ok"}', transport.value())
        _, refused = self.connect(factory)
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertTrue(refused.disconnecting)
        self.lose(proto, transport)
        self.clock.advance(limits.CLOSE_GRACE)


class BehindProxyHeaderTests(LimiterTestCase):
    def test_countsTheClientFromTheHeader(self):
        """Behind a haproxy: listener the client's address from the PROXY header is counted."""
        from proxy.endpoints import HeaderFirstEndpoint

        class Inner:
            def listen(self, factory: Any) -> None:
                self.factory = factory

        inner = Inner()
        HeaderFirstEndpoint(inner, self.clock).listen(self.factory(maxPreauthPerAddress=1))
        balancer = IPv4Address("TCP", "10.0.0.1", 40000)
        transports = []
        for _ in range(2):
            proto = inner.factory.buildProtocol(balancer)
            transport = StringTransport(peerAddress=balancer)
            proto.makeConnection(transport)
            proto.dataReceived(b"PROXY TCP4 192.0.2.9 10.0.0.1 5555 143\r\n")
            self.open.append((proto, transport))
            transports.append(transport)
        self.assertEqual(self.limiter.fromAddress("192.0.2.9"), 1)
        self.assertEqual(self.limiter.fromAddress("10.0.0.1"), 0)
        self.assertFalse(transports[0].disconnecting)
        self.assertEqual(transports[1].value(), b"* BYE Too many connections from your address\r\n")
        self.clock.advance(limits.CLOSE_GRACE)
