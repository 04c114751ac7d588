"""
Tests for the SMTP side of ``proxy.upstream``: replies and EHLO extensions,
the login state machine alone (``SMTPLogin``, every transition), the
protocol that feeds it over a ``StringTransport`` and hands the connection
over, and ``connectSMTP``/``probeSMTP`` over a ``MemoryReactorClock``.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile

from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy.errors import (
    AuthenticationFailed,
    CertificateRejected,
    SMTPAuthDisabled,
    Unavailable,
    UpstreamRejectedToken,
)
from proxy.model import Upstream
from proxy.upstream import (
    AddressCache,
    OAUTHBEARERAuthenticator,
    SMTPUpstreamProtocol,
    UpstreamConnector,
    XOAUTH2Authenticator,
    connectSMTP,
    probeSMTP,
)
from proxy.upstream.smtplogin import SMTPLogin
from proxy.upstream.smtpreplies import (
    MAX_REPLY_LINES,
    MalformedReply,
    Reply,
    ReplyReader,
    authMechanisms,
    ehloName,
    extensionsOf,
    hasExtension,
)
from tests.test_upstream import (
    ERROR_CHALLENGE,
    OAUTHBEARER,
    TOKEN,
    USER,
    XOAUTH2,
    LoopbackServers,
    RecordingIO,
    TLSStringTransport,
    ensuringDeferred,
)
from tests.upstream.certs import make_pki

# Dovecot's EHLO over TLS (reference: dovecot-submission-upstream.md).
EHLO_TLS = [
    b"250-localhost",
    b"250-8BITMIME",
    b"250-AUTH XOAUTH2 OAUTHBEARER",
    b"250-BURL imap",
    b"250-CHUNKING",
    b"250-ENHANCEDSTATUSCODES",
    b"250-SIZE 35882577",
    b"250 PIPELINING",
]
EXTENSIONS = [
    b"8BITMIME",
    b"AUTH XOAUTH2 OAUTHBEARER",
    b"BURL imap",
    b"CHUNKING",
    b"ENHANCEDSTATUSCODES",
    b"SIZE 35882577",
    b"PIPELINING",
]
# Gmail's EHLO before TLS: STARTTLS, no AUTH.
EHLO_CLEAR = [b"250-smtp.gmail.com at your service", b"250-SIZE 35882577", b"250 STARTTLS"]
GREETING = b"220 localhost Dovecot (Debian) ready."
AUTH_IR = b"AUTH XOAUTH2 " + XOAUTH2
GMAIL_REFUSAL = [
    b"535-5.7.8 Username and Password not accepted. Learn more at",
    b"535 5.7.8  https://support.google.com/mail/?p=BadCredentials x - gsmtp",
]
MS_DISABLED = (
    b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
    b"the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)
# So long that its XOAUTH2 string does not fit on the AUTH line.
LONG_TOKEN = b"t" * 10000


def reply(*lines: bytes) -> Reply:
    reader = ReplyReader()
    for line in lines[:-1]:
        assert reader.feed(line) is None
    result = reader.feed(lines[-1])
    assert result is not None
    return result


class ReplyTests(SynchronousTestCase):
    def test_aSingleLine(self):
        """A one-line reply: its code, its enhanced code and its text."""
        r = reply(b"535 5.7.139 SMTP AUTH off")
        self.assertEqual(
            (r.code, r.enhanced, r.lines), (535, b"5.7.139", (b"5.7.139 SMTP AUTH off",))
        )
        self.assertEqual(reply(b"334 ").text, b"")
        self.assertEqual(reply(b"220").lines, (b"",))

    def test_aMultiLineReply(self):
        """Continuation lines gather into one reply, its enhanced code from the first."""
        r = reply(*GMAIL_REFUSAL)
        self.assertEqual((r.code, r.enhanced, len(r.lines)), (535, b"5.7.8", 2))

    def test_anEnhancedCodeOfAnotherClassIsNone(self):
        """``250 5.7.1`` is no enhanced code of a 250; text alone is none either."""
        self.assertIsNone(reply(b"250 5.7.1 odd").enhanced)
        self.assertIsNone(reply(b"535 Authentication failed").enhanced)
        self.assertIsNone(reply(b"454 4.7.0x no").enhanced)

    def test_malformedLines(self):
        """Not a reply line, a continuation with another code, no code: MalformedReply."""
        for lines in ([b"garbage"], [b"2500 x"], [b"25 x"], [b"650 x"], [b"250-a", b"251 b"]):
            with self.subTest(lines=lines):
                reader = ReplyReader()
                with self.assertRaises(MalformedReply):
                    for line in lines:
                        reader.feed(line)

    def test_aReplyIsBounded(self):
        """More lines, or more bytes, than a reply may have: MalformedReply."""
        reader = ReplyReader()
        with self.assertRaises(MalformedReply):
            for _ in range(MAX_REPLY_LINES + 1):
                reader.feed(b"250-X")
        reader = ReplyReader()
        with self.assertRaises(MalformedReply):
            for _ in range(20):
                reader.feed(b"250-" + b"x" * 2000)

    def test_extensions(self):
        """The EHLO reply's extensions: every line but the first, with parameters."""
        self.assertEqual(extensionsOf(reply(*EHLO_TLS)), EXTENSIONS)
        self.assertEqual(extensionsOf(reply(b"250 smtp.example.com")), [])
        self.assertTrue(hasExtension(EXTENSIONS, b"size"))
        self.assertFalse(hasExtension(EXTENSIONS, b"STARTTLS"))

    def test_authMechanisms(self):
        """Both ``AUTH X Y`` and the older ``AUTH=X Y``, any case."""
        self.assertEqual(authMechanisms([b"AUTH LOGIN xoauth2"]), [b"LOGIN", b"XOAUTH2"])
        self.assertEqual(authMechanisms([b"AUTH=LOGIN PLAIN"]), [b"LOGIN", b"PLAIN"])
        self.assertEqual(authMechanisms([b"AUTHX Y", b"SIZE 1"]), [])

    def test_ehloName(self):
        """The client's EHLO name goes upstream when it is a name or an address literal."""
        for good in (
            "client.example",
            "client.example.",
            "laptop",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
        ):
            self.assertEqual(ehloName(good), good)
        bad = [None, "", "a_b.example", "-a.example", "a b", "x\r\nMAIL FROM:<a>", "é.example"]
        bad += ["[192.0.2.300]", "[IPv6:nope]", "a." * 130, "a" * 64 + ".example", 42]
        for name in bad:
            with self.subTest(name=name):
                self.assertEqual(ehloName(name), "localhost")


# Lines (and the token) that bring a fresh login, STARTTLS first or not, to
# each state in which it waits for the server.
WAITING = {
    "greeting": (False, (), TOKEN),
    "greetingBeforeTLS": (True, (), TOKEN),
    "ehloBeforeTLS": (True, (GREETING,), TOKEN),
    "startingTLS": (True, (GREETING, *EHLO_CLEAR), TOKEN),
    "ehlo": (False, (GREETING,), TOKEN),
    "awaitingChallenge": (False, (GREETING, *EHLO_TLS), LONG_TOKEN),
    "authenticating": (False, (GREETING, *EHLO_TLS), TOKEN),
    "refusing": (False, (GREETING, *EHLO_TLS, b"334 " + ERROR_CHALLENGE), TOKEN),
}


class SMTPLoginMachineTests(SynchronousTestCase):
    """
    ``SMTPLogin`` alone, no protocol and no transport: each transition, by
    the replies that cause it, and what the machine sends and concludes.
    """

    def login(self, state: str = "greeting", authenticator=None, probe=False) -> SMTPLogin:
        startTLS, lines, token = WAITING[state]
        self.io = RecordingIO()
        if authenticator is None and not probe:
            authenticator = XOAUTH2Authenticator(USER)
        self.machine = SMTPLogin(
            self.io, authenticator, token, startTLS, "client.example", "smtp.example.com:587"
        )
        self.feed(*lines)
        self.assertEqual((self.io.errors, self.io.succeeded), ([], 0), state)
        self.io.sent.clear()
        return self.machine

    def feed(self, *lines: bytes) -> None:
        for line in lines:
            self.machine.lineReceived(line)

    def failure(self) -> Exception:
        self.assertEqual(len(self.io.errors), 1, "the login did not fail (once)")
        self.assertEqual(self.io.succeeded, 0)
        return self.io.errors[0]

    def reason(self) -> str:
        return self.failure().reason  # type: ignore[attr-defined, no-any-return]

    def test_everyWaitingStateFailsOnAMalformedLine(self):
        """In every waiting state, a line that is no reply is upstream-protocol."""
        for state in WAITING:
            for lines in ([b"garbage"], [b"250-a", b"220 b"], [b"199 x"]):
                with self.subTest(state=state, lines=lines):
                    self.login(state)
                    self.feed(*lines)
                    self.assertEqual(self.reason(), "upstream-protocol")
                    self.assertEqual(self.io.sent, [])

    def test_everyWaitingStateFailsWhenUnusable(self):
        """In every waiting state, a line too long (or a bug) is upstream-protocol."""
        for state in WAITING:
            with self.subTest(state=state):
                self.login(state).unusable()
                self.assertEqual(self.reason(), "upstream-protocol")

    def test_everyWaitingStateFailsWhenTheConnectionEnds(self):
        """In every waiting state, the connection's end is upstream-closed."""
        for state in WAITING:
            with self.subTest(state=state):
                self.login(state).connectionLost(Failure(ConnectionDone()))
                self.assertEqual(self.reason(), "upstream-closed")

    def test_aRefusedCertificateIsReportedAsSuch(self):
        """A connection ended by a refused certificate fails with that error."""
        for state in WAITING:
            with self.subTest(state=state):
                error = CertificateRejected("certificate-expired", detail="x:465: expired")
                self.login(state).connectionLost(Failure(error))
                self.assertIs(self.failure(), error)
        self.login("ehlo").connectionLost(Failure(VerificationError(errors=[])))
        self.assertEqual(self.reason(), "certificate-hostname")

    def test_theGreetingSaysEHLO(self):
        """A 220 greeting (one line or several) is answered with EHLO and the name."""
        for lines in ([GREETING], [b"220-smtp.example.com ESMTP", b"220-more", b"220 ready"]):
            self.login()
            self.feed(*lines)
            self.assertEqual(self.io.sent, [b"EHLO client.example"])

    def test_aGreetingThatRefusesIsUnavailable(self):
        """421 (busy) or 554 (no service) as greeting: upstream-refused, nothing sent."""
        for state in ("greeting", "greetingBeforeTLS"):
            for line in (b"421 4.3.2 Service shutting down", b"554 5.7.1 go away"):
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertEqual(self.reason(), "upstream-refused")
                    self.assertEqual(self.io.sent, [])

    def test_anythingElseBeforeTheGreetingIsAProtocolError(self):
        """250, 235, 334 or 354 for a greeting: upstream-protocol."""
        for state in ("greeting", "greetingBeforeTLS"):
            for line in (b"250 hi", b"235 ok", b"334 ", b"354 go"):
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertEqual(self.reason(), "upstream-protocol")

    def test_theEHLOReplyGivesTheExtensionsAndTheLogin(self):
        """The multi-line 250 is parsed into extensions; AUTH XOAUTH2 with the initial response."""
        self.login("ehlo")
        self.feed(*EHLO_TLS)
        self.assertEqual(self.machine.extensions, EXTENSIONS)
        self.assertEqual(self.io.sent, [AUTH_IR])

    def test_anEHLORefusedIsUnavailable(self):
        """EHLO answered 5xx or 4xx, before TLS or after: upstream-ehlo."""
        for state in ("ehlo", "ehloBeforeTLS"):
            for line in (b"550 5.7.1 no", b"421 4.4.2 bye"):
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertEqual(self.reason(), "upstream-ehlo")

    def test_otherRepliesToEHLOAreProtocolErrors(self):
        """220, 235, 334 or 354 for EHLO: upstream-protocol."""
        for state in ("ehlo", "ehloBeforeTLS", "startingTLS"):
            for line in (b"235 ok", b"334 ", b"354 go"):
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertEqual(self.reason(), "upstream-protocol")
        for state in ("ehlo", "ehloBeforeTLS"):
            self.login(state)
            self.feed(b"220 again")
            self.assertEqual(self.reason(), "upstream-protocol")
        self.login("startingTLS")
        self.feed(b"250 ok")
        self.assertEqual(self.reason(), "upstream-protocol")

    def test_STARTTLSThenEHLOAgain(self):
        """STARTTLS offered: STARTTLS, then on 220 the upgrade and a new EHLO; nothing else."""
        self.login("ehloBeforeTLS")
        self.feed(*EHLO_CLEAR)
        self.assertEqual(self.io.sent, [b"STARTTLS"])
        self.assertEqual(self.io.upgrades, 0)
        self.feed(b"220 2.0.0 Begin TLS negotiation now.")
        self.assertEqual(self.io.upgrades, 1)
        self.assertEqual(self.io.sent, [b"STARTTLS", b"EHLO client.example"])
        # What was offered in the clear does not count.
        self.assertEqual(self.machine.extensions, [])
        self.feed(*EHLO_TLS)
        self.assertEqual(self.machine.extensions, EXTENSIONS)
        self.assertEqual(self.io.sent[-1], AUTH_IR)

    def test_noSTARTTLSOffered(self):
        """STARTTLS mode and a server without it: upstream-no-starttls, no credentials sent."""
        self.login("ehloBeforeTLS")
        self.feed(b"250-smtp.example.com", b"250 AUTH XOAUTH2")
        self.assertEqual(self.reason(), "upstream-no-starttls")
        self.assertEqual(self.io.sent, [])

    def test_STARTTLSRefused(self):
        """STARTTLS answered 454 or 5xx: upstream-starttls, no upgrade."""
        for line in (b"454 4.7.0 TLS not available", b"502 5.5.1 no"):
            self.login("startingTLS")
            self.feed(line)
            self.assertEqual(self.reason(), "upstream-starttls")
            self.assertEqual(self.io.upgrades, 0)

    def test_OAUTHBEAREROnly(self):
        """A server offering OAUTHBEARER but not XOAUTH2 gets OAUTHBEARER."""
        self.login("ehlo")
        self.feed(b"250-smtp.example.com", b"250 AUTH PLAIN OAUTHBEARER")
        self.assertEqual(self.io.sent, [b"AUTH OAUTHBEARER " + OAUTHBEARER])
        self.assertIsInstance(self.machine.authenticator, OAUTHBEARERAuthenticator)
        # Its error challenge is answered with %x01.
        self.feed(b"334 eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=")
        self.assertEqual(self.io.sent[-1], base64.b64encode(b"\x01"))

    def test_theOlderAUTHEqualsForm(self):
        """``AUTH=XOAUTH2`` alone is enough."""
        self.login("ehlo")
        self.feed(b"250-smtp.example.com", b"250 AUTH=LOGIN XOAUTH2")
        self.assertEqual(self.io.sent, [AUTH_IR])

    def test_noMechanism(self):
        """No AUTH at all, or without XOAUTH2 and OAUTHBEARER: upstream-no-xoauth2."""
        for lines in (
            [b"250 smtp.example.com"],
            [b"250-smtp.example.com", b"250 AUTH LOGIN PLAIN"],
        ):
            self.login("ehlo")
            self.feed(*lines)
            self.assertEqual(self.reason(), "upstream-no-xoauth2")
            self.assertEqual(self.io.sent, [])

    def test_loggedIn(self):
        """235 after the credentials: logged in, the extensions those offered over TLS."""
        self.login("authenticating")
        self.feed(b"235 2.7.0 Logged in.")
        self.assertEqual((self.io.succeeded, self.io.errors), (1, []))
        self.assertEqual(self.machine.extensions, EXTENSIONS)

    def test_theErrorChallengeThenTheRefusal(self):
        """334 <base64 JSON>: an empty line; then 535 is UpstreamRejectedToken (Gmail's too)."""
        for refusal in ([b"535 5.7.8 Authentication failed."], GMAIL_REFUSAL):
            self.login("authenticating")
            self.feed(b"334 " + ERROR_CHALLENGE)
            self.assertEqual(self.io.sent, [b""])
            self.feed(*refusal)
            self.assertIsInstance(self.failure(), UpstreamRejectedToken)

    def test_aMalformedErrorChallengeIsAnsweredToo(self):
        """A 334 that is no base64 is answered all the same."""
        self.login("authenticating")
        self.feed(b"334 not base64!")
        self.assertEqual(self.io.sent, [b""])

    def test_refusals(self):
        """5.7.139 is SMTPAuthDisabled; 535 a refused token; 4xx unavailable; other 5xx final."""
        cases = [
            (MS_DISABLED, SMTPAuthDisabled, "smtp-auth-disabled"),
            (b"535 5.7.3 Authentication unsuccessful [X]", UpstreamRejectedToken, None),
            (b"535 Authentication failed", UpstreamRejectedToken, None),
            (b"454 4.7.0 Temporary authentication failure. [h:d t]", Unavailable, None),
            (b"421 4.7.0 closing", Unavailable, None),
            (b"504 5.5.4 Unsupported authentication mechanism.", AuthenticationFailed, None),
            (b"530 5.7.0 Must issue a STARTTLS command first.", AuthenticationFailed, None),
        ]
        for state in ("authenticating", "refusing", "awaitingChallenge"):
            for line, kind, reason in cases:
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    error = self.failure()
                    self.assertIsInstance(error, kind)
                    if kind is AuthenticationFailed:
                        self.assertNotIsInstance(error, UpstreamRejectedToken)
                    if kind is Unavailable:
                        self.assertEqual(error.reason, "upstream-unavailable")  # type: ignore[attr-defined]
                    if reason is not None:
                        self.assertEqual(error.reason, reason)  # type: ignore[attr-defined]

    def test_MicrosoftsDisabledSMTPAuthAfterAnErrorChallenge(self):
        """5.7.139 after the error challenge is SMTPAuthDisabled too, with its reply."""
        self.login("refusing")
        self.feed(MS_DISABLED)
        self.assertEqual(
            self.failure().smtpResponse(),  # type: ignore[attr-defined]
            b"535 5.7.139 SMTP AUTH is disabled for this mailbox by its administrator",
        )

    def test_nothingButARefusalAfterTheErrorChallenge(self):
        """After the error challenge, a 235 or a second 334 is upstream-protocol."""
        for line in (b"235 2.7.0 ok", b"334 again", b"250 ok", b"220 hi"):
            self.login("refusing")
            self.feed(line)
            self.assertEqual(self.reason(), "upstream-protocol")

    def test_aLongInitialResponseWaitsForTheChallenge(self):
        """Too long for the AUTH line (RFC 4954): AUTH XOAUTH2, then the response after ``334 ``."""
        self.login("ehlo")
        self.machine._secret = LONG_TOKEN
        self.feed(*EHLO_TLS)
        self.assertEqual(self.io.sent, [b"AUTH XOAUTH2"])
        self.feed(b"334 ")
        initial = base64.b64encode(b"user=" + USER + b"\x01auth=Bearer " + LONG_TOKEN + b"\x01\x01")
        self.assertEqual(self.io.sent, [b"AUTH XOAUTH2", initial])
        self.feed(b"235 2.7.0 Authentication successful")
        self.assertEqual(self.io.succeeded, 1)

    def test_loggedInBeforeTheCredentialsIsAProtocolError(self):
        """A 235 before the credentials were sent: upstream-protocol."""
        self.login("awaitingChallenge")
        self.feed(b"235 ok")
        self.assertEqual(self.reason(), "upstream-protocol")

    def test_aProbeStopsAfterTheEHLOThatCounts(self):
        """Without an authenticator: done after the EHLO over TLS, no AUTH."""
        self.login("startingTLS", probe=True)
        self.feed(b"220 go", *EHLO_TLS)
        self.assertEqual(self.io.sent, [b"EHLO client.example"])
        self.assertEqual((self.io.succeeded, self.machine.extensions), (1, EXTENSIONS))

    def test_aFailedLoginHearsNothingMore(self):
        """After a failure nothing is sent and nothing more is concluded."""
        self.login("authenticating")
        self.feed(b"454 4.7.0 later")
        for line in (
            b"235 ok",
            b"334 x",
            b"250 ok",
            b"220 hi",
            b"454 x",
            b"535 x",
            b"354 x",
            b"junk",
        ):
            self.feed(line)
        self.machine.unusable()
        self.machine.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.io.errors), 1)
        self.assertEqual(self.io.sent, [])

    def test_aLoggedInMachineIgnoresTheEnd(self):
        """Logged in, the connection's end or a bad line concludes nothing more."""
        self.login("authenticating")
        self.feed(b"235 ok")
        self.machine.unusable()
        self.machine.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.io.succeeded, self.io.errors), (1, []))


class SMTPProtocolTests(SynchronousTestCase):
    """``SMTPUpstreamProtocol`` over a ``StringTransport``: the login, then the hand-over."""

    def connect(self, mode: str = "implicit", tlsOptions=None, authenticator=...):
        self.transport = TLSStringTransport()
        if authenticator is ...:
            authenticator = XOAUTH2Authenticator(USER)
        self.proto = SMTPUpstreamProtocol(
            authenticator, TOKEN, mode, tlsOptions, "smtp.example.com:465", "client.example"
        )
        self.proto.makeConnection(self.transport)
        self.results: list = []
        self.proto.ready.addBoth(self.record)
        return self.proto

    def record(self, result):
        self.results.append(result)
        return None if isinstance(result, Failure) else result

    def receive(self, *lines: bytes) -> None:
        for line in lines:
            self.proto.dataReceived(line + b"\r\n")

    def sent(self) -> list[bytes]:
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1]

    def failed(self, kind: type) -> Exception:
        self.assertEqual(len(self.results), 1, "ready has not fired (once)")
        self.assertIsInstance(self.results[0], Failure)
        self.results[0].trap(kind)
        self.assertTrue(self.transport.disconnecting)
        return self.results[0].value  # type: ignore[no-any-return]

    def loggedIn(self) -> None:
        self.connect()
        self.receive(GREETING, *EHLO_TLS)
        self.assertEqual(self.sent(), [b"EHLO client.example", AUTH_IR])

    def test_aLogin(self):
        """Greeting, EHLO, AUTH with the initial response, 235: ready, paused, extensions."""
        self.loggedIn()
        self.assertEqual(self.results, [])
        self.receive(b"235 2.7.0 Logged in.")
        self.assertEqual(self.results, [self.proto])
        self.assertEqual(self.proto.extensions, EXTENSIONS)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertFalse(self.transport.disconnecting)

    def test_aRefusalClosesTheConnection(self):
        """The error challenge answered, then 535: UpstreamRejectedToken, connection closed."""
        self.loggedIn()
        self.receive(b"334 " + ERROR_CHALLENGE)
        self.assertEqual(self.sent(), [b""])
        self.receive(b"535 5.7.8 Authentication failed.")
        self.failed(UpstreamRejectedToken)

    def test_STARTTLSUpgradesAndDropsWhatCameInTheClear(self):
        """
        The 220 to STARTTLS starts TLS with the options; replies that came
        with it, in the clear, are dropped, not read as the EHLO's reply.
        """
        options = object()
        self.connect("starttls", tlsOptions=options)
        self.receive(GREETING, *EHLO_CLEAR)
        self.assertEqual(self.sent(), [b"EHLO client.example", b"STARTTLS"])
        injected = b"250-evil\r\n250 AUTH PLAIN\r\n235 2.7.0 forged\r\n"
        self.proto.dataReceived(b"220 2.0.0 go ahead\r\n" + injected)
        self.assertIs(self.transport.tlsOptions, options)
        self.assertEqual(self.sent(), [b"EHLO client.example"])
        self.assertEqual(self.results, [])
        self.receive(*EHLO_TLS)
        self.assertEqual(self.sent(), [AUTH_IR])
        self.receive(b"235 2.7.0 Logged in.")
        self.assertEqual(self.results, [self.proto])

    def test_aLineTooLong(self):
        """A reply line beyond MAX_LENGTH: upstream-protocol, closed."""
        self.connect()
        self.proto.dataReceived(b"220-" + b"x" * 5000 + b"\r\n")
        self.assertEqual(self.failed(Unavailable).reason, "upstream-protocol")  # type: ignore[attr-defined]

    def test_aReplyTooLong(self):
        """An EHLO reply of more lines than a reply may have: upstream-protocol."""
        self.connect()
        self.receive(GREETING, *[b"250-X"] * (MAX_REPLY_LINES + 1))
        self.assertEqual(self.failed(Unavailable).reason, "upstream-protocol")  # type: ignore[attr-defined]

    def test_lostMidLogin(self):
        """The connection ends during the login: upstream-closed, once."""
        self.loggedIn()
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.results), 1)
        self.assertEqual(self.results[0].value.reason, "upstream-closed")
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.results), 1)

    def test_takeOverReturnsWhatFollowedThe235(self):
        """Bytes in the same read as the 235 come back from takeOver() untouched."""
        self.loggedIn()
        tail = b"250 2.1.0 Ok\r\n250 2.1.5 partial \x00 line"
        self.proto.dataReceived(b"235 2.7.0 Logged in.\r\n" + tail)
        self.assertEqual(self.results, [self.proto])
        got: list[bytes] = []
        self.assertEqual(self.proto.takeOver(got.append, lambda reason: None), tail)
        self.assertEqual(got, [])

    def test_laterBytesGoToTheSink(self):
        """After takeOver() every byte read goes to the sink, unparsed, and is counted."""
        self.loggedIn()
        self.receive(b"235 ok")
        got: list[bytes] = []
        lost: list = []
        self.assertEqual(self.proto.takeOver(got.append, lost.append), b"")
        self.proto.dataReceived(b"421 not parsed\r\n")
        self.proto.dataReceived(b"x" * 70000)
        self.assertEqual(got, [b"421 not parsed\r\n", b"x" * 70000])
        self.assertEqual(self.proto.bytesReceived, 16 + 70000)
        self.assertEqual(self.transport.value(), b"")
        reason = Failure(ConnectionDone())
        self.proto.connectionLost(reason)
        self.assertEqual(lost, [reason])

    def test_takeOverInsideTheReadyCallback(self):
        """takeOver() from the ready callback still gets the rest of the read, once."""
        self.connect()
        self.receive(GREETING, *EHLO_TLS)
        got: list[bytes] = []
        self.proto.ready.addCallback(lambda p: got.append(p.takeOver(got.append, lambda r: None)))
        self.proto.dataReceived(b"235 ok\r\n250 2.1.0 Ok\r\n")
        self.proto.dataReceived(b"later")
        self.assertEqual(b"".join(got), b"250 2.1.0 Ok\r\nlater")

    def test_quit(self):
        """quit() after a probe says QUIT, reads on (for the close) and closes."""
        self.connect(authenticator=None)
        self.receive(GREETING, *EHLO_TLS)
        self.assertEqual(self.results, [self.proto])
        self.assertEqual(self.sent(), [b"EHLO client.example"])
        closed: list = []
        self.proto.notifyClosed().addCallback(closed.append)
        self.proto.quit()
        self.assertEqual(self.sent(), [b"QUIT"])
        self.assertEqual(self.transport.producerState, "producing")
        self.assertTrue(self.transport.disconnecting)
        self.receive(b"221 2.0.0 Bye")
        self.assertEqual(closed, [])
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(closed, [None])
        self.proto.notifyClosed().addCallback(closed.append)
        self.assertEqual(closed, [None, None])


class FakeTLSCache:
    """``TLSOptionsCache`` without a thread pool: the same options for every server."""

    def __init__(self) -> None:
        self.options = object()
        self.forgotten: list = []

    async def get(self, upstream):
        return self.options

    def forget(self, upstream):
        self.forgotten.append(upstream)


class ConnectSMTPTests(SynchronousTestCase):
    """connectSMTP and probeSMTP over a MemoryReactorClock: no socket, time under control."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def tearDown(self):
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def accept(self, index: int = 0):
        """The TCP connection succeeds; :return: the transport the proxy writes to."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        self.transport = TLSStringTransport()
        self.wire = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.wire.makeConnection(self.transport)
        return self.transport

    def reply(self, *lines: bytes) -> None:
        self.wire.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def login(self, timeout: float = 10.0, tls: str = "plain", **kw):
        return ensureDeferred(
            connectSMTP(
                self.reactor,
                Upstream(host="127.0.0.1", port=587, tls=tls),
                "alice@example.com",
                TOKEN.decode(),
                timeout,
                "client.example",
                **kw,
            )
        )

    def test_aLogin(self):
        """A login fires with the logged-in protocol and cancels the timer."""
        d = self.login()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 587))
        transport = self.accept()
        self.reply(GREETING, *EHLO_TLS)
        self.assertEqual(transport.value(), b"EHLO client.example\r\n" + AUTH_IR + b"\r\n")
        self.assertNoResult(d)
        self.reply(b"235 2.7.0 Logged in.")
        proto = self.successResultOf(d)
        self.assertIsInstance(proto, SMTPUpstreamProtocol)
        self.assertEqual((proto.extensions, proto.server), (EXTENSIONS, "127.0.0.1:587"))

    def test_STARTTLSWithTheCachedOptions(self):
        """STARTTLS mode upgrades with the TLS cache's options, for this server."""
        cache = FakeTLSCache()
        d = self.login(tls="starttls", tlsCache=cache)
        transport = self.accept()
        self.reply(GREETING, *EHLO_CLEAR, b"220 go")
        self.assertEqual(transport.tlsOptions._inner, cache.options)
        self.assertEqual(transport.tlsOptions.server, "127.0.0.1:587")
        self.reply(*EHLO_TLS, b"235 ok")
        self.successResultOf(d)

    def test_aRefusedCertificateIsForgotten(self):
        """A certificate refused after STARTTLS: CertificateRejected, the TLS options dropped."""
        cache = FakeTLSCache()
        d = self.login(tls="starttls", tlsCache=cache)
        self.accept()
        self.reply(GREETING, *EHLO_CLEAR, b"220 go")
        error = CertificateRejected("certificate-untrusted", detail="127.0.0.1:587: nope")
        self.wire.connectionLost(Failure(error))
        self.assertIs(self.failureResultOf(d, CertificateRejected).value, error)
        self.assertEqual(len(cache.forgotten), 1)

    def test_rejected(self):
        """A refused token is UpstreamRejectedToken."""
        d = self.login()
        self.accept()
        self.reply(GREETING, *EHLO_TLS, b"334 " + ERROR_CHALLENGE, b"535 5.7.8 no")
        self.failureResultOf(d, UpstreamRejectedToken)

    def test_timeout(self):
        """A login slower than the timeout: upstream-timeout, connection aborted."""
        d = self.login(timeout=5.0)
        transport = self.accept()
        self.reply(GREETING)
        self.reactor.advance(5.0)
        self.assertEqual(self.failureResultOf(d, Unavailable).value.reason, "upstream-timeout")
        self.assertTrue(transport.disconnecting)
        self.wire.connectionLost(Failure(ConnectionLost()))

    def test_unreachable(self):
        """A connection that cannot be made: upstream-unreachable."""
        d = self.login()
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            None, Failure(ConnectionRefusedError())
        )
        self.reactor.advance(1)
        self.assertEqual(self.failureResultOf(d, Unavailable).value.reason, "upstream-unreachable")

    def test_theConnectorSharesItsCaches(self):
        """UpstreamConnector.smtp dials the address its cache remembers, as IMAP logins do."""
        connector = UpstreamConnector(
            self.reactor, 10.0, FakeTLSCache(), AddressCache(self.reactor)
        )
        connector.addresses.remember("smtp.example.com", 465, "192.0.2.7")
        d = connector.smtp(
            Upstream("smtp.example.com", 465, "plain"), "alice@example.com", "t", "c.example"
        )
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.7", 465))
        imap = connector(Upstream("smtp.example.com", 465, "plain"), "alice@example.com", "t")
        self.assertEqual(self.reactor.tcpClients[1][:2], ("192.0.2.7", 465))
        self.reactor.advance(10.0)
        self.failureResultOf(d, Unavailable)
        self.failureResultOf(imap, Unavailable)

    def probe(self, tls: str = "starttls"):
        return ensureDeferred(
            probeSMTP(
                self.reactor,
                Upstream(host="127.0.0.1", port=587, tls=tls),
                10.0,
                tlsCache=FakeTLSCache(),
            )
        )

    def test_aProbe(self):
        """probeSMTP: greeting, EHLO, STARTTLS, EHLO, QUIT; the extensions over TLS; no AUTH."""
        d = self.probe()
        transport = self.accept()
        self.reply(GREETING, *EHLO_CLEAR, b"220 go")
        self.reply(*EHLO_TLS)
        self.assertEqual(self.successResultOf(d), EXTENSIONS)
        self.assertEqual(
            transport.value(), b"EHLO localhost\r\nSTARTTLS\r\nEHLO localhost\r\nQUIT\r\n"
        )
        self.assertTrue(transport.disconnecting)
        self.reply(b"221 2.0.0 Bye")
        self.wire.connectionLost(Failure(ConnectionDone()))

    def test_aProbedServerThatStaysIsCut(self):
        """A server that does not close after QUIT is cut after the timeout."""
        d = self.probe("plain")
        transport = self.accept()
        self.reply(GREETING, *EHLO_TLS)
        self.successResultOf(d)
        transport.abortConnection = lambda: self.wire.connectionLost(Failure(ConnectionLost()))
        self.reactor.advance(10.0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_aProbeThatFails(self):
        """A server refusing the probe: the error, as for a login."""
        d = self.probe()
        self.accept()
        self.reply(b"554 5.7.1 no")
        self.assertEqual(self.failureResultOf(d, Unavailable).value.reason, "upstream-refused")


class LoopbackSMTPServer(LineReceiver):
    """Just enough of a submission server, over real TLS on loopback; any XOAUTH2 is fine."""

    delimiter = b"\r\n"

    def __init__(self, factory: LoopbackSMTPServers):
        self.factory = factory
        self.tls = not factory.starttls

    def connectionMade(self):
        self.factory.connections += 1
        self.sendLine(b"220 loopback ESMTP")

    def lineReceived(self, line):
        self.factory.lines.append(line)
        if line.startswith(b"EHLO"):
            offer = b"AUTH XOAUTH2" if self.tls else b"STARTTLS"
            self.sendLine(b"250-loopback")
            self.sendLine(b"250 " + offer)
        elif line == b"STARTTLS":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(self.factory.tlsOptions)
            self.tls = True
        elif line.startswith(b"AUTH"):
            self.sendLine(b"235 2.7.0 ok")
        elif line == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.lost.append(reason)
        if self.factory.connections == len(self.factory.lost):
            waiting, self.factory.waiting = self.factory.waiting, []
            for d in waiting:
                d.callback(None)


class LoopbackSMTPServers(LoopbackServers):
    def __init__(self, tlsOptions, starttls: bool):
        super().__init__(tlsOptions, starttls)
        self.lines: list[bytes] = []

    def buildProtocol(self, addr):
        return LoopbackSMTPServer(self)


class RealTLSTests(TestCase):
    """
    ``connectSMTP`` and ``probeSMTP`` over real TLS on loopback, implicit and
    STARTTLS: the certificate verified and a refusal reported as for IMAP.
    """

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        cls.pki = make_pki(os.path.join(cls.dir, "pki"))
        cls.otherCA = make_pki(os.path.join(cls.dir, "other")).ca_cert

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def serve(self, starttls: bool) -> int:
        from twisted.internet import reactor

        with open(self.pki.key) as k, open(self.pki.cert) as c:
            options = ssl.PrivateCertificate.loadPEM(k.read() + c.read()).options()
        servers = self.servers = LoopbackSMTPServers(options, starttls)
        if starttls:
            port = reactor.listenTCP(0, servers, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, servers, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: servers.allClosed())
        return port.getHost().port  # type: ignore[no-any-return]

    def upstream(self, port: int, tls: str, caFile: str) -> Upstream:
        return Upstream(host="localhost", port=port, tls=tls, caFile=caFile)

    def addresses(self, port: int) -> AddressCache:
        from twisted.internet import reactor

        addresses = AddressCache(reactor)
        addresses.remember("localhost", port, "127.0.0.1")
        return addresses

    @ensuringDeferred
    async def test_aLoginOverEachKindOfTLS(self):
        """Implicit TLS and STARTTLS with the right CA log in; STARTTLS says EHLO twice."""
        from twisted.internet import reactor

        for tls in ("implicit", "starttls"):
            port = self.serve(tls == "starttls")
            proto = await connectSMTP(
                reactor,
                self.upstream(port, tls, self.pki.ca_cert),
                "alice@example.com",
                TOKEN.decode(),
                10.0,
                "client.example",
                addresses=self.addresses(port),
            )
            self.assertEqual(proto.extensions, [b"AUTH XOAUTH2"])
            ehlos = [line for line in self.servers.lines if line.startswith(b"EHLO")]
            self.assertEqual(len(ehlos), 2 if tls == "starttls" else 1)
            self.assertEqual(self.servers.lines[-1], AUTH_IR)
            proto.transport.abortConnection()
            await self.servers.allClosed()

    @ensuringDeferred
    async def test_aProbeOverSTARTTLS(self):
        """probeSMTP over real STARTTLS: the extensions offered over TLS, then QUIT."""
        from twisted.internet import reactor

        port = self.serve(starttls=True)
        extensions = await probeSMTP(
            reactor,
            self.upstream(port, "starttls", self.pki.ca_cert),
            10.0,
            addresses=self.addresses(port),
        )
        self.assertEqual(extensions, [b"AUTH XOAUTH2"])
        await self.servers.allClosed()
        self.assertEqual(self.servers.lines[-1], b"QUIT")
        self.assertFalse(any(line.startswith(b"AUTH") for line in self.servers.lines))

    @ensuringDeferred
    async def test_anUntrustedCertificateAfterSTARTTLS(self):
        """A CA the account does not trust: CertificateRejected naming the server; no AUTH sent."""
        from twisted.internet import reactor

        port = self.serve(starttls=True)
        with self.assertRaises(CertificateRejected) as caught:
            await connectSMTP(
                reactor,
                self.upstream(port, "starttls", self.otherCA),
                "alice@example.com",
                TOKEN.decode(),
                10.0,
                addresses=self.addresses(port),
            )
        self.assertEqual(caught.exception.reason, "certificate-untrusted")
        self.assertIn(f"localhost:{port}: unable to get local issuer", caught.exception.detail)
        self.assertEqual(self.servers.connections, 1, "not retried")
        self.assertFalse(any(line.startswith(b"AUTH") for line in self.servers.lines))
