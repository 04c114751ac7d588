"""
Tests for ``proxy.imap``: the pre-auth ``ProxyServer`` over a
``StringTransport``, with a fake portal whose logins the test decides and a
fake logged-in upstream, so no store, network or reactor is involved.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import INegotiated
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from proxy import __version__
from proxy.cred import IUpstreamSession, TokenCredentials, UpstreamSession
from proxy.errors import AccessDenied, LimitReached, Unavailable
from proxy.imap import ProxyFactory, ProxyServer, ServerPolicy, SessionRegistry, isLoopback
from proxy.upstream import UpstreamProtocol, XOAUTH2Authenticator

TOKEN = "3b5d9e0f6a1c2b4d8e7f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d"
assert len(TOKEN) == 64


class FakePortal:
    """Records each login; the test fires the Deferred it returned."""

    def __init__(self) -> None:
        self.logins: list[tuple[Any, Any, tuple, Deferred]] = []

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred:
        d: Deferred = Deferred()
        self.logins.append((credentials, mind, interfaces, d))
        return d


class _UpstreamTransport(StringTransport):
    """Reports the connection lost once closed, as a real transport does."""

    def __init__(self, owner: FakeUpstream):
        super().__init__()
        self.owner = owner
        self.closed = False

    def _closed(self) -> None:
        if not self.closed:
            self.closed = True
            if self.owner.onLost is not None:
                self.owner.onLost(Failure(ConnectionDone()))

    def loseConnection(self) -> None:
        super().loseConnection()
        self._closed()

    def abortConnection(self) -> None:
        super().loseConnection()
        self._closed()


class FakeUpstream:
    """A logged-in upstream protocol as the splice sees it."""

    def __init__(self, leftover: bytes = b"", capabilities=(b"IMAP4rev1", b"IDLE")):
        self.transport = _UpstreamTransport(self)
        self.capabilities = list(capabilities)
        self.bytesReceived = 0
        self.leftover = leftover
        self.sink: Any = None
        self.onLost: Any = None

    def takeOver(self, sink: Any, onLost: Any) -> bytes:
        self.sink = sink
        self.onLost = onLost
        return self.leftover


@attrs.define(eq=False)
class FakeSession:
    protocol: FakeUpstream
    account: str = "alice"
    tokenId: str = "tid-1"
    loggedOut: int = 0

    @property
    def capabilities(self) -> list[bytes]:
        return self.protocol.capabilities

    def logout(self) -> None:
        self.loggedOut += 1


class TLSStringTransport(StringTransport):
    """A StringTransport that can start TLS (records the options)."""

    tlsOptions = None

    def startTLS(self, options: Any) -> None:
        self.tlsOptions = options


@implementer(INegotiated)
class NegotiatedTransport(StringTransport):
    """A StringTransport standing for a TLS connection."""

    negotiatedProtocol = None


class ProxyServerTestCase(SynchronousTestCase):
    """Helpers: connect a ProxyServer and talk to it line by line."""

    def connect(
        self,
        address: str = "127.0.0.1",
        policy: ServerPolicy | None = None,
        contextFactory: Any = None,
        transport: StringTransport | None = None,
    ) -> ProxyServer:
        self.clock = task.Clock()
        self.portal = FakePortal()
        self.sessions = SessionRegistry()
        self.server = ProxyServer(
            self.portal, policy or ServerPolicy(), contextFactory, self.sessions
        )
        self.server.callLater = self.clock.callLater
        peer = (IPv6Address if ":" in address else IPv4Address)("TCP", address, 54321)
        self.transport = transport or StringTransport()
        self.transport.peerAddr = peer
        self.server.makeConnection(self.transport)
        self.addCleanup(self.disconnect)
        return self.server

    def disconnect(self) -> None:
        if self.server._phase != "closed" or self.server.connected:
            self.server.connectionLost(Failure(ConnectionDone()))
            self.server.connected = False
        self.assertEqual(self.clock.getDelayedCalls(), [], "a timer was left behind")

    def send(self, data: bytes) -> None:
        self.server.dataReceived(data)

    def output(self) -> bytes:
        """Everything written to the client since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def lines(self) -> list[bytes]:
        data = self.output()
        self.assertTrue(data == b"" or data.endswith(b"\r\n"), data)
        return data.split(b"\r\n")[:-1]

    def greeted(self, **kw) -> ProxyServer:
        server = self.connect(**kw)
        self.output()
        return server

    def lastLogin(self) -> tuple[Any, Deferred]:
        self.assertTrue(self.portal.logins, "the portal was not asked")
        creds, _mind, _ifaces, d = self.portal.logins[-1]
        return creds, d

    def succeed(self, d: Deferred, upstream: FakeUpstream | None = None) -> FakeSession:
        session = FakeSession(upstream or FakeUpstream())
        d.callback((IUpstreamSession, session, session.logout))
        return session


class GreetingAndCommandsTests(ProxyServerTestCase):
    def test_greeting(self):
        """The greeting names the proxy and the client's address."""
        self.connect()
        self.assertEqual(self.lines(), [b"* OK imapproxy ready for requests from 127.0.0.1"])

    def test_greetingIPv6(self):
        """An IPv6 client's address appears in the greeting."""
        self.connect(address="::1")
        self.assertEqual(self.lines(), [b"* OK imapproxy ready for requests from ::1"])

    def test_capabilityLoopback(self):
        """Before login a loopback plaintext client is offered AUTH=PLAIN."""
        self.greeted()
        self.send(b"a CAPABILITY\r\n")
        self.assertEqual(
            self.lines(),
            [b"* CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN", b"a OK CAPABILITY completed"],
        )

    def test_capabilityRemotePlaintext(self):
        """A non-loopback plaintext client is told LOGINDISABLED, without AUTH=PLAIN."""
        self.greeted(address="192.0.2.7")
        self.send(b"a CAPABILITY\r\n")
        caps = self.lines()[0].split()[2:]
        self.assertIn(b"LOGINDISABLED", caps)
        self.assertNotIn(b"AUTH=PLAIN", caps)

    def test_capabilityPolicyAllow(self):
        """With plaintext-login allow a remote plaintext client is offered AUTH=PLAIN."""
        self.greeted(address="192.0.2.7", policy=ServerPolicy(plaintextLogin="allow"))
        self.send(b"a CAPABILITY\r\n")
        caps = self.lines()[0].split()[2:]
        self.assertIn(b"AUTH=PLAIN", caps)
        self.assertNotIn(b"LOGINDISABLED", caps)

    def test_capabilityPolicyDeny(self):
        """With plaintext-login deny even a loopback plaintext client gets LOGINDISABLED."""
        self.greeted(policy=ServerPolicy(plaintextLogin="deny"))
        self.send(b"a CAPABILITY\r\n")
        self.assertIn(b"LOGINDISABLED", self.lines()[0].split())

    def test_capabilityIPv4MappedLoopback(self):
        """An IPv4-mapped loopback peer counts as loopback."""
        self.greeted(address="::ffff:127.0.0.1")
        self.send(b"a CAPABILITY\r\n")
        self.assertIn(b"AUTH=PLAIN", self.lines()[0].split())

    def test_starttlsOffered(self):
        """STARTTLS is offered when a context factory is configured."""
        self.greeted(contextFactory=object(), transport=TLSStringTransport())
        self.send(b"a CAPABILITY\r\n")
        self.assertIn(b"STARTTLS", self.lines()[0].split())

    def test_starttlsNotOfferedWithoutContext(self):
        """Without a context factory STARTTLS is neither offered nor accepted."""
        self.greeted(transport=TLSStringTransport())
        self.send(b"a CAPABILITY\r\n")
        self.assertNotIn(b"STARTTLS", self.lines()[0].split())
        self.send(b"b STARTTLS\r\n")
        self.assertEqual(self.lines(), [b"b NO [CANNOT] TLS not available"])
        self.assertIsNone(self.transport.tlsOptions)

    def test_starttls(self):
        """STARTTLS starts TLS, drops pipelined plaintext, and then allows remote logins."""
        ctx = object()
        self.greeted(address="192.0.2.7", contextFactory=ctx, transport=TLSStringTransport())
        self.send(b"a STARTTLS\r\nb LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.lines(), [b"a OK Begin TLS negotiation now"])
        self.assertIs(self.transport.tlsOptions, ctx)
        self.assertEqual(self.portal.logins, [])
        self.send(b"c CAPABILITY\r\n")
        caps = self.lines()[0].split()[2:]
        self.assertIn(b"AUTH=PLAIN", caps)
        self.assertNotIn(b"STARTTLS", caps)
        self.assertNotIn(b"LOGINDISABLED", caps)
        self.send(b"d STARTTLS\r\n")
        self.assertEqual(self.lines(), [b"d BAD TLS already active"])

    def test_implicitTLS(self):
        """A connection over TLS (an INegotiated transport) may log in from anywhere."""
        self.greeted(address="192.0.2.7", transport=NegotiatedTransport())
        self.send(b"a CAPABILITY\r\n")
        caps = self.lines()[0].split()[2:]
        self.assertIn(b"AUTH=PLAIN", caps)
        self.assertNotIn(b"LOGINDISABLED", caps)
        self.send(b"b LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.lastLogin()[0].address, "192.0.2.7")

    def test_noop(self):
        """NOOP is answered OK."""
        self.greeted()
        self.send(b"a NOOP\r\n")
        self.assertEqual(self.lines(), [b"a OK NOOP No operation performed"])

    def test_id(self):
        """ID is answered with the proxy's name and version."""
        self.greeted()
        self.send(b'a ID ("name" "client")\r\n')
        self.assertEqual(
            self.lines(),
            [
                b'* ID ("name" "imapproxy" "version" "' + __version__.encode() + b'")',
                b"a OK ID completed",
            ],
        )

    def test_logout(self):
        """LOGOUT says BYE, completes and closes the connection."""
        self.greeted()
        self.send(b"a LOGOUT\r\n")
        self.assertEqual(self.lines(), [b"* BYE imapproxy logging out", b"a OK LOGOUT completed"])
        self.assertTrue(self.transport.disconnecting)

    def test_postAuthCommand(self):
        """A command valid only after login (SELECT) is BAD."""
        self.greeted()
        self.send(b"a SELECT INBOX\r\nb FOOBAR\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"a BAD Command unknown or not valid before login",
                b"b BAD Command unknown or not valid before login",
            ],
        )

    def test_missingCommand(self):
        """A tag alone is BAD."""
        self.greeted()
        self.send(b"a\r\n")
        self.assertEqual(self.lines(), [b"a BAD Missing command"])

    def test_lowerCaseCommand(self):
        """Commands are case-insensitive."""
        self.greeted()
        self.send(b"a noop\r\n")
        self.assertEqual(self.lines(), [b"a OK NOOP No operation performed"])


class LoginParsingTests(ProxyServerTestCase):
    def test_loginAtoms(self):
        """LOGIN asks the portal for IUpstreamSession with TokenCredentials; no answer yet."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.output(), b"")
        creds, mind, ifaces, d = self.portal.logins[0]
        self.assertEqual(creds, TokenCredentials(account="alice", token=TOKEN, address="127.0.0.1"))
        self.assertIsNone(mind)
        self.assertEqual(ifaces, (IUpstreamSession,))
        self.assertNoResult(d)
        self.assertNotIn(TOKEN, repr(creds))

    def test_loginQuoted(self):
        """Quoted LOGIN arguments are unquoted."""
        self.greeted()
        self.send(b'a LOGIN "alice@example.com" "' + TOKEN.encode() + b'"\r\n')
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("alice@example.com", TOKEN))

    def test_loginLiteral(self):
        """A LOGIN password sent as a literal gets a continuation, then is read whole."""
        self.greeted()
        self.send(b"a LOGIN alice {64}\r\n")
        self.assertEqual(self.lines(), [b"+ Ready for 64 octets of text"])
        self.assertEqual(self.portal.logins, [])
        self.send(TOKEN.encode() + b"\r\n")
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("alice", TOKEN))
        self.assertEqual(self.output(), b"")

    def test_loginLiteralUser(self):
        """Both LOGIN arguments may be literals."""
        self.greeted()
        self.send(b"a LOGIN {5}\r\n")
        self.assertEqual(self.lines(), [b"+ Ready for 5 octets of text"])
        self.send(b"alice {64}\r\n")
        self.assertEqual(self.lines(), [b"+ Ready for 64 octets of text"])
        self.send(TOKEN.encode() + b"\r\n")
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("alice", TOKEN))

    def test_loginLiteralTooLarge(self):
        """A literal larger than maxLiteral is BAD, without a continuation."""
        self.greeted(policy=ServerPolicy(maxLiteral=100))
        self.send(b"a LOGIN alice {101}\r\n")
        lines = self.lines()
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith(b"a BAD "), lines)
        self.assertEqual(self.portal.logins, [])
        self.send(b"b NOOP\r\n")
        self.assertEqual(self.lines(), [b"b OK NOOP No operation performed"])

    def test_loginMissingArgument(self):
        """LOGIN without a password is BAD."""
        self.greeted()
        self.send(b"a LOGIN alice\r\n")
        self.assertTrue(self.lines()[0].startswith(b"a BAD "))
        self.assertEqual(self.portal.logins, [])

    def test_tokenNotEchoedTooManyArgs(self):
        """A BAD for too many arguments never quotes the token."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b" extra\r\n")
        self.send(b"b LOGIN alice extra " + TOKEN.encode() + b"\r\n")
        self.send(b"c LOGIN alice extra " + TOKEN.encode() + b" " + TOKEN.encode() + b"\r\n")
        out = self.output()
        self.assertEqual(
            out.split(b"\r\n")[:-1],
            [
                b"a BAD Syntax error: Too many arguments",
                b"b BAD Syntax error: Too many arguments",
                b"c BAD Syntax error: Too many arguments",
            ],
        )
        self.assertNotIn(TOKEN[:16].encode(), out)
        self.assertEqual(self.portal.logins, [])

    def test_tokenNotEchoedUnmatchedQuote(self):
        """A BAD for a malformed quoted token never quotes the token."""
        self.greeted()
        self.send(b'a LOGIN alice "' + TOKEN.encode() + b"\r\n")
        out = self.output()
        self.assertTrue(out.startswith(b"a BAD "), out)
        self.assertNotIn(TOKEN[:16].encode(), out)

    def test_privacyRequired(self):
        """LOGIN from a non-loopback plaintext connection is refused with PRIVACYREQUIRED."""
        self.greeted(address="192.0.2.7")
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.lines(), [b"a NO [PRIVACYREQUIRED] Login without TLS is not allowed"])
        self.assertEqual(self.portal.logins, [])

    def test_privacyRequiredBeforeLiteral(self):
        """A literal password in the clear is refused before any continuation invites it."""
        self.greeted(address="192.0.2.7")
        self.send(b"a LOGIN alice {64}\r\n")
        self.assertEqual(self.lines(), [b"a NO [PRIVACYREQUIRED] Login without TLS is not allowed"])

    def test_privacyRequiredAuthenticate(self):
        """AUTHENTICATE PLAIN from a non-loopback plaintext connection is refused too."""
        self.greeted(address="192.0.2.7")
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.lines(), [b"a NO [PRIVACYREQUIRED] Login without TLS is not allowed"])

    def test_remoteAllowed(self):
        """With plaintext-login allow a remote client's address reaches the portal."""
        self.greeted(address="192.0.2.7", policy=ServerPolicy(plaintextLogin="allow"))
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        creds, _ = self.lastLogin()
        self.assertEqual(creds.address, "192.0.2.7")


def plain(authzid: bytes, authcid: bytes, passwd: bytes) -> bytes:
    return base64.b64encode(authzid + b"\x00" + authcid + b"\x00" + passwd)


class AuthenticateTests(ProxyServerTestCase):
    def test_saslIR(self):
        """AUTHENTICATE PLAIN with an initial response logs in with its user and password."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\n")
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("alice", TOKEN))
        self.assertEqual(self.output(), b"")

    def test_continuation(self):
        """AUTHENTICATE PLAIN without an initial response sends '+ ' and reads the next line."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.lines(), [b"+ "])
        self.send(plain(b"alice", b"alice", TOKEN.encode()) + b"\r\n")
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("alice", TOKEN))

    def test_lowerCaseMechanism(self):
        """The mechanism name is case-insensitive."""
        self.greeted()
        self.send(b"a authenticate plain " + plain(b"", b"alice", b"t") + b"\r\n")
        self.assertEqual(self.lastLogin()[0].account, "alice")

    def test_cancel(self):
        """'*' cancels the exchange with BAD; later commands work."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.output()
        self.send(b"*\r\nb NOOP\r\n")
        self.assertEqual(
            self.lines(), [b"a BAD Authentication cancelled", b"b OK NOOP No operation performed"]
        )
        self.assertEqual(self.portal.logins, [])

    def test_badBase64(self):
        """A response that is not base64 is BAD."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN !!!notbase64\r\n")
        self.assertEqual(self.lines(), [b"a BAD Invalid base64 in SASL response"])

    def test_badBase64Continuation(self):
        """A continuation response that is not base64 is BAD."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.output()
        self.send(b"%%%\r\n")
        self.assertEqual(self.lines(), [b"a BAD Invalid base64 in SASL response"])

    def test_malformed(self):
        """A PLAIN response without two NULs is BAD and does not echo the password."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN " + base64.b64encode(TOKEN.encode()) + b"\r\n")
        out = self.output()
        self.assertEqual(out, b"a BAD Malformed SASL PLAIN response\r\n")

    def test_otherAuthzid(self):
        """An authorization id other than the user is refused as a username mismatch."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN " + plain(b"bob", b"alice", b"t") + b"\r\n")
        self.assertEqual(
            self.lines(), [b"a NO [AUTHENTICATIONFAILED] Access denied, invalid username"]
        )
        self.assertEqual(self.portal.logins, [])

    def test_otherMechanism(self):
        """A mechanism other than PLAIN is refused with CANNOT."""
        self.greeted()
        self.send(b"a AUTHENTICATE XOAUTH2 dXNlcj0=\r\n")
        self.assertEqual(self.lines(), [b"a NO [CANNOT] Unsupported authentication mechanism"])


class LoginOutcomeTests(ProxyServerTestCase):
    def test_success(self):
        """On success the client gets exactly the tagged OK with the provider's capabilities."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        self.succeed(d, FakeUpstream(capabilities=[b"IMAP4rev1", b"IDLE", b"MOVE"]))
        self.assertEqual(
            self.output(), b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] alice authenticated\r\n"
        )

    def test_pipelinedAfterLogin(self):
        """Commands pipelined behind LOGIN go upstream byte for byte, unanswered by the proxy."""
        self.greeted()
        pipelined = b"b SELECT INBOX\r\nc NOOP\r\nd APPEND x {3+}\r\n\x00\xff\r\ne IDLE"
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n" + pipelined)
        self.assertEqual(self.output(), b"")
        self.assertEqual(self.transport.producerState, "paused")
        _, d = self.lastLogin()
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(self.output(), b"a OK [CAPABILITY IMAP4rev1 IDLE] alice authenticated\r\n")
        self.assertEqual(upstream.transport.value(), pipelined)
        self.send(b"\r\nf LOGOUT\r\n")
        self.assertEqual(upstream.transport.value(), pipelined + b"\r\nf LOGOUT\r\n")
        self.assertEqual(self.output(), b"")
        self.assertEqual(self.transport.producerState, "producing")

    def test_pipelinedArrivingWhileLoginPending(self):
        """Bytes that arrive while the login is pending are held and forwarded in order."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        self.send(b"c CAPABILITY\r\n")
        self.assertEqual(self.output(), b"")
        _, d = self.lastLogin()
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(upstream.transport.value(), b"b NOOP\r\nc CAPABILITY\r\n")

    def test_pipelinedAfterLiteralLogin(self):
        """Bytes behind a literal LOGIN password are forwarded, not parsed."""
        self.greeted()
        self.send(b"a LOGIN alice {64}\r\n")
        self.output()
        self.send(TOKEN.encode() + b"\r\nb SELECT INBOX\r\n")
        self.assertEqual(self.output(), b"")
        _, d = self.lastLogin()
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(upstream.transport.value(), b"b SELECT INBOX\r\n")

    def test_spliceBothWays(self):
        """After login upstream leftovers and later bytes reach the client, and vice versa."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        upstream = FakeUpstream(leftover=b"* 1 EXISTS\r\n")
        self.succeed(d, upstream)
        self.assertEqual(
            self.output(), b"a OK [CAPABILITY IMAP4rev1 IDLE] alice authenticated\r\n* 1 EXISTS\r\n"
        )
        upstream.sink(b"* 2 EXISTS\r\n")
        self.assertEqual(self.output(), b"* 2 EXISTS\r\n")
        self.send(b"b FETCH 1 BODY[]\r\n")
        self.assertEqual(upstream.transport.value(), b"b FETCH 1 BODY[]\r\n")
        self.assertIs(self.transport.producer, upstream.transport)
        self.assertIs(upstream.transport.producer, self.transport)

    def test_realUpstreamProtocol(self):
        """With a real logged-in UpstreamProtocol, its leftover and later bytes reach the client."""
        upstreamTransport = StringTransport()
        proto = UpstreamProtocol(XOAUTH2Authenticator(b"alice@example.com"), b"at", "plain")
        proto.makeConnection(upstreamTransport)
        proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n")
        proto.dataReceived(b"U1 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n* 4 EXISTS\r\n")
        self.assertIs(self.successResultOf(proto.ready), proto)
        upstreamTransport.clear()
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb SELECT INBOX\r\n")
        session = UpstreamSession(proto, "alice", "tid-1")
        self.lastLogin()[1].callback((IUpstreamSession, session, session.logout))
        self.assertEqual(
            self.output(),
            b"a OK [CAPABILITY IMAP4rev1 IDLE] alice authenticated\r\n* 4 EXISTS\r\n",
        )
        self.assertEqual(upstreamTransport.value(), b"b SELECT INBOX\r\n")
        self.assertEqual(upstreamTransport.producerState, "producing")
        proto.dataReceived(b"* OK [READ-WRITE] b done\r\n")
        self.assertEqual(self.output(), b"* OK [READ-WRITE] b done\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.sessions), 0)

    def test_sessionRegistered(self):
        """A spliced session is registered, and discarded when the client leaves."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(len(self.sessions), 1)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(upstream.transport.disconnecting)
        self.assertEqual(len(self.sessions), 0)

    def test_upstreamLostClosesClient(self):
        """When the upstream side ends the client connection is closed."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        upstream.onLost(Failure(ConnectionDone()))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.sessions), 0)

    def test_registryCloseByAccount(self):
        """SessionRegistry.close closes the sessions of one account (or token) only."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(self.sessions.close(account="bob"), 0)
        self.assertEqual(self.sessions.close(tokenId="other"), 0)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.sessions.close(account="alice", tokenId="tid-1"), 1)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(upstream.transport.disconnecting)

    def refusedWith(self, error: Exception, **kw) -> bytes:
        self.greeted(**kw)
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        d.errback(error)
        out = self.output()
        self.assertNotIn(TOKEN.encode(), out)
        return out

    def test_accessDeniedAddress(self):
        """AccessDenied('address') gives its fixed text."""
        out = self.refusedWith(AccessDenied("address"))
        self.assertEqual(
            out, b"a NO [AUTHENTICATIONFAILED] Access denied, traffic not accepted from this IP\r\n"
        )

    def test_unauthorizedLogin(self):
        """A plain UnauthorizedLogin gives the unknown-token text."""
        out = self.refusedWith(UnauthorizedLogin("no such token " + TOKEN))
        self.assertEqual(
            out, b"a NO [AUTHENTICATIONFAILED] Access denied, failed to authenticate user\r\n"
        )

    def test_unavailable(self):
        """A ProxyError Unavailable gives NO [UNAVAILABLE] with its fixed text."""
        out = self.refusedWith(Unavailable("upstream-timeout"))
        self.assertEqual(
            out, b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
        )

    def test_limit(self):
        """LimitReached gives NO [LIMIT]."""
        self.assertTrue(self.refusedWith(LimitReached()).startswith(b"a NO [LIMIT] "))

    def test_unexpectedError(self):
        """An unexpected exception gives NO [UNAVAILABLE] without the exception's text."""
        out = self.refusedWith(RuntimeError("database password is hunter2"))
        self.assertEqual(out, b"a NO [UNAVAILABLE] Internal error, try again later\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failedLoginThenCommandsWork(self):
        """After a refused login the connection accepts commands, pipelined ones included."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        _, d = self.lastLogin()
        d.errback(AccessDenied("expired"))
        self.assertEqual(
            self.lines(),
            [
                b"a NO [AUTHENTICATIONFAILED] Access denied, token expired",
                b"b OK NOOP No operation performed",
            ],
        )
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"c LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(len(self.portal.logins), 2)
        self.succeed(self.lastLogin()[1])
        self.assertEqual(self.lines(), [b"c OK [CAPABILITY IMAP4rev1 IDLE] alice authenticated"])

    def test_maxFailedLogins(self):
        """After maxFailedLogins refusals the server says BYE and closes."""
        self.greeted(policy=ServerPolicy(maxFailedLogins=2))
        for tag in (b"a", b"b"):
            self.send(tag + b" LOGIN alice " + TOKEN.encode() + b"\r\n")
            self.lastLogin()[1].errback(AccessDenied("unknown-token"))
        lines = self.lines()
        self.assertEqual(lines[-1], b"* BYE Too many failed logins")
        self.assertEqual(len(lines), 3)
        self.assertTrue(self.transport.disconnecting)
        self.send(b"c NOOP\r\n")
        self.assertEqual(self.output(), b"")

    def test_synchronousSuccess(self):
        """A portal that answers at once still forwards the pipelined bytes, once."""
        self.greeted()
        upstream = FakeUpstream()
        session = FakeSession(upstream)
        self.portal.login = lambda *a: succeed((IUpstreamSession, session, session.logout))
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        self.assertEqual(self.lines(), [b"a OK [CAPABILITY IMAP4rev1 IDLE] alice authenticated"])
        self.assertEqual(upstream.transport.value(), b"b NOOP\r\n")

    def test_synchronousFailure(self):
        """A portal that refuses at once still lets the pipelined commands run, in order."""
        self.greeted()
        self.portal.login = lambda *a: fail(AccessDenied("scope"))
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"a NO [AUTHENTICATIONFAILED] Access denied, invalid scope",
                b"b OK NOOP No operation performed",
            ],
        )

    def test_pipelinedAfterAuthenticate(self):
        """Bytes behind an AUTHENTICATE continuation response are forwarded, not parsed."""
        self.greeted()
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.output()
        self.send(plain(b"", b"alice", TOKEN.encode()) + b"\r\nb SELECT INBOX\r\n")
        upstream = FakeUpstream()
        self.succeed(self.lastLogin()[1], upstream)
        self.assertEqual(self.lines(), [b"a OK [CAPABILITY IMAP4rev1 IDLE] alice authenticated"])
        self.assertEqual(upstream.transport.value(), b"b SELECT INBOX\r\n")

    def test_tokenNotLogged(self):
        """No log event of a login, refused or spliced, carries the token."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted(policy=ServerPolicy(maxFailedLogins=10))
        for error in (AccessDenied("address"), Unavailable("upstream-limit"), UnauthorizedLogin()):
            self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
            self.lastLogin()[1].errback(error)
        self.send(b"b LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.succeed(self.lastLogin()[1])
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(events)
        self.assertNotIn(TOKEN, repr(events))

    def test_clientGoneThenSuccess(self):
        """If the client left while the login was pending, the new session is logged out."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        self.server.connectionLost(Failure(ConnectionDone()))
        session = self.succeed(d)
        self.assertEqual(session.loggedOut, 1)
        self.assertEqual(self.output(), b"")
        self.assertEqual(session.protocol.transport.value(), b"")
        self.assertEqual(len(self.sessions), 0)

    def test_clientGoneThenFailure(self):
        """If the client left while the login was pending, a refusal writes nothing."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        self.server.connectionLost(Failure(ConnectionDone()))
        d.errback(AccessDenied("unknown-token"))
        self.assertEqual(self.output(), b"")


class LimitsTests(ProxyServerTestCase):
    def test_maxBadCommands(self):
        """After maxBadCommands BAD responses the server says BYE and stops reading."""
        self.greeted(policy=ServerPolicy(maxBadCommands=3))
        self.send(b"a FOO\r\nb BAR\r\nc BAZ\r\nd NOOP\r\n")
        lines = self.lines()
        self.assertEqual(len(lines), 4, lines)
        self.assertEqual(lines[-1], b"* BYE Too many invalid commands")
        self.assertTrue(self.transport.disconnecting)

    def test_lineTooLong(self):
        """A command line longer than maxLineLength gets BYE."""
        self.greeted(policy=ServerPolicy(maxLineLength=100))
        self.send(b"a NOOP " + b"x" * 200 + b"\r\n")
        self.assertEqual(self.lines(), [b"* BYE Command line too long"])
        self.assertTrue(self.transport.disconnecting)

    def test_lineTooLongNoNewline(self):
        """An endless line without CRLF gets BYE too."""
        self.greeted(policy=ServerPolicy(maxLineLength=100))
        self.send(b"a LOGIN " + b"x" * 300)
        self.assertEqual(self.lines(), [b"* BYE Command line too long"])

    def test_loginTimeout(self):
        """No login within loginTimeout gets BYE; activity does not extend the deadline."""
        self.greeted(policy=ServerPolicy(loginTimeout=60))
        self.clock.advance(30)
        self.send(b"a NOOP\r\n")
        self.output()
        self.clock.advance(29)
        self.assertEqual(self.output(), b"")
        self.clock.advance(1)
        self.assertEqual(self.lines(), [b"* BYE Login timeout, closing connection"])
        self.assertTrue(self.transport.disconnecting)

    def test_noTimeoutAfterSplice(self):
        """Once spliced, the login timeout no longer fires."""
        self.greeted(policy=ServerPolicy(loginTimeout=60))
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.succeed(self.lastLogin()[1])
        self.output()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.assertEqual(self.output(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_timeoutWhileLoginPending(self):
        """A login still pending at the deadline gets BYE; its late session is logged out."""
        self.greeted(policy=ServerPolicy(loginTimeout=60))
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.clock.advance(60)
        self.assertEqual(self.lines(), [b"* BYE Login timeout, closing connection"])
        session = self.succeed(self.lastLogin()[1])
        self.assertEqual(session.loggedOut, 1)
        self.assertEqual(self.output(), b"")

    def test_byeWhilePausedResumesAndCutsAPeerThatStays(self):
        """BYE during a pending login resumes reading (TLS close) and aborts a peer that stays."""
        self.greeted(policy=ServerPolicy(loginTimeout=60))
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(60)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertTrue(self.transport.disconnecting)
        self.send(b"x" * 100000)  # a closing connection reads nothing into memory
        self.assertEqual(self.server.clearLineBuffer(), b"")
        self.clock.advance(ProxyServer.BYE_GRACE)
        self.assertTrue(self.transport.disconnected)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.succeed(self.lastLogin()[1])

    def test_commandsBeforeLoginAreBounded(self):
        """Even valid commands are capped before login (a peer that never reads)."""
        self.greeted(policy=ServerPolicy(maxCommands=5))
        self.send(b"".join(b"n%d NOOP\r\n" % i for i in range(8)))
        lines = self.lines()
        self.assertEqual(len([ln for ln in lines if b" OK " in ln]), 5)
        self.assertEqual(lines[-1], b"* BYE Too many commands before login")
        self.assertTrue(self.transport.disconnecting)

    def test_timeoutCancelledOnDisconnect(self):
        """A client that disconnects leaves no timer behind."""
        self.greeted()
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HelpersTests(SynchronousTestCase):
    def test_isLoopback(self):
        """isLoopback recognizes IPv4, IPv6 and IPv4-mapped loopback, nothing else."""
        for a in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(isLoopback(a), a)
        for a in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::1", "unknown", ""):
            self.assertFalse(isLoopback(a), a)

    def test_policyValidates(self):
        """ServerPolicy refuses an unknown plaintext-login policy."""
        self.assertRaises(ValueError, ServerPolicy, plaintextLogin="sometimes")

    def test_factoryBuildsServer(self):
        """ProxyFactory builds ProxyServers sharing its portal, policy, TLS options and registry."""
        portal, policy, ctx = FakePortal(), ServerPolicy(maxLiteral=7), object()
        factory = ProxyFactory(portal, policy, ctx)
        p = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(p, ProxyServer)
        self.assertIs(p.portal, portal)
        self.assertIs(p.policy, policy)
        self.assertIs(p.ctx, ctx)
        self.assertIs(p._sessions, factory.sessions)
        self.assertIs(p.factory, factory)
