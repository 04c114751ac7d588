"""
Tests for ``proxy.imap``: the pre-auth ``ProxyServer`` over a
``StringTransport``, with a fake portal whose logins the test decides and a
fake logged-in upstream, so no store, network or reactor is involved.
"""

from __future__ import annotations

import base64
import re
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
        # Still read (a client that leaves is seen), not parsed.
        self.assertEqual(self.transport.producerState, "producing")
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

    def test_aSplicedSessionKeepsItsAttributesFew(self):
        """
        A spliced session's server has at most 30 attributes: past that
        CPython (3.11) stops sharing an instance dictionary's keys with the
        other instances, and each idle session holds about 1.2 KiB more.
        """
        server = self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        self.succeed(d, FakeUpstream())
        self.assertIsNotNone(server.splice)
        self.assertLessEqual(len(vars(server)), 30, sorted(vars(server)))

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
        # One log line, no traceback (test_imap_held.py).
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])

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


class CommandSyntaxTests(ProxyServerTestCase):
    """Arguments are parsed strictly, and every mistake gets a fixed BAD."""

    def assertAnswers(self, data: bytes, expected: list[bytes]) -> None:
        self.send(data)
        self.assertEqual(self.lines(), expected)
        self.assertEqual(self.portal.logins, [])

    def test_loginWithoutArguments(self):
        """LOGIN with no argument at all is a fixed BAD, not an internal error."""
        self.greeted()
        self.assertAnswers(b"a LOGIN\r\n", [b"a BAD Syntax error: Missing argument"])

    def test_strictLiteralSizes(self):
        """Only { digits } and { digits +} are literals; anything else is Bad literal size."""
        for bad in (b"{-1}", b"{1_0}", b"{ 5}", b"{5 }", b"{+5}", b"{5++}", b"{0x5}", b"{}"):
            self.greeted()
            self.assertAnswers(
                b"a LOGIN alice " + bad + b"\r\n", [b"a BAD Syntax error: Bad literal size"]
            )

    def test_hugeLiteralCount(self):
        """A literal count of any length is Literal too long, without a continuation."""
        self.greeted()
        self.assertAnswers(
            b"a LOGIN alice {" + b"9" * 5000 + b"}\r\n", [b"a BAD Syntax error: Literal too long"]
        )

    def test_nonSynchronizingLiteral(self):
        """A {N+} literal is read without a continuation."""
        self.greeted()
        self.send(b"a LOGIN alice {64+}\r\n" + TOKEN.encode() + b"\r\n")
        self.assertEqual(self.output(), b"")
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("alice", TOKEN))

    def test_nonSynchronizingLiteralTooLong(self):
        """A {N+} literal past max-literal closes: its data would be read as commands."""
        self.greeted(policy=ServerPolicy(maxLiteral=100))
        self.send(b"a LOGIN alice {101+}\r\n")
        self.assertEqual(self.lines(), [b"* BYE Literal too long"])
        self.assertTrue(self.transport.disconnecting)

    def test_emptyLiterals(self):
        """{0} literals are empty strings."""
        self.greeted()
        self.send(b"a LOGIN {0}\r\n {0}\r\n\r\n")
        self.assertEqual(self.lines(), [b"+ Ready for 0 octets of text"] * 2)
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ("", ""))

    def test_literalOfRefusedCommandIsReadPast(self):
        """A {N+} literal of an unknown command is skipped, not run as commands."""
        self.greeted()
        self.assertAnswers(
            b"a APPEND INBOX {10+}\r\nc LOGOUT\r\n\r\nb NOOP\r\n",
            [
                b"a BAD Command unknown or not valid before login",
                b"b OK NOOP No operation performed",
            ],
        )
        self.assertFalse(self.transport.disconnecting)

    def test_synchronizingLiteralOfRefusedCommand(self):
        """A refused command announcing {N} is answered at once, with no continuation."""
        self.greeted()
        self.assertAnswers(
            b"a APPEND INBOX {10}\r\n", [b"a BAD Command unknown or not valid before login"]
        )
        self.greeted()
        self.assertAnswers(b"a NOOP {3}\r\n", [b"a BAD Syntax error: Too many arguments"])

    def test_quotedStrings(self):
        """Quoted strings unescape \\" and \\\\, and may hold UTF-8."""
        self.greeted()
        self.send(b'a LOGIN "al\\"i\\\\ce\xc3\xa9" "' + TOKEN.encode() + b'"\r\n')
        creds, _ = self.lastLogin()
        self.assertEqual((creds.account, creds.token), ('al"i\\ce\u00e9', TOKEN))

    def test_malformedArguments(self):
        """NULs, 8-bit atoms, bad escapes, stray spaces and parentheses get fixed BADs."""
        cases = [
            (b"a LOGIN a\x00b c", b"Syntax error: Malformed atom"),
            (b"a LOGIN \xff\xfe c", b"Syntax error: Malformed atom"),
            (b'a LOGIN "a\\b" c', b"Syntax error: Malformed quoted string"),
            (b'a LOGIN "a\x00" c', b"Syntax error: Malformed quoted string"),
            (b'a LOGIN "abc c', b"Syntax error: Unmatched quotes"),
            (b"a LOGIN alice  pass", b"Syntax error"),
            (b"a LOGIN alice pass ", b"Syntax error"),
            (b"a LOGIN (x) y", b"Syntax error: Too many arguments"),
            (b"a LOGIN alice {5} x", b"Syntax error: Malformed literal"),
            (b"a NOOP x", b"Syntax error: Too many arguments"),
            (b"a CAPABILITY x y z", b"Syntax error: Too many arguments"),
            (b"a AUTHENTICATE", b"Syntax error: Missing argument"),
            (b"a AUTHENTICATE PLAIN a b", b"Syntax error: Too many arguments"),
            (b'a AUTHENTICATE "PLAIN"', b"Syntax error: Malformed atom"),
            (b"a ID", b"Syntax error: Missing argument"),
            (b"a ID (x)", b"Syntax error"),
        ]
        for line, text in cases:
            self.greeted()
            self.assertAnswers(line + b"\r\n", [b"a BAD " + text])

    def test_malformedTag(self):
        """A tag with a character no tag may have gets an untagged BAD."""
        self.greeted()
        self.assertAnswers(b"a*b NOOP\r\n+ NOOP\r\n", [b"* BAD Syntax error: Malformed tag"] * 2)

    def test_idWithLiteral(self):
        """ID's values may be literals; they are read and ignored."""
        self.greeted()
        self.send(b'a ID ("name" {3}\r\nfoo "os" NIL)\r\n')
        lines = self.lines()
        self.assertEqual(lines[0], b"+ Ready for 3 octets of text")
        self.assertEqual(lines[-1], b"a OK ID completed")

    def test_commandWithLiteralsIsBounded(self):
        """A command cannot grow past max-line-length plus two literals."""
        self.greeted(policy=ServerPolicy(maxLineLength=100, maxLiteral=50))
        self.send(b'a ID ("a" {50+}\r\n' + b"x" * 50 + b' "b" {50+}\r\n' + b"y" * 50)
        self.send(b' "c" {50+}\r\n' + b"z" * 50 + b' "d" {50+}\r\n' + b"w" * 50 + b")\r\n")
        self.assertEqual(self.lines(), [b"* BYE Command line too long"])

    def test_tokenNeverEchoed(self):
        """No refusal of a malformed login quotes the token."""
        for line in (
            b"a LOGIN alice " + TOKEN.encode() + b"\x00",
            b"a LOGIN alice {" + TOKEN.encode() + b"}",
            b'a LOGIN alice "' + TOKEN.encode() + b"\\x",
            b"a LOGIN alice " + TOKEN.encode() + b" " + TOKEN.encode(),
        ):
            self.greeted()
            self.send(line + b"\r\n")
            out = self.output()
            self.assertTrue(out.startswith(b"a BAD Syntax error"), out)
            self.assertNotIn(TOKEN[:16].encode(), out)


def corpus() -> Any:
    """Inputs for the fuzz test: pre-auth commands with 0-3 arguments in every form."""
    from hypothesis import strategies as st

    token = st.sampled_from([TOKEN.encode(), b"alice", b"", b"x" * 300])
    atom = st.binary(max_size=12) | token
    quoted = st.builds(
        lambda v, end: b'"' + v + end,
        st.binary(max_size=12) | token,
        st.sampled_from([b'"', b"", b'\\"', b"\\"]),
    )
    count = st.sampled_from(
        [b"0", b"5", b"-1", b"1_0", b" 5", b"4097", b"9" * 30, b"", b"+", b"0x5"]
    )
    literal = st.builds(
        lambda n, plus, data: b"{" + n + plus + b"}\r\n" + data,
        count,
        st.sampled_from([b"", b"+"]),
        st.binary(max_size=8),
    )
    argument = (
        atom
        | quoted
        | literal
        | st.sampled_from([b"(", b")", b"NIL", b"\x00", b"\xff", b"=", b"*"])
    )
    command = st.sampled_from(
        [
            b"LOGIN",
            b"AUTHENTICATE",
            b"AUTHENTICATE PLAIN",
            b"ID",
            b"NOOP",
            b"CAPABILITY",
            b"STARTTLS",
            b"SELECT",
            b"login",
            b"",
        ]
    )
    tag = st.sampled_from([b"a", b"A1", b"*", b"+", b"", b"a\x00", b"\xff"])
    line = st.builds(
        lambda t, c, args, sep: t + b" " + c + b"".join(sep + a for a in args),
        tag,
        command,
        st.lists(argument, max_size=3),
        st.sampled_from([b" ", b"  ", b"", b"\t"]),
    )
    lines = st.lists(line | st.binary(max_size=40), min_size=1, max_size=6)
    return st.builds(
        lambda ls, end: b"".join(x + end for x in ls),
        lines,
        st.sampled_from([b"\r\n", b"\n", b"\r"]),
    )


# Everything the server may say before login, the tag aside.
_FIXED = re.compile(
    rb"\A(?:"
    rb"(?:\S+ BAD (?:Missing command|Command unknown or not valid before login|Syntax error"
    rb"(?:: (?:Missing argument|Too many arguments|Unmatched quotes|Malformed quoted string"
    rb"|Malformed atom|Malformed literal|Bad literal size|Literal too long|Malformed tag))?"
    rb"|Invalid base64 in SASL response|Malformed SASL PLAIN response|Authentication cancelled"
    rb"|TLS already active))"
    rb"|\+ Ready for \d+ octets of text|\+ "
    rb"|\* BYE (?:Too many invalid commands|Too many commands before login|Command line too long"
    rb"|Literal too long|Too many failed logins|imapproxy logging out|Internal error)"
    rb"|\* CAPABILITY [A-Za-z0-9= -]+|\* ID \(.*\)"
    rb"|\S+ OK (?:NOOP No operation performed|CAPABILITY completed|ID completed|LOGOUT completed)"
    rb"|\S+ NO (?:\[CANNOT\] (?:TLS not available|Unsupported authentication mechanism)"
    rb"|\[PRIVACYREQUIRED\] Login without TLS is not allowed"
    rb"|\[AUTHENTICATIONFAILED\] Access denied, (?:invalid username|failed to authenticate user))"
    rb")\Z"
)


class FuzzTests(SynchronousTestCase):
    """Whatever a client sends, the answers are fixed texts and nothing is logged."""

    def feed(self, data: bytes, chunk: int) -> tuple[bytes, list[dict]]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            clock = task.Clock()
            portal = FakePortal()
            portal.login = lambda *a: fail(UnauthorizedLogin())  # type: ignore[method-assign]
            server = ProxyServer(portal, ServerPolicy(maxLiteral=4096), None, SessionRegistry())
            server.callLater = clock.callLater
            transport = StringTransport()
            transport.peerAddr = IPv4Address("TCP", "127.0.0.1", 1)
            server.makeConnection(transport)
            for i in range(0, len(data), chunk):
                server.dataReceived(data[i : i + chunk])
            server.connectionLost(Failure(ConnectionDone()))
            clock.advance(ProxyServer.BYE_GRACE)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return transport.value(), events

    def test_fuzz(self):
        """No input logs a traceback or anything critical; every answer is a fixed text."""
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(corpus(), st.sampled_from([1, 7, 100000]))
        def check(data: bytes, chunk: int) -> None:
            out, events = self.feed(data, chunk)
            # The text lines: a refused login's audit event has no text.
            events = [e for e in events if e.get("event") != "login"]
            for e in events:
                self.assertNotIn("log_failure", e)
                self.assertNotIn(e["log_level"].name, ("critical", "error"))
            self.assertLessEqual(len(events), 1)
            lines = out.split(b"\r\n")
            self.assertEqual(lines[-1], b"")
            for line in lines[1:-1]:
                self.assertRegex(line, _FIXED)
                self.assertNotIn(TOKEN.encode(), line.split(b" ", 1)[-1])

        check()

    def test_loginFloodLogsNothing(self):
        """The finding: 'a LOGIN' repeated logs nothing at all, and ends in BYE."""
        out, events = self.feed(b"a LOGIN\r\n" * 20, 100000)
        self.assertEqual(events, [])
        self.assertEqual(out.count(b"a BAD Syntax error: Missing argument"), 10)
        self.assertIn(b"* BYE Too many invalid commands", out)


class InternalErrorTests(ProxyServerTestCase):
    def test_bugClosesWithOneLineAndNoTraceback(self):
        """A bug while handling a command: BYE, one log line without input or traceback."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted()

        def broken(*args: Any) -> Deferred:
            raise RuntimeError("broken portal " + TOKEN)

        self.portal.login = broken  # type: ignore[method-assign]
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        self.assertEqual(self.lines(), [b"* BYE Internal error"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(events), 1)
        self.assertNotIn("log_failure", events[0])
        self.assertNotIn(TOKEN, repr(events))
        self.assertEqual(events[0]["error"], "RuntimeError")
        self.clock.advance(ProxyServer.BYE_GRACE)


class PureParsingTests(SynchronousTestCase):
    """The pure parsers raise only their own errors, with fixed texts."""

    def test_anyBytes(self):
        """tokenize, splitCommand, trailingLiteral and parsePlain never raise anything else."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from proxy.imap import SASLError, parsePlain
        from proxy.imap.syntax import (
            CommandSyntaxError,
            splitCommand,
            tokenize,
            trailingLiteral,
        )

        @settings(max_examples=500, deadline=None)
        @given(st.binary(max_size=64) | st.sampled_from([b"{5}", b"{5+}", b' "a\\"', b" (x)"]))
        def check(data: bytes) -> None:
            for parse in (tokenize, splitCommand, trailingLiteral):
                try:
                    parse(data)
                except CommandSyntaxError as e:
                    self.assertTrue(e.text.startswith((b"Syntax error", b"Missing command")))
            try:
                parsePlain(data)
            except SASLError as e:
                self.assertIn(
                    e.text,
                    (
                        b"Authentication cancelled",
                        b"Invalid base64 in SASL response",
                        b"Malformed SASL PLAIN response",
                    ),
                )

        check()

    def test_parsePlain(self):
        """PLAIN messages split in three; the password stays out of the repr."""
        from proxy.imap import SASLError, parsePlain

        plainResponse = parsePlain(plain(b"", b"alice", TOKEN.encode()))
        self.assertEqual(
            (plainResponse.authcid, plainResponse.password), (b"alice", TOKEN.encode())
        )
        self.assertTrue(plainResponse.sameIdentity)
        self.assertNotIn(TOKEN, repr(plainResponse))
        self.assertFalse(parsePlain(plain(b"bob", b"alice", b"t")).sameIdentity)
        for bad, text in (
            (b"*", b"Authentication cancelled"),
            (b"!!", b"Invalid base64 in SASL response"),
            (b"=", b"Malformed SASL PLAIN response"),
        ):
            with self.assertRaises(SASLError) as e:
                parsePlain(bad)
            self.assertEqual(e.exception.text, text)


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
        # Past MAX_HELD octets behind the LOGIN: reading paused.
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n" + b"y" * ProxyServer.MAX_HELD)
        self.send(b"y")
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
