"""
Tests for ``proxy.smtp``'s pre-auth ``SubmissionServer`` over a
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
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy.cred import ISubmissionSession, TokenCredentials
from proxy.errors import AccessDenied, AuthenticationFailed, Unavailable
from proxy.imap import ServerPolicy, SessionRegistry
from proxy.limits import SMTP, ConnectionLimiter, LimitedFactory, Limits
from proxy.smtp import ProviderExtensions, SubmissionFactory, SubmissionServer
from proxy.store import StoreUnavailable
from tests.test_imap import (
    TOKEN,
    FakePortal,
    FakeUpstream,
    NegotiatedTransport,
    TLSStringTransport,
)

HOST = b"mx.test"
PROVIDER = [b"SIZE 35882577", b"8BITMIME", b"PIPELINING", b"AUTH XOAUTH2", b"CHUNKING"]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    return b64(authzid + b"\x00" + authcid + b"\x00" + password)


@attrs.define(eq=False)
class FakeSubmission:
    """A logged-in SMTP upstream session as the realm hands it over."""

    protocol: FakeUpstream
    account: str = "alice"
    tokenId: str = "tid-1"
    server: str = "smtp.example:587"
    extensions: list[bytes] = attrs.Factory(lambda: list(PROVIDER))
    loggedOut: int = 0

    def logout(self) -> None:
        self.loggedOut += 1


class SMTPTestCase(SynchronousTestCase):
    """Helpers: connect a SubmissionServer and talk to it line by line."""

    def connect(
        self,
        address: str = "127.0.0.1",
        policy: ServerPolicy | None = None,
        contextFactory: Any = None,
        transport: StringTransport | None = None,
        extensions: ProviderExtensions | None = None,
    ) -> SubmissionServer:
        self.clock = task.Clock()
        self.portal = FakePortal()
        self.sessions = SessionRegistry()
        self.extensions = extensions if extensions is not None else ProviderExtensions()
        factory = SubmissionFactory(
            self.portal,
            policy or ServerPolicy(),
            contextFactory,
            self.sessions,
            self.extensions,
            self.clock,
            hostname=HOST.decode(),
        )
        peer = (IPv6Address if ":" in address else IPv4Address)("TCP", address, 54321)
        self.server = factory.buildProtocol(peer)
        self.transport = transport or StringTransport()
        self.transport.peerAddr = peer
        self.server.makeConnection(self.transport)
        self.addCleanup(self.disconnect)
        return self.server

    def disconnect(self) -> None:
        if self.server._phase != "closed" or self.server.connected:
            self.server.connectionLost(Failure(ConnectionDone()))
            self.server.connected = False
        self.clock.advance(SubmissionServer.BYE_GRACE)
        self.assertEqual(self.clock.getDelayedCalls(), [], "a timer was left behind")

    def send(self, data: bytes) -> None:
        self.server.dataReceived(data)

    def output(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def lines(self) -> list[bytes]:
        data = self.output()
        self.assertTrue(data == b"" or data.endswith(b"\r\n"), data)
        return data.split(b"\r\n")[:-1]

    def greeted(self, ehlo: bool = True, **kw: Any) -> SubmissionServer:
        server = self.connect(**kw)
        if ehlo:
            self.send(b"EHLO client.example\r\n")
        self.output()
        return server

    def lastLogin(self) -> tuple[Any, Deferred]:
        self.assertTrue(self.portal.logins, "the portal was not asked")
        creds, _mind, _ifaces, d = self.portal.logins[-1]
        return creds, d

    def succeed(self, d: Deferred, upstream: FakeUpstream | None = None, **kw: Any):
        session = FakeSubmission(upstream or FakeUpstream(), **kw)
        d.callback((ISubmissionSession, session, session.logout))
        return session

    def authPlain(self, after: bytes = b"") -> Deferred:
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\n" + after)
        return self.lastLogin()[1]


class GreetingAndEhloTests(SMTPTestCase):
    def test_greeting(self):
        """The greeting names the host, the proxy and the client's address."""
        self.connect()
        self.assertEqual(
            self.lines(), [b"220 mx.test imapproxy ESMTP ready for requests from 127.0.0.1"]
        )
        self.connect(address="::1")
        self.assertEqual(self.lines(), [b"220 mx.test imapproxy ESMTP ready for requests from ::1"])

    def test_ehloFirstConnection(self):
        """Nothing learned yet: no extension, only AUTH (loopback without TLS)."""
        self.greeted(ehlo=False)
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.lines(), [b"250-mx.test Hello 127.0.0.1", b"250 AUTH PLAIN LOGIN"])

    def test_ehloOffersLearnedExtensions(self):
        """The learned providers' common extensions, then STARTTLS and AUTH."""
        cache = ProviderExtensions()
        cache.learn("a:587", [b"SIZE 100", b"PIPELINING", b"8BITMIME", b"STARTTLS", b"AUTH LOGIN"])
        cache.learn("b:465", [b"SIZE 50", b"PIPELINING", b"DSN"])
        self.greeted(
            ehlo=False, extensions=cache, contextFactory=object(), transport=TLSStringTransport()
        )
        self.send(b"ehlo client.example\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"250-mx.test Hello 127.0.0.1",
                b"250-SIZE 50",
                b"250-PIPELINING",
                b"250-STARTTLS",
                b"250 AUTH PLAIN LOGIN",
            ],
        )

    def test_remotePlaintextNotOfferedAuth(self):
        """A non-loopback client without TLS is offered STARTTLS, not AUTH."""
        self.greeted(
            ehlo=False, address="192.0.2.7", contextFactory=object(), transport=TLSStringTransport()
        )
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.lines(), [b"250-mx.test Hello 192.0.2.7", b"250 STARTTLS"])
        self.greeted(ehlo=False, address="192.0.2.7")
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.lines(), [b"250 mx.test Hello 192.0.2.7"])

    def test_plaintextPolicies(self):
        """allow offers AUTH to anyone without TLS; deny to no one; loopback is loopback."""
        for address, policy, offered in (
            ("192.0.2.7", "allow", True),
            ("127.0.0.1", "deny", False),
            ("::ffff:127.0.0.1", "loopback", True),
            ("192.0.2.7", "loopback", False),
        ):
            self.greeted(ehlo=False, address=address, policy=ServerPolicy(plaintextLogin=policy))
            self.send(b"EHLO c\r\n")
            self.assertEqual(b"250 AUTH PLAIN LOGIN" in self.lines(), offered, (address, policy))

    def test_implicitTLS(self):
        """Over TLS (an INegotiated transport) AUTH is offered to anyone, STARTTLS not."""
        self.greeted(
            ehlo=False,
            address="192.0.2.7",
            contextFactory=object(),
            transport=NegotiatedTransport(),
        )
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.lines(), [b"250-mx.test Hello 192.0.2.7", b"250 AUTH PLAIN LOGIN"])
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.lastLogin()[0].address, "192.0.2.7")

    def test_ehloNeedsAName(self):
        """EHLO or HELO without a usable name is a syntax error."""
        self.greeted(ehlo=False)
        self.send(b"EHLO\r\nHELO \r\nEHLO a\x00b\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"501 5.5.4 Syntax: EHLO hostname",
                b"501 5.5.4 Syntax: HELO hostname",
                b"501 5.5.4 Syntax: EHLO hostname",
            ],
        )

    def test_heloIsNotEnoughForAuth(self):
        """HELO is answered, but AUTH is an extension: it needs EHLO."""
        self.greeted(ehlo=False)
        self.send(b"HELO client.example\r\nAUTH PLAIN\r\n")
        self.assertEqual(
            self.lines(), [b"250 mx.test Hello 127.0.0.1", b"503 5.5.1 Send EHLO first"]
        )
        self.assertEqual(self.portal.logins, [])

    def test_authBeforeEhlo(self):
        """AUTH before EHLO: 503."""
        self.greeted(ehlo=False)
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.lines(), [b"503 5.5.1 Send EHLO first"])
        self.assertEqual(self.portal.logins, [])

    def test_noopRsetQuit(self):
        """NOOP and RSET are answered; QUIT says goodbye and closes."""
        self.greeted()
        self.send(b"NOOP\r\nnoop hello\r\nRSET\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(
            self.lines(), [b"250 2.0.0 Ok", b"250 2.0.0 Ok", b"250 2.0.0 Ok", b"221 2.0.0 Bye"]
        )
        self.assertTrue(self.transport.disconnecting)

    def test_transactionNeedsAuth(self):
        """MAIL, RCPT, DATA, VRFY and EXPN before AUTH: 530."""
        self.greeted(policy=ServerPolicy(maxBadCommands=20))
        self.send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            b"VRFY bob\r\nEXPN list\r\n"
        )
        self.assertEqual(self.lines(), [b"530 5.7.0 Authentication required"] * 5)

    def test_bdatDataIsReadPast(self):
        """BDAT before AUTH: 530, and its chunk is skipped, never read as commands."""
        self.greeted()
        self.send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(self.lines(), [b"530 5.7.0 Authentication required", b"250 2.0.0 Ok"])
        self.send(b"BDAT 6\r\nQU")
        self.send(b"IT\r\nNOOP\r\n")
        self.assertEqual(self.lines(), [b"530 5.7.0 Authentication required", b"250 2.0.0 Ok"])
        self.assertFalse(self.transport.disconnecting)

    def test_bdatSyntax(self):
        """A BDAT whose size cannot be read is a syntax error."""
        self.greeted()
        self.send(b"BDAT\r\nBDAT x\r\nBDAT 5 FIRST\r\nBDAT -1\r\n")
        self.assertEqual(self.lines(), [b"501 5.5.4 Syntax error in parameters"] * 4)

    def test_unknownCommands(self):
        """Unknown commands, empty lines and junk: 500."""
        self.greeted()
        self.send(b"HELP\r\n\r\nSTARTTLSX\r\n\xff\xfe\r\nsmtp_EHLO x\r\n")
        self.assertEqual(self.lines(), [b"500 5.5.2 Command not recognized"] * 5)

    def test_bareLineFeeds(self):
        """Lines ended by a bare LF are read too."""
        self.greeted()
        self.send(b"NOOP\nRSET\n")
        self.assertEqual(self.lines(), [b"250 2.0.0 Ok", b"250 2.0.0 Ok"])


class StartTLSTests(SMTPTestCase):
    def test_starttls(self):
        """STARTTLS starts TLS; the EHLO state is reset; then a remote client may AUTH."""
        ctx = object()
        self.greeted(address="192.0.2.7", contextFactory=ctx, transport=TLSStringTransport())
        self.send(b"STARTTLS\r\n")
        self.assertEqual(self.lines(), [b"220 2.0.0 Ready to start TLS"])
        self.assertIs(self.transport.tlsOptions, ctx)
        # RFC 3207: the client must EHLO again.
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.lines(), [b"503 5.5.1 Send EHLO first"])
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.lines(), [b"250-mx.test Hello 192.0.2.7", b"250 AUTH PLAIN LOGIN"])
        self.send(b"STARTTLS\r\n")
        self.assertEqual(self.lines(), [b"503 5.5.1 TLS already active"])

    def test_injectionDiscarded(self):
        """Commands pipelined behind STARTTLS in the clear are dropped, not run inside TLS."""
        self.greeted(address="192.0.2.7", contextFactory=object(), transport=TLSStringTransport())
        self.send(
            b"STARTTLS\r\nEHLO evil\r\nAUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\n"
        )
        self.assertEqual(self.lines(), [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(self.portal.logins, [])
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.lines(), [b"503 5.5.1 Send EHLO first"])

    def test_remoteAuthWithoutTLSRefused(self):
        """A remote client's AUTH without TLS: 530, counted as a failed AUTH, never checked."""
        self.greeted(address="192.0.2.7", contextFactory=object(), transport=TLSStringTransport())
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\nAUTH LOGIN\r\n")
        self.assertEqual(self.lines(), [b"530 5.7.0 Must issue a STARTTLS command first"] * 2)
        self.assertEqual(self.portal.logins, [])
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"530 5.7.0 Must issue a STARTTLS command first",
                b"421 4.7.0 mx.test Too many failed authentications",
            ],
        )

    def test_notAvailable(self):
        """Without a certificate STARTTLS is neither offered nor started."""
        self.greeted(transport=TLSStringTransport())
        self.send(b"STARTTLS\r\nSTARTTLS now\r\n")
        self.assertEqual(
            self.lines(), [b"454 4.7.0 TLS not available", b"501 5.5.4 Syntax error in parameters"]
        )
        self.assertIsNone(self.transport.tlsOptions)


class AuthExchangeTests(SMTPTestCase):
    def test_plainInitialResponse(self):
        """AUTH PLAIN with an initial response asks the portal; nothing is answered yet."""
        self.greeted()
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.output(), b"")
        creds, mind, ifaces, d = self.portal.logins[0]
        self.assertEqual(
            creds,
            TokenCredentials(account="alice", token=TOKEN, address="127.0.0.1", protocol="smtp"),
        )
        self.assertEqual(mind, "client.example")
        self.assertEqual(ifaces, (ISubmissionSession,))
        self.assertNoResult(d)
        self.assertEqual(
            self.transport.producerState, "producing"
        )  # held, but read: a leaving client is seen

    def test_plainContinuation(self):
        """AUTH PLAIN alone gets an empty challenge; the next line is the response."""
        self.greeted()
        self.send(b"auth plain\r\n")
        self.assertEqual(self.lines(), [b"334 "])
        self.send(plain(b"alice", b"alice", TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.lastLogin()[0].account, "alice")

    def test_login(self):
        """AUTH LOGIN asks for the user name, then the password, in base64."""
        self.greeted()
        self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(self.lines(), [b"334 VXNlcm5hbWU6"])
        self.send(b64(b"alice") + b"\r\n")
        self.assertEqual(self.lines(), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(self.portal.logins, [])
        self.send(b64(TOKEN.encode()) + b"\r\n")
        creds, _d = self.lastLogin()
        self.assertEqual((creds.account, creds.token, creds.protocol), ("alice", TOKEN, "smtp"))

    def test_loginInitialResponse(self):
        """AUTH LOGIN with the user name as initial response asks for the password."""
        self.greeted()
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.assertEqual(self.lines(), [b"334 UGFzc3dvcmQ6"])
        self.send(b64(TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.lastLogin()[0].token, TOKEN)

    def test_cancel(self):
        """'*' cancels the exchange at any step: 501 5.7.0."""
        self.greeted()
        self.send(
            b"AUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n*\r\nAUTH LOGIN\r\n" + b64(b"a") + b"\r\n*\r\n"
        )
        self.assertEqual(
            self.lines(),
            [
                b"334 ",
                b"501 5.7.0 Authentication aborted",
                b"334 VXNlcm5hbWU6",
                b"501 5.7.0 Authentication aborted",
                b"334 VXNlcm5hbWU6",
                b"334 UGFzc3dvcmQ6",
                b"501 5.7.0 Authentication aborted",
            ],
        )
        self.assertEqual(self.portal.logins, [])

    def test_badBase64(self):
        """Responses that are not base64, or not PLAIN messages: 501 5.5.2."""
        self.greeted()
        self.send(b"AUTH PLAIN !!!\r\nAUTH LOGIN\r\nnot base64\r\nAUTH PLAIN =\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"501 5.5.2 Invalid base64 data",
                b"334 VXNlcm5hbWU6",
                b"501 5.5.2 Invalid base64 data",
                b"501 5.5.2 Malformed SASL PLAIN response",
            ],
        )

    def test_otherAuthzid(self):
        """Acting as someone else is refused without asking the portal."""
        self.greeted()
        self.send(b"AUTH PLAIN " + plain(b"bob", b"alice", TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.lines(), [b"535 5.7.8 Access denied, invalid username"])
        self.assertEqual(self.portal.logins, [])

    def test_notUTF8(self):
        """A user name that is not UTF-8 is an invalid user name."""
        self.greeted()
        self.send(b"AUTH PLAIN " + plain(b"", b"\xff", TOKEN.encode()) + b"\r\n")
        self.assertEqual(self.lines(), [b"535 5.7.8 Access denied, invalid username"])

    def test_otherMechanismOrSyntax(self):
        """Unknown mechanisms: 504; no mechanism or too many words: 501."""
        self.greeted()
        self.send(b"AUTH XOAUTH2 abc\r\nAUTH\r\nAUTH PLAIN a b\r\n")
        self.assertEqual(
            self.lines(),
            [
                b"504 5.5.4 Unrecognized authentication type",
                b"501 5.5.4 Syntax error in parameters",
                b"501 5.5.4 Syntax error in parameters",
            ],
        )


class LoginOutcomeTests(SMTPTestCase):
    def test_success(self):
        """235 after the provider's; the session is registered and its EHLO learned."""
        self.greeted()
        d = self.authPlain()
        session = self.succeed(d)
        self.assertEqual(self.lines(), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(len(self.sessions), 1)
        self.assertTrue(self.extensions.knows("smtp.example:587"))
        self.assertEqual(
            self.extensions.offered(), [b"SIZE 35882577", b"8BITMIME", b"PIPELINING", b"CHUNKING"]
        )
        self.assertIs(self.transport.producer, session.protocol.transport)
        self.assertIsNone(self.server.timeOut)

    def test_pipelinedAfterAuth(self):
        """What follows AUTH, BDAT binary included, goes upstream byte for byte, unanswered."""
        self.greeted()
        pipelined = (
            b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.com>\r\n"
            b"BDAT 7 LAST\r\n\x00\xff\r\nQUIT\r\nDATA\r\n.\r\n"
        )
        d = self.authPlain(pipelined[:30])
        self.send(pipelined[30:])
        self.assertEqual(self.output(), b"")
        self.assertEqual(self.transport.producerState, "producing")  # held unparsed, still read
        upstream = FakeUpstream(leftover=b"250 2.1.0 Ok\r\n")
        self.succeed(d, upstream)
        self.assertEqual(self.output(), b"235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n")
        self.assertEqual(upstream.transport.value(), pipelined)
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"QUIT\r\n")
        self.assertEqual(upstream.transport.value(), pipelined + b"QUIT\r\n")
        upstream.sink(b"221 2.0.0 Bye\r\n")
        self.assertEqual(self.output(), b"221 2.0.0 Bye\r\n")

    def test_pipelinedAfterLoginPassword(self):
        """Bytes behind AUTH LOGIN's password line are held for the provider too."""
        self.greeted()
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.output()
        self.send(b64(TOKEN.encode()) + b"\r\nMAIL FROM:<>\r\n")
        upstream = FakeUpstream()
        self.succeed(self.lastLogin()[1], upstream)
        self.assertEqual(upstream.transport.value(), b"MAIL FROM:<>\r\n")

    def test_refusals(self):
        """Each refusal is a fixed SMTP reply; the connection stays for another AUTH."""
        self.greeted(policy=ServerPolicy(maxFailedLogins=10))
        # The texts of the provider-side errors are proxy.errors' own.
        unavailable = Unavailable().smtpResponse()
        self.assertTrue(unavailable.startswith(b"454 4.7.0 "))
        failed = AuthenticationFailed().smtpResponse()
        self.assertTrue(failed.startswith(b"535 5.7.8 "))
        for error, reply in (
            (
                AccessDenied("address"),
                b"535 5.7.8 Access denied, traffic not accepted from this IP",
            ),
            (AccessDenied("scope"), b"535 5.7.8 Access denied, invalid scope"),
            (UnauthorizedLogin(), b"535 5.7.8 Access denied, failed to authenticate user"),
            (Unavailable(), unavailable),
            (StoreUnavailable("down"), unavailable),
            (AuthenticationFailed(), failed),
            (RuntimeError(TOKEN), b"454 4.7.0 Internal error, try again later"),
        ):
            self.authPlain().errback(error)
            self.assertEqual(self.lines(), [reply], error)
            self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(len(self.sessions), 0)

    def test_unexpectedErrorLogsOneLine(self):
        """An unexpected login error: one log line naming its type, no traceback, no token."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted()
        d = self.authPlain()
        try:
            raise RuntimeError("boom " + TOKEN)
        except RuntimeError:
            d.errback()
        self.assertNotIn(TOKEN, repr(events))
        # The text lines (the login audit event has no text, only fields).
        events = [e for e in events if e.get("log_format")]
        self.assertEqual(len(events), 1)
        self.assertRegex(events[0]["where"], r"\Atest_smtp\.py:\d+\Z")
        self.assertNotIn("log_failure", events[0])
        self.assertEqual(events[0]["error"], "RuntimeError")
        self.assertNotIn(TOKEN, repr(events))

    def test_failedThenPipelinedCommandsRun(self):
        """After a refusal the commands held behind the AUTH are read and answered."""
        self.greeted()
        d = self.authPlain(b"NOOP\r\nRSET\r\n")
        self.assertEqual(self.output(), b"")
        d.errback(UnauthorizedLogin())
        self.assertEqual(
            self.lines(),
            [
                b"535 5.7.8 Access denied, failed to authenticate user",
                b"250 2.0.0 Ok",
                b"250 2.0.0 Ok",
            ],
        )

    def test_maxFailedAuths(self):
        """The third refused AUTH ends the connection with 421."""
        self.greeted()
        for _ in range(3):
            self.authPlain().errback(UnauthorizedLogin())
        self.assertEqual(
            self.lines(),
            [b"535 5.7.8 Access denied, failed to authenticate user"] * 3
            + [b"421 4.7.0 mx.test Too many failed authentications"],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_synchronousOutcomes(self):
        """A portal that answers at once works both ways, pipelined bytes kept in order."""
        self.greeted()
        self.portal.login = lambda *a: fail(UnauthorizedLogin())  # type: ignore[method-assign]
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\nNOOP\r\n")
        self.assertEqual(
            self.lines(), [b"535 5.7.8 Access denied, failed to authenticate user", b"250 2.0.0 Ok"]
        )
        upstream = FakeUpstream()
        session = FakeSubmission(upstream)
        d: Deferred = Deferred()
        d.callback((ISubmissionSession, session, session.logout))
        self.portal.login = lambda *a: d  # type: ignore[method-assign]
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\nMAIL FROM:<>\r\n")
        self.assertEqual(self.lines(), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(upstream.transport.value(), b"MAIL FROM:<>\r\n")

    def test_revokedWhileLoggingIn(self):
        """A revocation during the login: the new session is logged out, the client refused."""
        self.greeted()
        d = self.authPlain()
        self.sessions.close(account="alice")
        session = self.succeed(d)
        self.assertEqual(session.loggedOut, 1)
        self.assertEqual(self.lines(), [b"535 5.7.8 Access denied, failed to authenticate user"])
        self.assertEqual(len(self.sessions), 0)

    def test_registryClosesSession(self):
        """Revocation with disconnect (the shared registry) closes a live SMTP session."""
        self.greeted()
        upstream = FakeUpstream()
        self.succeed(self.authPlain(), upstream, tokenId="tid-9")
        self.assertEqual(self.sessions.close(tokenId="tid-9"), 1)
        self.assertTrue(upstream.transport.closed)
        self.assertTrue(self.transport.disconnecting)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.sessions), 0)

    def test_clientGoneWhileLoggingIn(self):
        """A client that left during the login: the session is logged out, nothing spliced."""
        self.greeted()
        d = self.authPlain()
        self.server.connectionLost(Failure(ConnectionDone()))
        session = self.succeed(d)
        self.assertEqual(session.loggedOut, 1)
        self.assertEqual(len(self.sessions), 0)
        self.assertFalse(self.extensions.knows("smtp.example:587"))

    def test_noSecretLogged(self):
        """No log event of a login, refused or spliced, carries the token."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted(policy=ServerPolicy(maxFailedLogins=10))
        for error in (AccessDenied("address"), Unavailable("upstream-limit"), UnauthorizedLogin()):
            self.authPlain().errback(error)
        self.succeed(self.authPlain())
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(events)
        self.assertNotIn(TOKEN, repr(events))
        self.assertNotIn(plain(b"", b"alice", TOKEN.encode()).decode(), repr(events))


class BoundsTests(SMTPTestCase):
    def test_lineTooLong(self):
        """A line past the limit: 500 5.5.6, counted as bad; the next line is read."""
        self.greeted(policy=ServerPolicy(maxLineLength=100))
        self.send(b"NOOP " + b"x" * 200 + b"\r\nNOOP\r\n")
        self.assertEqual(self.lines(), [b"500 5.5.6 Line too long", b"250 2.0.0 Ok"])
        self.assertEqual(self.server._badCommands, 1)

    def test_lineTooLongWithoutEnd(self):
        """A long line in pieces is refused once and dropped to its end; reading goes on."""
        self.greeted(policy=ServerPolicy(maxLineLength=100))
        for _ in range(5):
            self.send(b"y" * 60)
        self.assertEqual(self.lines(), [b"500 5.5.6 Line too long"])
        self.assertLessEqual(len(self.server._buffer), 101)
        self.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(self.lines(), [b"250 2.0.0 Ok"])

    def test_maxBadCommands(self):
        """The tenth bad command ends the connection with 421."""
        self.greeted()
        self.send(b"BOGUS\r\n" * 12)
        self.assertEqual(
            self.lines(),
            [b"500 5.5.2 Command not recognized"] * 10
            + [b"421 4.7.0 mx.test Too many invalid commands"],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_maxCommands(self):
        """Even valid commands are bounded before AUTH."""
        self.greeted(policy=ServerPolicy(maxCommands=4))
        self.send(b"NOOP\r\n" * 6)
        self.assertEqual(
            self.lines(), [b"250 2.0.0 Ok"] * 3 + [b"421 4.7.0 mx.test Too many commands"]
        )

    def test_loginTimeout(self):
        """A deadline from connect, not an idle timer: 421 4.4.2, then a cut if the peer stays."""
        self.greeted(policy=ServerPolicy(loginTimeout=30))
        self.clock.advance(20)
        self.send(b"NOOP\r\n")
        self.clock.advance(10)
        self.assertEqual(self.lines(), [b"250 2.0.0 Ok", b"421 4.4.2 mx.test Login timeout"])
        self.assertTrue(self.transport.disconnecting)
        self.send(b"NOOP\r\n")
        self.assertEqual(self.output(), b"")
        self.transport.disconnecting = False
        self.clock.advance(SubmissionServer.BYE_GRACE)
        self.assertTrue(self.transport.disconnected)

    def test_timeoutWhileLoginPending(self):
        """The deadline also runs during the login; a late success is logged out."""
        self.greeted(policy=ServerPolicy(loginTimeout=30))
        d = self.authPlain()
        self.clock.advance(30)
        self.assertEqual(self.lines(), [b"421 4.4.2 mx.test Login timeout"])
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.succeed(d).loggedOut, 1)

    def test_noTimeoutAfterSplice(self):
        """A spliced session has no login deadline."""
        self.greeted(policy=ServerPolicy(loginTimeout=30))
        self.succeed(self.authPlain())
        self.output()
        self.clock.advance(60)
        self.assertEqual(self.output(), b"")
        self.assertFalse(self.transport.disconnecting)


class InternalErrorTests(SMTPTestCase):
    def test_bugClosesWithOneLineAndNoTraceback(self):
        """A bug while handling a command: 421, one log line without input or traceback."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted()

        def broken(*args: Any) -> Deferred:
            raise RuntimeError("broken portal " + TOKEN)

        self.portal.login = broken  # type: ignore[method-assign]
        self.send(b"AUTH PLAIN " + plain(b"", b"alice", TOKEN.encode()) + b"\r\nNOOP\r\n")
        self.assertEqual(self.lines(), [b"421 4.3.0 mx.test Internal error"])
        self.assertEqual(len(events), 1)
        self.assertNotIn("log_failure", events[0])
        self.assertNotIn(TOKEN, repr(events))
        self.assertEqual(events[0]["error"], "RuntimeError")


class LimiterTests(SynchronousTestCase):
    def test_refusalsAreSMTPReplies(self):
        """Past the per-address cap the SMTP door answers 421 in SMTP, then closes."""
        clock = task.Clock()
        factory = SubmissionFactory(FakePortal(), ServerPolicy(), hostname="mx.test", clock=clock)
        limiter = ConnectionLimiter(Limits(maxPreauthPerAddress=1), clock, "SMTP")
        front = LimitedFactory(factory, limiter, SMTP)
        addr = IPv4Address("TCP", "192.0.2.7", 1)
        transports = []
        for _ in range(2):
            t = StringTransport(peerAddress=addr)
            front.buildProtocol(addr).makeConnection(t)
            transports.append(t)
        self.assertTrue(transports[0].value().startswith(b"220 mx.test imapproxy ESMTP"))
        self.assertEqual(
            transports[1].value(), b"421 4.7.0 Too many connections from your address\r\n"
        )
        self.assertTrue(transports[1].disconnecting)
        for call in clock.getDelayedCalls():
            call.cancel()


def corpus() -> Any:
    """Inputs for the fuzz test: pre-auth SMTP commands with arguments in every form."""
    from hypothesis import strategies as st

    token = st.sampled_from([TOKEN.encode(), b"alice", b"", b"x" * 300, b"=", b"*"])
    b64s = st.builds(lambda v: base64.b64encode(v), st.binary(max_size=20) | token)
    argument = (
        st.binary(max_size=12)
        | token
        | b64s
        | st.sampled_from(
            [b"PLAIN", b"LOGIN", b"XOAUTH2", b"LAST", b"10", b"99999999999", b"FROM:<a@b>", b"\x00"]
        )
    )
    verb = st.sampled_from(
        [b"EHLO", b"HELO", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"MAIL", b"RCPT", b"DATA",
         b"BDAT", b"BDAT 3", b"STARTTLS", b"NOOP", b"RSET", b"VRFY", b"ehlo", b"", b"\xff"]
    )  # fmt: skip
    line = st.builds(
        lambda v, args, sep: v + b"".join(sep + a for a in args),
        verb,
        st.lists(argument, max_size=3),
        st.sampled_from([b" ", b"  ", b"", b"\t"]),
    )
    lines = st.lists(line | st.binary(max_size=40), min_size=1, max_size=8)
    return st.builds(
        lambda ls, end: b"".join(x + end for x in ls),
        lines,
        st.sampled_from([b"\r\n", b"\n", b"\r"]),
    )


# Everything the server may say before AUTH.
_FIXED = re.compile(
    rb"\A(?:"
    rb"220 mx\.test imapproxy ESMTP ready for requests from 127\.0\.0\.1"
    rb"|250[ -]mx\.test Hello 127\.0\.0\.1|250 AUTH PLAIN LOGIN|250 2\.0\.0 Ok|221 2\.0\.0 Bye"
    rb"|334 |334 VXNlcm5hbWU6|334 UGFzc3dvcmQ6|454 4\.7\.0 TLS not available"
    rb"|500 5\.5\.2 Command not recognized|500 5\.5\.6 Line too long"
    rb"|501 5\.5\.4 Syntax(?: error in parameters|: EHLO hostname|: HELO hostname)"
    rb"|501 5\.7\.0 Authentication aborted|501 5\.5\.2 (?:Invalid base64 data"
    rb"|Malformed SASL PLAIN response)|503 5\.5\.1 Send EHLO first"
    rb"|504 5\.5\.4 Unrecognized authentication type|530 5\.7\.0 Authentication required"
    rb"|535 5\.7\.8 Access denied, (?:invalid username|failed to authenticate user)"
    rb"|421 4\.7\.0 mx\.test Too many (?:invalid commands|commands|failed authentications)"
    rb")\Z"
)


class FuzzTests(SynchronousTestCase):
    """Whatever a client sends before AUTH, the answers are fixed and nothing is logged."""

    def feed(self, data: bytes, chunk: int) -> tuple[bytes, list[dict]]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            clock = task.Clock()
            portal = FakePortal()
            portal.login = lambda *a: fail(UnauthorizedLogin())  # type: ignore[method-assign]
            factory = SubmissionFactory(
                portal, ServerPolicy(maxLineLength=200), clock=clock, hostname="mx.test"
            )
            server = factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
            server.makeConnection(transport)
            for i in range(0, len(data), chunk):
                server.dataReceived(data[i : i + chunk])
            server.connectionLost(Failure(ConnectionDone()))
            clock.advance(SubmissionServer.BYE_GRACE)
            self.assertEqual(clock.getDelayedCalls(), [])
        finally:
            globalLogPublisher.removeObserver(events.append)
        return transport.value(), events

    def test_fuzz(self):
        """No input logs anything; every answer is a fixed line; the token is never echoed."""
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(corpus(), st.sampled_from([1, 7, 100000]))
        def check(data: bytes, chunk: int) -> None:
            out, events = self.feed(data, chunk)
            # No text line: a refused login's audit event (no text) aside.
            self.assertEqual([e for e in events if e.get("event") != "login"], [])
            lines = out.split(b"\r\n")
            self.assertEqual(lines[-1], b"")
            for line in lines[:-1]:
                self.assertRegex(line, _FIXED)
            self.assertNotIn(TOKEN.encode(), out)

        check()
