"""
Tests for ``proxy.upstream``: the client-side login state machine, driven
line by line over a ``StringTransport``, and the SASL authenticators.
"""

from __future__ import annotations

import base64
import datetime
import functools
import gc
import os
import shutil
import tempfile
import weakref

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from proxy.errors import CertificateRejected, LimitReached, Unavailable, UpstreamRejectedToken
from proxy.model import Upstream
from proxy.upstream import (
    AddressCache,
    OAUTHBEARERAuthenticator,
    ReportingTLSOptions,
    UpstreamProtocol,
    XOAUTH2Authenticator,
    connectUpstream,
    hasCapability,
    responseCode,
)
from proxy.upstream import tls as upstreamTLS
from proxy.upstream.login import ILoginIO, UpstreamLogin
from proxy.upstream.responses import SHARED_MAX, parseCapabilities
from tests.upstream.certs import PKI, make_pki

USER = b"alice@example.com"
TOKEN = b"ya29.access-token"
XOAUTH2 = base64.b64encode(b"user=" + USER + b"\x01auth=Bearer " + TOKEN + b"\x01\x01")
OAUTHBEARER = base64.b64encode(b"n,a=" + USER + b",\x01auth=Bearer " + TOKEN + b"\x01\x01")
ERROR_CHALLENGE = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS."""

    tlsOptions = None

    def startTLS(self, options):
        self.tlsOptions = options


class AuthenticatorTests(SynchronousTestCase):
    def test_xoauth2Initial(self):
        """XOAUTH2's initial response is user=...^Aauth=Bearer ...^A^A."""
        a = XOAUTH2Authenticator(USER)
        self.assertEqual(a.getName(), b"XOAUTH2")
        self.assertEqual(
            a.challengeResponse(TOKEN, b""),
            b"user=alice@example.com\x01auth=Bearer ya29.access-token\x01\x01",
        )

    def test_xoauth2ErrorChallenge(self):
        """XOAUTH2 answers the error challenge with an empty response."""
        self.assertEqual(XOAUTH2Authenticator(USER).challengeResponse(TOKEN, b"{...}"), b"")

    def test_oauthbearerInitial(self):
        """OAUTHBEARER's initial response carries the RFC 7628 gs2 header."""
        a = OAUTHBEARERAuthenticator(USER)
        self.assertEqual(a.getName(), b"OAUTHBEARER")
        self.assertEqual(
            a.challengeResponse(TOKEN, b""),
            b"n,a=alice@example.com,\x01auth=Bearer ya29.access-token\x01\x01",
        )

    def test_oauthbearerEscapesUser(self):
        """OAUTHBEARER escapes ',' and '=' in the authzid as =2C and =3D."""
        r = OAUTHBEARERAuthenticator(b"a,b=c").challengeResponse(TOKEN, b"")
        self.assertTrue(r.startswith(b"n,a=a=2Cb=3Dc,\x01"))

    def test_oauthbearerErrorChallenge(self):
        """OAUTHBEARER answers the error challenge with %x01."""
        self.assertEqual(OAUTHBEARERAuthenticator(USER).challengeResponse(TOKEN, b"{}"), b"\x01")


class HelperTests(SynchronousTestCase):
    def test_responseCode(self):
        """responseCode splits a bracketed code and its arguments, upper-casing the code."""
        self.assertEqual(
            responseCode(b"[capability IMAP4rev1 X] hi"), (b"CAPABILITY", b"IMAP4rev1 X")
        )
        self.assertEqual(responseCode(b"[UNAVAILABLE] later"), (b"UNAVAILABLE", b""))
        self.assertEqual(responseCode(b"no code"), (None, b""))

    def test_hasCapability(self):
        """hasCapability is case-insensitive."""
        self.assertTrue(hasCapability([b"auth=xoauth2"], b"AUTH=XOAUTH2"))
        self.assertFalse(hasCapability([b"AUTH=PLAIN"], b"AUTH=XOAUTH2"))


class _Driver(SynchronousTestCase):
    """Helpers to feed an UpstreamProtocol lines and read what it sent."""

    def connect(self, mode: str = "implicit", authenticator=None, tlsOptions=None):
        self.transport = TLSStringTransport()
        self.proto = UpstreamProtocol(
            authenticator or XOAUTH2Authenticator(USER), TOKEN, mode, tlsOptions
        )
        self.proto.makeConnection(self.transport)
        self.results: list = []
        self.proto.ready.addBoth(self.record)
        return self.proto

    def record(self, result):
        # Keep success flowing to later callbacks; swallow (after recording)
        # failures so none is left unhandled.
        self.results.append(result)
        return None if isinstance(result, Failure) else result

    def receive(self, *lines: bytes) -> None:
        for line in lines:
            self.proto.dataReceived(line + b"\r\n")

    def sent(self) -> list[bytes]:
        """The lines written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        self.assertTrue(data == b"" or data.endswith(b"\r\n"), data)
        return data.split(b"\r\n")[:-1]

    def failed(self, kind: type) -> Exception:
        self.assertEqual(len(self.results), 1, "ready has not fired")
        result = self.results[0]
        self.assertIsInstance(result, Failure)
        result.trap(kind)
        self.assertTrue(self.transport.disconnecting)
        return result.value

    def loggedIn(self) -> UpstreamProtocol:
        self.assertEqual(self.results, [self.proto])
        return self.proto

    def greetAndAuth(self) -> None:
        """Greeting with capabilities and SASL-IR: the login command goes out."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=PLAIN] ready")
        self.assertEqual(self.sent(), [b"U1 AUTHENTICATE XOAUTH2 " + XOAUTH2])


class UpstreamProtocolTests(_Driver):
    def test_saslIR(self):
        """Greeting capabilities with SASL-IR: AUTHENTICATE XOAUTH2 with the initial response."""
        self.greetAndAuth()
        self.assertEqual(self.results, [])
        self.receive(b"U1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in")
        self.assertEqual(list(self.loggedIn().capabilities), [b"IMAP4rev1", b"IDLE", b"MOVE"])
        self.assertEqual(self.sent(), [])
        self.assertFalse(self.transport.disconnecting)

    def test_aFailingSessionKeeperDoesNotStopTheLogin(self):
        """
        Keeping the TLS session for resumption is an optimisation: when it
        fails (a pyOpenSSL without what it relies on), the login still ends
        logged in, instead of hanging until the upstream timeout.
        """

        class Options:
            def remember(self, transport):
                raise AttributeError("SSL_session_reused")

        self.patch(upstreamTLS, "_keepFailed", False)
        for _ in range(2):
            self.connect(tlsOptions=Options())
            self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready")
            self.sent()
            self.receive(b"U1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in")
            self.assertEqual(list(self.loggedIn().capabilities), [b"IMAP4rev1", b"IDLE"])
        # Logged once, not at every login.
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_greetingWithoutCapabilities(self):
        """A greeting without capabilities makes the proxy ask CAPABILITY first."""
        self.connect()
        self.receive(b"* OK IMAP ready")
        self.assertEqual(self.sent(), [b"U1 CAPABILITY"])
        self.receive(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2", b"U1 OK done")
        self.assertEqual(self.sent(), [b"U2 AUTHENTICATE XOAUTH2 " + XOAUTH2])
        self.receive(b"U2 OK [CAPABILITY IMAP4rev1 IDLE] ok")
        self.assertEqual(list(self.loggedIn().capabilities), [b"IMAP4rev1", b"IDLE"])

    def test_capabilityRefused(self):
        """A failed CAPABILITY command is Unavailable."""
        self.connect()
        self.receive(b"* OK IMAP ready", b"U1 BAD no")
        self.failed(Unavailable)

    def test_noSaslIR(self):
        """Without SASL-IR the proxy waits for '+' before sending the initial response."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready")
        self.assertEqual(self.sent(), [b"U1 AUTHENTICATE XOAUTH2"])
        self.receive(b"+ ")
        self.assertEqual(self.sent(), [XOAUTH2])
        self.receive(b"U1 OK [CAPABILITY IMAP4rev1] ok")
        self.loggedIn()

    def test_noSaslIRBareContinuation(self):
        """A bare '+' continuation (no trailing space) also gets the initial response."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready", b"+")
        self.assertEqual(self.sent(), [b"U1 AUTHENTICATE XOAUTH2", XOAUTH2])

    def test_errorChallenge(self):
        """The error challenge gets an empty line; the tagged NO is UpstreamRejectedToken."""
        self.greetAndAuth()
        self.receive(b"+ " + ERROR_CHALLENGE)
        self.assertEqual(self.sent(), [b""])
        self.assertEqual(self.results, [])
        self.receive(b"U1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)")
        self.failed(UpstreamRejectedToken)

    def test_errorChallengeWithoutSaslIR(self):
        """Without SASL-IR the second '+' is the error challenge, answered with an empty line."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready", b"+ ")
        self.sent()
        self.receive(b"+ " + ERROR_CHALLENGE)
        self.assertEqual(self.sent(), [b""])
        self.receive(b"U1 NO [AUTHENTICATIONFAILED] nope")
        self.failed(UpstreamRejectedToken)

    def test_plainNo(self):
        """A NO without a response code is a refusal of the token."""
        self.greetAndAuth()
        self.receive(b"U1 NO Invalid credentials")
        self.failed(UpstreamRejectedToken)

    def test_unavailable(self):
        """NO [UNAVAILABLE] is Unavailable, not a token refusal."""
        self.greetAndAuth()
        self.receive(b"U1 NO [UNAVAILABLE] try later")
        e = self.failed(Unavailable)
        self.assertNotIsInstance(e, UpstreamRejectedToken)
        self.assertEqual(e.reason, "upstream-unavailable")

    def test_limit(self):
        """NO [LIMIT] is LimitReached."""
        self.greetAndAuth()
        self.receive(b"U1 NO [LIMIT] Too many simultaneous connections")
        self.failed(LimitReached)

    def test_okWithoutCapabilityCode(self):
        """An OK without CAPABILITY makes the proxy ask and use the untagged answer."""
        self.greetAndAuth()
        self.receive(b"U1 OK Logged in")
        self.assertEqual(self.sent(), [b"U2 CAPABILITY"])
        self.assertEqual(self.results, [])
        self.receive(b"* CAPABILITY IMAP4rev1 IDLE NAMESPACE", b"U2 OK Capability completed")
        self.assertEqual(list(self.loggedIn().capabilities), [b"IMAP4rev1", b"IDLE", b"NAMESPACE"])

    def test_postLoginCapabilityFailure(self):
        """A failed CAPABILITY after login is Unavailable."""
        self.greetAndAuth()
        self.receive(b"U1 OK Logged in", b"U2 NO sorry")
        self.failed(Unavailable)

    def test_untaggedCapabilityBeforeOk(self):
        """An untagged CAPABILITY before the tagged OK is used without asking again."""
        self.greetAndAuth()
        self.receive(b"* CAPABILITY IMAP4rev1 IDLE", b"U1 OK Logged in")
        self.assertEqual(list(self.loggedIn().capabilities), [b"IMAP4rev1", b"IDLE"])
        self.assertEqual(self.sent(), [])

    def test_preLoginCapabilitiesDiscarded(self):
        """The capabilities seen before login are not reported as the session's."""
        self.greetAndAuth()
        self.receive(b"U1 OK Logged in", b"U2 OK but no untagged answer")
        self.failed(Unavailable)

    def test_oauthbearerOnly(self):
        """When only OAUTHBEARER is advertised it is used, with the gs2 header."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER] ready")
        self.assertEqual(self.sent(), [b"U1 AUTHENTICATE OAUTHBEARER " + OAUTHBEARER])
        self.receive(b"+ " + ERROR_CHALLENGE)
        self.assertEqual(self.sent(), [base64.b64encode(b"\x01")])
        self.receive(b"U1 NO [AUTHENTICATIONFAILED] no")
        self.failed(UpstreamRejectedToken)

    def test_xoauth2Preferred(self):
        """With both mechanisms advertised XOAUTH2 is used."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER AUTH=XOAUTH2] hi")
        self.assertEqual(self.sent(), [b"U1 AUTHENTICATE XOAUTH2 " + XOAUTH2])

    def test_noMechanism(self):
        """A server offering neither mechanism is Unavailable and gets no credentials."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi")
        self.assertEqual(self.failed(Unavailable).reason, "upstream-no-xoauth2")
        self.assertNotIn(TOKEN, self.transport.value())

    def test_byeGreeting(self):
        """A * BYE greeting is Unavailable."""
        self.connect()
        self.receive(b"* BYE too busy")
        self.assertEqual(self.failed(Unavailable).reason, "upstream-bye")

    def test_preauthGreeting(self):
        """A PREAUTH greeting is not a server to log in to: Unavailable."""
        self.connect()
        self.receive(b"* PREAUTH hello")
        self.failed(Unavailable)

    def test_connectionLostMidLogin(self):
        """Losing the connection during the login is Unavailable."""
        self.greetAndAuth()
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.failed(Unavailable).reason, "upstream-closed")

    def test_connectionLostBeforeGreeting(self):
        """Losing the connection before the greeting is Unavailable."""
        self.connect()
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.failed(Unavailable)

    def test_lineTooLong(self):
        """A line longer than MAX_LENGTH is Unavailable."""
        self.connect()
        self.proto.dataReceived(b"* OK " + b"x" * (UpstreamProtocol.MAX_LENGTH + 10))
        self.assertEqual(self.failed(Unavailable).reason, "upstream-protocol")

    def test_wrongTag(self):
        """A tagged answer to a command never sent is Unavailable."""
        self.greetAndAuth()
        self.receive(b"X9 OK what")
        self.failed(Unavailable)

    def test_failsOnce(self):
        """After a failure, further lines and the connection loss fire nothing more."""
        self.greetAndAuth()
        self.receive(b"U1 NO [LIMIT] no", b"U1 OK yes")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.results), 1)
        self.results[0].trap(LimitReached)

    def test_starttls(self):
        """In starttls mode the proxy upgrades first and asks capabilities again."""
        options = object()
        self.connect(mode="starttls", tlsOptions=options)
        self.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi")
        self.assertEqual(self.sent(), [b"U1 STARTTLS"])
        self.assertIsNone(self.transport.tlsOptions)
        self.proto.dataReceived(b"U1 OK Begin TLS\r\n* injected before TLS\r\n")
        self.assertIs(self.transport.tlsOptions, options)
        self.assertEqual(self.sent(), [b"U2 CAPABILITY"])
        self.receive(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2", b"U2 OK")
        self.assertEqual(self.sent(), [b"U3 AUTHENTICATE XOAUTH2 " + XOAUTH2])
        self.receive(b"U3 OK [CAPABILITY IMAP4rev1] ok")
        self.loggedIn()

    def test_starttlsPreTLSDataDropped(self):
        """Bytes after the STARTTLS OK, before the handshake, are discarded."""
        self.connect(mode="starttls", tlsOptions=object())
        self.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi")
        self.sent()
        self.proto.dataReceived(b"U1 OK Begin TLS\r\nU2 OK [CAPABILITY AUTH=XOAUTH2] fake\r\n")
        self.assertEqual(self.sent(), [b"U2 CAPABILITY"])
        self.assertEqual(self.results, [])

    def test_starttlsNotOffered(self):
        """In starttls mode a server without STARTTLS is Unavailable; no credentials are sent."""
        self.connect(mode="starttls", tlsOptions=object())
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi")
        self.assertEqual(self.failed(Unavailable).reason, "upstream-no-starttls")
        self.assertNotIn(TOKEN, self.transport.value())

    def test_starttlsRefused(self):
        """A refused STARTTLS is Unavailable."""
        self.connect(mode="starttls", tlsOptions=object())
        self.receive(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi", b"U1 NO no tls")
        self.failed(Unavailable)


class TakeOverTests(_Driver):
    """What happens to the bytes around the tagged OK of the login."""

    def test_leftoverReturned(self):
        """Bytes in the same packet as the tagged OK come back from takeOver() untouched."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi")
        self.sent()
        tail = b"* 3 EXISTS\r\n* OK [partial line with \x00 and no CRLF"
        self.proto.dataReceived(b"U1 OK [CAPABILITY IMAP4rev1] ok\r\n" + tail)
        self.loggedIn()
        self.assertEqual(self.transport.producerState, "paused")
        got: list[bytes] = []
        leftover = self.proto.takeOver(got.append, lambda reason: None)
        self.assertEqual(leftover, tail)
        self.assertEqual(got, [])

    def test_laterBytesToSink(self):
        """After takeOver() every byte read goes to the sink as it is, unparsed."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi")
        self.receive(b"U1 OK [CAPABILITY IMAP4rev1] ok")
        self.transport.clear()
        got: list[bytes] = []
        self.assertEqual(self.proto.takeOver(got.append, lambda reason: None), b"")
        self.proto.dataReceived(b"* BYE not parsed\r\n")
        self.proto.dataReceived(b"U1 NO also not parsed")
        self.assertEqual(got, [b"* BYE not parsed\r\n", b"U1 NO also not parsed"])
        self.assertEqual(self.proto.bytesReceived, len(b"".join(got)))
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_takeOverInsideReadyCallback(self):
        """takeOver() called from the ready callback still gets the rest of the packet, once."""
        self.connect()
        self.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi")
        got: list[bytes] = []
        leftovers: list[bytes] = []
        self.proto.ready.addCallback(
            lambda p: leftovers.append(p.takeOver(got.append, lambda reason: None))
        )
        self.proto.dataReceived(b"U1 OK [CAPABILITY IMAP4rev1] ok\r\n* 1 EXISTS\r\n* 2 EXISTS\r\n")
        self.proto.dataReceived(b"later")
        self.assertEqual(b"".join(leftovers) + b"".join(got), b"* 1 EXISTS\r\n* 2 EXISTS\r\nlater")

    def test_onLost(self):
        """After takeOver() the connection loss goes to onLost."""
        self.connect()
        self.receive(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi", b"U1 OK [CAPABILITY X] ok"
        )
        lost: list = []
        self.proto.takeOver(lambda data: None, lost.append)
        reason = Failure(ConnectionDone())
        self.proto.connectionLost(reason)
        self.assertEqual(lost, [reason])

    def test_theLoginMachineGoesAtTheHandOver(self):
        """
        Once the splice takes the connection, the login machine (with the
        access token and the XOAUTH2 string it held) is let go with its
        authenticator; the session's capabilities stay.
        """
        self.connect()
        self.receive(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi", b"U1 OK [CAPABILITY X Y] ok"
        )
        self.assertIsNotNone(self.proto.authenticator)
        login = weakref.ref(self.proto._login)
        self.proto.takeOver(lambda data: None, lambda reason: None)
        gc.collect()
        self.assertIsNone(login())
        self.assertEqual(list(self.proto.capabilities), [b"X", b"Y"])
        self.assertIsNone(self.proto.authenticator)


@implementer(ILoginIO)
class RecordingIO:
    """An ``ILoginIO`` that records what the login machine asks of it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.upgrades = 0
        self.succeeded = 0
        self.errors: list = []

    def sendLine(self, line: bytes) -> None:
        self.sent.append(line)

    def upgradeToTLS(self) -> None:
        self.upgrades += 1

    def loginSucceeded(self) -> None:
        self.succeeded += 1

    def loginFailed(self, error) -> None:
        self.errors.append(error)


GREETING_IR = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi"
GREETING_NO_IR = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi"

# Lines that bring a fresh login (STARTTLS first or not) to each state in
# which it waits for the server.
WAITING = {
    "greeting": (False, ()),
    "greetingBeforeTLS": (True, ()),
    "capability": (False, (b"* OK hi",)),
    "capabilityBeforeTLS": (True, (b"* OK hi",)),
    "startingTLS": (True, (b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi",)),
    "awaitingContinuation": (False, (GREETING_NO_IR,)),
    "authenticating": (False, (GREETING_IR,)),
    "authenticatingCapabilitiesSeen": (False, (GREETING_IR, b"* CAPABILITY IMAP4rev1 X")),
    "postLoginCapability": (False, (GREETING_IR, b"U1 OK in")),
    "postLoginCapabilitySeen": (False, (GREETING_IR, b"U1 OK in", b"* CAPABILITY IMAP4rev1")),
}


class LoginMachineTests(SynchronousTestCase):
    """
    ``UpstreamLogin`` alone, no protocol and no transport: each transition,
    by the lines that cause it, and what the machine sends and concludes.
    """

    def login(self, state: str = "greeting") -> UpstreamLogin:
        startTLS, lines = WAITING[state]
        self.io = RecordingIO()
        self.machine = UpstreamLogin(
            self.io, XOAUTH2Authenticator(USER), TOKEN, startTLS, "imap.example.com:993"
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

    def test_loginsToOneServerShareItsCapabilities(self):
        """
        Two logins told the same capabilities hold one tuple of them (a held
        session keeps its server's): not two lists of the same bytes.
        """
        held = []
        for _ in range(2):
            self.login("authenticating")
            self.feed(b"U1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] in")
            self.assertEqual(self.io.succeeded, 1)
            held.append(self.machine.capabilities)
        self.assertEqual(held[0], (b"IMAP4rev1", b"IDLE", b"MOVE"))
        self.assertIs(held[0], held[1])

    def test_aLongCapabilityLineIsNotKept(self):
        """
        A capability line longer than any real one is parsed for its login
        only: what a server sends cannot grow the shared cache's memory.
        """
        text = b" ".join(b"X-%d" % n for n in range(SHARED_MAX // 4))
        self.assertGreater(len(text), SHARED_MAX)
        first, second = parseCapabilities(text), parseCapabilities(text)
        self.assertEqual(first, second)
        self.assertIsNot(first, second)
        self.assertIs(parseCapabilities(b"IMAP4rev1 IDLE"), parseCapabilities(b"IMAP4rev1 IDLE"))

    def test_everyWaitingStateFailsOnAMalformedLine(self):
        """In every waiting state, a line that is no response is upstream-protocol."""
        for state in WAITING:
            for line in (b"garbage", b"U9 OK not a command of ours"):
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertEqual(self.reason(), "upstream-protocol")

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
        """A connection ended by a refused certificate fails with that error, not closed."""
        for state in WAITING:
            with self.subTest(state=state):
                error = CertificateRejected("certificate-expired", detail="x:993: expired")
                self.login(state).connectionLost(Failure(error))
                self.assertIs(self.failure(), error)

    def test_twistedsOwnNameCheckIsACertificateRejection(self):
        """Twisted's own host-name check (VerificationError) reads as certificate-hostname."""
        self.login("greeting").connectionLost(Failure(VerificationError(errors=[])))
        error = self.failure()
        self.assertIsInstance(error, CertificateRejected)
        self.assertEqual(error.reason, "certificate-hostname")
        self.assertIn("imap.example.com:993", error.detail)

    def test_untaggedChatterIsIgnoredOnceGreeted(self):
        """After the greeting, untagged lines that are not CAPABILITY change nothing."""
        for state in WAITING:
            if state.startswith("greeting"):
                continue
            with self.subTest(state=state):
                self.login(state)
                self.feed(b"* OK still there", b"* OK [CAPABILITY BOGUS]", b"* 3 EXISTS")
                self.feed(b"* BYE going soon")
                self.assertEqual((self.io.sent, self.io.errors, self.io.succeeded), ([], [], 0))

    def test_theGreetingMustBeOKOrBye(self):
        """Before the greeting, anything but * OK or * BYE is upstream-protocol."""
        lines = (b"* PREAUTH hi", b"* CAPABILITY IMAP4rev1", b"+ go", b"* 1 EXISTS")
        for state in ("greeting", "greetingBeforeTLS"):
            for line in lines:
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertEqual(self.reason(), "upstream-protocol")
                    self.assertEqual(self.io.sent, [])
            with self.subTest(state=state, line=b"* BYE"):
                self.login(state)
                self.feed(b"* BYE busy")
                self.assertEqual(self.reason(), "upstream-bye")

    def test_theGreetingsInputsTaggedFailToo(self):
        """Tagged inputs before any command (not reachable by a line) also fail the login."""
        inputs = [
            lambda m: m.inputs.taggedOK(),
            lambda m: m.inputs.taggedOKCapabilities([b"X"]),
            lambda m: m.inputs.taggedRefused(None),
        ]
        for state in ("greeting", "greetingBeforeTLS"):
            for feed in inputs:
                with self.subTest(state=state):
                    feed(self.login(state))
                    self.assertEqual(self.reason(), "upstream-protocol")

    def test_capabilityCollectsThenDecides(self):
        """CAPABILITY: untagged answers collected, '+' ignored, the tagged OK decides."""
        self.login("capability")
        self.feed(b"+ nonsense", b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR", b"U1 OK")
        self.assertEqual(self.io.sent, [b"U2 AUTHENTICATE XOAUTH2 " + XOAUTH2])

    def test_capabilityInTheTaggedOK(self):
        """Capabilities in the CAPABILITY command's tagged OK count too."""
        self.login("capability")
        self.feed(b"U1 OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] done")
        self.assertEqual(self.io.sent, [b"U2 AUTHENTICATE XOAUTH2"])

    def test_capabilityRefused(self):
        """A refused CAPABILITY (before or after STARTTLS) is upstream-capability."""
        for state in ("capability", "capabilityBeforeTLS"):
            with self.subTest(state=state):
                self.login(state)
                self.feed(b"U1 NO no")
                self.assertEqual(self.reason(), "upstream-capability")

    def test_capabilityBeforeTLSLeadsToSTARTTLS(self):
        """Capabilities asked before TLS: STARTTLS if offered (tagged OK, with or without code)."""
        for answer in (
            (b"* CAPABILITY IMAP4rev1 STARTTLS", b"U1 OK"),
            (b"U1 OK [CAPABILITY STARTTLS] x",),
        ):
            with self.subTest(answer=answer):
                self.login("capabilityBeforeTLS")
                self.feed(*answer)
                self.assertEqual(self.io.sent, [b"U2 STARTTLS"])
                self.assertEqual(self.io.upgrades, 0)

    def test_noSTARTTLSOffered(self):
        """Capabilities without STARTTLS, in starttls mode: upstream-no-starttls, nothing sent."""
        self.login("capabilityBeforeTLS")
        self.feed(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR", b"U1 OK")
        self.assertEqual(self.reason(), "upstream-no-starttls")
        self.assertEqual(self.io.sent, [])

    def test_startingTLSUpgradesAndAsksAgain(self):
        """STARTTLS OK: upgrade, then ask CAPABILITY afresh; what came before TLS is void."""
        for ok in (b"U1 OK begin", b"U1 OK [CAPABILITY AUTH=XOAUTH2 SASL-IR] forged"):
            with self.subTest(ok=ok):
                self.login("startingTLS")
                self.feed(b"* CAPABILITY AUTH=XOAUTH2 SASL-IR", b"+ x", ok)
                self.assertEqual(self.io.upgrades, 1)
                self.assertEqual(self.io.sent, [b"U2 CAPABILITY"])
                self.assertEqual(list(self.machine.capabilities), [])
                self.feed(b"U2 OK no capabilities")
                self.assertEqual(self.reason(), "upstream-no-xoauth2")

    def test_startingTLSRefused(self):
        """A refused STARTTLS is upstream-starttls."""
        self.login("startingTLS")
        self.feed(b"U1 BAD no")
        self.assertEqual(self.reason(), "upstream-starttls")
        self.assertEqual(self.io.upgrades, 0)

    def test_choosingAMechanism(self):
        """XOAUTH2 preferred, OAUTHBEARER otherwise, SASL-IR decides the first command."""
        cases = [
            (b"AUTH=XOAUTH2 AUTH=OAUTHBEARER SASL-IR", b"U1 AUTHENTICATE XOAUTH2 " + XOAUTH2),
            (b"AUTH=OAUTHBEARER SASL-IR", b"U1 AUTHENTICATE OAUTHBEARER " + OAUTHBEARER),
            (b"AUTH=XOAUTH2", b"U1 AUTHENTICATE XOAUTH2"),
            (b"AUTH=OAUTHBEARER", b"U1 AUTHENTICATE OAUTHBEARER"),
        ]
        for caps, command in cases:
            with self.subTest(caps=caps):
                self.login("greeting")
                self.feed(b"* OK [CAPABILITY IMAP4rev1 " + caps + b"] hi")
                self.assertEqual(self.io.sent, [command])
                self.assertEqual(
                    list(self.machine.capabilities), [], "collected afresh after login"
                )

    def test_noMechanism(self):
        """Neither mechanism offered: upstream-no-xoauth2, and no credentials sent."""
        self.login("greeting")
        self.feed(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi")
        self.assertEqual(self.reason(), "upstream-no-xoauth2")
        self.assertEqual(self.io.sent, [])

    def test_awaitingContinuation(self):
        """Without SASL-IR: the first "+" gets the credentials; capabilities before it are void."""
        self.login("awaitingContinuation")
        self.feed(b"* CAPABILITY IMAP4rev1 EARLY", b"+ ")
        self.assertEqual(self.io.sent, [XOAUTH2])
        self.feed(b"U1 OK in")
        self.assertEqual(self.io.sent, [XOAUTH2, b"U2 CAPABILITY"])

    def test_anOKBeforeTheCredentialsIsAProtocolError(self):
        """A server that accepts AUTHENTICATE before the credentials is not one to trust."""
        for ok in (b"U1 OK in", b"U1 OK [CAPABILITY IMAP4rev1] in"):
            with self.subTest(ok=ok):
                self.login("awaitingContinuation")
                self.feed(ok)
                self.assertEqual(self.reason(), "upstream-protocol")

    def test_refusals(self):
        """A refused AUTHENTICATE: LIMIT, UNAVAILABLE, or the token refused (any other NO)."""
        cases = [
            (b"U1 NO [LIMIT] too many", LimitReached, "upstream-limit"),
            (b"U1 NO [UNAVAILABLE] later", Unavailable, "upstream-unavailable"),
            (b"U1 NO [AUTHENTICATIONFAILED] no", UpstreamRejectedToken, "upstream-token-rejected"),
            (b"U1 BAD what", UpstreamRejectedToken, "upstream-token-rejected"),
        ]
        for state in ("awaitingContinuation", "authenticating", "authenticatingCapabilitiesSeen"):
            for line, kind, reason in cases:
                with self.subTest(state=state, line=line):
                    self.login(state)
                    self.feed(line)
                    self.assertIsInstance(self.failure(), kind)
                    self.assertEqual(self.reason(), reason)

    def test_theErrorChallengeIsAnswered(self):
        """After the credentials, a '+' is the error challenge: answered, the NO follows."""
        for state in ("authenticating", "authenticatingCapabilitiesSeen"):
            with self.subTest(state=state):
                self.login(state)
                self.feed(b"+ " + ERROR_CHALLENGE)
                self.assertEqual(self.io.sent, [b""])
                self.assertEqual(self.io.errors, [])

    def test_aMalformedErrorChallengeIsAnsweredToo(self):
        """An error challenge that is not base64 gets the same answer, and raises nothing."""
        self.login("authenticating")
        self.feed(b"+ not*base64=")
        self.assertEqual(self.io.sent, [b""])
        self.assertEqual(self.io.errors, [])

    def test_loggedInWithCapabilities(self):
        """OK [CAPABILITY …]: logged in with exactly those, nothing more sent."""
        for state in ("authenticating", "authenticatingCapabilitiesSeen"):
            with self.subTest(state=state):
                self.login(state)
                self.feed(b"U1 OK [CAPABILITY IMAP4rev1 IDLE] in")
                self.assertEqual(self.io.succeeded, 1)
                self.assertEqual(list(self.machine.capabilities), [b"IMAP4rev1", b"IDLE"])
                self.assertEqual(self.io.sent, [])

    def test_untaggedCapabilitiesBeforeTheOK(self):
        """Capabilities seen between the credentials and a plain OK are the session's."""
        self.login("authenticatingCapabilitiesSeen")
        self.feed(b"* CAPABILITY IMAP4rev1 IDLE MOVE", b"U1 OK in")
        self.assertEqual(self.io.succeeded, 1)
        self.assertEqual(list(self.machine.capabilities), [b"IMAP4rev1", b"IDLE", b"MOVE"])

    def test_postLoginCapability(self):
        """Logged in without capabilities: they are asked; the answer must carry some."""
        for ok in (b"U2 OK", b"U2 OK [CAPABILITY IGNORED] done"):
            with self.subTest(ok=ok):
                self.login("postLoginCapability")
                self.feed(b"+ x", b"* CAPABILITY IMAP4rev1 IDLE", ok)
                self.assertEqual(self.io.succeeded, 1)
                self.assertEqual(list(self.machine.capabilities), [b"IMAP4rev1", b"IDLE"])

    def test_postLoginCapabilityWithoutAnswer(self):
        """A CAPABILITY after login answered without capabilities, or refused, fails."""
        cases = [
            ("postLoginCapability", b"U2 OK"),
            ("postLoginCapability", b"U2 OK [CAPABILITY X] only in the code"),
            ("postLoginCapability", b"U2 NO"),
            ("postLoginCapabilitySeen", b"U2 BAD"),
        ]
        for state, line in cases:
            with self.subTest(state=state, line=line):
                self.login(state)
                self.feed(line)
                self.assertEqual(self.reason(), "upstream-capability")

    def test_aFailedLoginHearsNothingMore(self):
        """After a failure every input is ignored: one report, nothing sent."""
        self.login("authenticating")
        self.feed(b"U1 NO [LIMIT] no")
        self.feed(GREETING_IR, b"* CAPABILITY X", b"+ x", b"U1 OK", b"U1 OK [CAPABILITY X]")
        self.feed(b"U1 NO", b"garbage", b"* BYE", b"* 1 EXISTS", b"* OK [CAPABILITY X] x")
        self.machine.unusable()
        self.machine.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.io.errors), 1)
        self.assertEqual(self.io.sent, [])

    def test_aLoggedInMachineIgnoresTheEnd(self):
        """Once logged in, the connection's end and a bad line are not the login's business."""
        self.login("authenticating")
        self.feed(b"U1 OK [CAPABILITY IMAP4rev1] in")
        self.machine.unusable()
        self.machine.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.io.succeeded, self.io.errors), (1, []))


def ensuringDeferred(f):
    """A coroutine test method, run by trial as a Deferred."""

    @functools.wraps(f)
    def run(*args, **kwargs):
        return ensureDeferred(f(*args, **kwargs))

    return run


def expiredPKI(directory: str) -> PKI:
    """A CA and a ``localhost`` certificate from it that expired yesterday."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    caKey, leafKey = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired test CA")])

    def build(subject, key, notAfter, extensions):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(caName)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(notAfter)
        )
        for extension, critical in extensions:
            b = b.add_extension(extension, critical=critical)
        return b.sign(caKey, hashes.SHA256())

    ca = build(
        caName,
        caKey,
        now + datetime.timedelta(days=3),
        [(x509.BasicConstraints(ca=True, path_length=0), True)],
    )
    leaf = build(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        leafKey,
        now - datetime.timedelta(days=1),
        [(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)],
    )
    pki = PKI(*(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")))
    pem = serialization.Encoding.PEM
    for path, data in (
        (pki.ca_cert, ca.public_bytes(pem)),
        (pki.cert, leaf.public_bytes(pem)),
        (
            pki.key,
            leafKey.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
    ):
        with open(path, "wb") as f:
            f.write(data)
    return pki


class LoopbackIMAPServer(LineReceiver):
    """
    Just enough of an IMAP server, over real TLS on loopback: implicit TLS,
    or STARTTLS first; it accepts any XOAUTH2 login.
    """

    delimiter = b"\r\n"

    def __init__(self, factory: LoopbackServers):
        self.factory = factory

    def connectionMade(self):
        self.factory.connections += 1
        caps = b"STARTTLS" if self.factory.starttls else b"SASL-IR AUTH=XOAUTH2"
        self.sendLine(b"* OK [CAPABILITY IMAP4rev1 " + caps + b"] loopback")

    def lineReceived(self, line):
        tag, _, command = line.partition(b" ")
        if command == b"STARTTLS":
            self.sendLine(tag + b" OK begin TLS")
            self.transport.startTLS(self.factory.tlsOptions)
        elif command == b"CAPABILITY":
            self.sendLine(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2")
            self.sendLine(tag + b" OK done")
        elif command.startswith(b"AUTHENTICATE"):
            self.sendLine(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] in")

    def connectionLost(self, reason):
        self.factory.lost.append(reason)
        if self.factory.connections == len(self.factory.lost):
            waiting, self.factory.waiting = self.factory.waiting, []
            for d in waiting:
                d.callback(None)


class LoopbackServers(Factory):
    """Counts connections, and tells when all of them have ended."""

    def __init__(self, tlsOptions, starttls: bool):
        self.tlsOptions = tlsOptions
        self.starttls = starttls
        self.connections = 0
        self.lost: list = []
        self.waiting: list[Deferred] = []

    def buildProtocol(self, addr):
        return LoopbackIMAPServer(self)

    def allClosed(self) -> Deferred:
        if self.connections == len(self.lost):
            return succeed(None)
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d


def serveLoopback(case: TestCase, options, starttls: bool) -> int:
    """
    Listen on loopback with ``LoopbackServers`` (kept as ``case.servers``),
    implicit TLS or STARTTLS with ``options``, until the test ends.

    :return: the port.
    """
    from twisted.internet import reactor

    servers = case.servers = LoopbackServers(options, starttls)  # type: ignore[attr-defined]
    if starttls:
        port = reactor.listenTCP(0, servers, interface="127.0.0.1")
    else:
        port = reactor.listenSSL(0, servers, options, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    # Last in, first out: the server's connections end before it stops.
    case.addCleanup(lambda: servers.allClosed())
    return port.getHost().port  # type: ignore[no-any-return]


class ReportingTLSOptionsTests(SynchronousTestCase):
    """The per-connection options pass session resumption on to the shared ones."""

    def test_rememberIsPassedOn(self):
        """remember() reaches the shared options (ResumingTLSOptions), with the transport."""
        seen: list = []

        class Shared:
            def remember(self, transport):
                seen.append(transport)

        transport = object()
        ReportingTLSOptions(Shared(), "imap.example.com", 993).remember(transport)
        self.assertEqual(seen, [transport])

    def test_sharedOptionsWithoutResumption(self):
        """Shared options that do not resume are fine too."""
        ReportingTLSOptions(object(), "imap.example.com", 993).remember(object())


class CertificateRefusalTests(TestCase):
    """
    A provider whose certificate fails verification, over real TLS on
    loopback (implicit and STARTTLS): the login ends in CertificateRejected
    with a reason of its own and a detail naming the server and the
    certificate, after one attempt; not in "upstream-closed".
    """

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        cls.pki = make_pki(os.path.join(cls.dir, "pki"))
        cls.otherCA = make_pki(os.path.join(cls.dir, "other")).ca_cert
        cls.expired = expiredPKI(os.path.join(cls.dir, "expired"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def serve(self, pki: PKI, starttls: bool = False) -> int:
        with open(pki.key) as k, open(pki.cert) as c:
            options = ssl.PrivateCertificate.loadPEM(k.read() + c.read()).options()
        return serveLoopback(self, options, starttls)

    async def login(self, host: str, port: int, caFile: str, tls: str = "implicit"):
        from twisted.internet import reactor

        addresses = AddressCache(reactor)
        # A name the certificate may not carry, dialled on loopback without a lookup.
        addresses.remember(host, port, "127.0.0.1")
        return await connectUpstream(
            reactor,
            Upstream(host=host, port=port, tls=tls, caFile=caFile),
            "alice@example.com",
            TOKEN.decode(),
            10.0,
            addresses=addresses,
        )

    async def refused(self, host: str, port: int, caFile: str, tls: str = "implicit"):
        with self.assertRaises(CertificateRejected) as caught:
            await self.login(host, port, caFile, tls)
        error = caught.exception
        self.assertEqual(self.servers.connections, 1, "a refused certificate is not retried")
        self.assertNotIn(TOKEN.decode(), error.detail)
        self.assertEqual(
            error.imapResponse(),
            b"NO [UNAVAILABLE] The provider's certificate was refused, the operator must act",
        )
        return error

    @ensuringDeferred
    async def test_aTrustedCertificateLogsIn(self):
        """The control: the right CA and name log in, over implicit TLS and STARTTLS."""
        for starttls in (False, True):
            port = self.serve(self.pki, starttls)
            tls = "starttls" if starttls else "implicit"
            proto = await self.login("localhost", port, self.pki.ca_cert, tls)
            self.assertEqual(list(proto.capabilities), [b"IMAP4rev1", b"IDLE"])
            proto.transport.abortConnection()
            await self.servers.allClosed()

    @ensuringDeferred
    async def test_anUntrustedCA(self):
        """A certificate from a CA the account does not trust: certificate-untrusted."""
        port = self.serve(self.pki)
        error = await self.refused("localhost", port, self.otherCA)
        self.assertEqual(error.reason, "certificate-untrusted")
        self.assertIn(f"localhost:{port}: unable to get local issuer certificate", error.detail)
        self.assertIn("subject CN=localhost,O=imapproxy tests", error.detail)
        self.assertIn("issuer CN=imapproxy test CA,O=imapproxy tests", error.detail)

    @ensuringDeferred
    async def test_anUntrustedCAAfterSTARTTLS(self):
        """The same after STARTTLS: certificate-untrusted, and no credentials sent."""
        port = self.serve(self.pki, starttls=True)
        error = await self.refused("localhost", port, self.otherCA, "starttls")
        self.assertEqual(error.reason, "certificate-untrusted")
        self.assertIn(f"localhost:{port}: unable to get local issuer certificate", error.detail)

    @ensuringDeferred
    async def test_theWrongHostName(self):
        """A trusted certificate for another name: certificate-hostname, naming both."""
        port = self.serve(self.pki)
        error = await self.refused("imap.example.org", port, self.pki.ca_cert)
        self.assertEqual(error.reason, "certificate-hostname")
        self.assertIn(
            f"imap.example.org:{port}: certificate is not valid for imap.example.org",
            error.detail,
        )
        self.assertIn("subject CN=localhost,O=imapproxy tests", error.detail)

    @ensuringDeferred
    async def test_theWrongAddress(self):
        """An address the certificate does not carry: certificate-hostname too."""
        port = self.serve(self.pki)
        error = await self.refused("127.0.0.2", port, self.pki.ca_cert)
        self.assertEqual(error.reason, "certificate-hostname")
        self.assertIn(f"127.0.0.2:{port}: certificate is not valid for 127.0.0.2", error.detail)

    @ensuringDeferred
    async def test_anExpiredCertificate(self):
        """An expired certificate from a trusted CA: certificate-expired."""
        port = self.serve(self.expired)
        error = await self.refused("localhost", port, self.expired.ca_cert)
        self.assertEqual(error.reason, "certificate-expired")
        self.assertIn(
            f"localhost:{port}: certificate has expired (server certificate)", error.detail
        )
        self.assertIn("issuer CN=expired test CA", error.detail)


class ConnectUpstreamTests(SynchronousTestCase):
    """connectUpstream over a MemoryReactorClock: no socket, time under control."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def tearDown(self):
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def start(self, timeout: float = 10.0):
        d = ensureDeferred(
            connectUpstream(
                self.reactor,
                Upstream(host="127.0.0.1", port=143, tls="plain"),
                "alice@example.com",
                "ya29.access-token",
                timeout,
            )
        )
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 143))
        self.factory = factory
        return d

    def accept(self):
        """The TCP connection succeeds; returns the transport the proxy writes to."""
        transport = StringTransport()
        self.wire = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 143))
        self.wire.makeConnection(transport)
        return transport

    def test_success(self):
        """A connection that logs in fires with the logged-in protocol and cancels the timer."""
        d = self.start()
        transport = self.accept()
        self.wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n")
        self.assertIn(b"AUTHENTICATE XOAUTH2 " + XOAUTH2, transport.value())
        self.assertNoResult(d)
        self.wire.dataReceived(b"U1 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n")
        proto = self.successResultOf(d)
        self.assertIsInstance(proto, UpstreamProtocol)
        self.assertEqual(list(proto.capabilities), [b"IMAP4rev1", b"IDLE"])

    def test_rejected(self):
        """A refused token is reported as UpstreamRejectedToken."""
        d = self.start()
        self.accept()
        self.wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n")
        self.wire.dataReceived(b"U1 NO [AUTHENTICATIONFAILED] no\r\n")
        self.failureResultOf(d, UpstreamRejectedToken)

    def test_timeout(self):
        """A login that takes longer than the timeout is Unavailable and the connection aborted."""
        d = self.start(timeout=5.0)
        transport = self.accept()
        self.wire.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n")
        self.reactor.advance(5.0)
        f = self.failureResultOf(d, Unavailable)
        self.assertEqual(f.value.reason, "upstream-timeout")
        self.assertTrue(transport.disconnected)
        # The aborted connection then closes; nothing else fires.
        self.wire.connectionLost(Failure(ConnectionLost()))

    def test_unreachable(self):
        """A connection that cannot be made is Unavailable."""
        d = self.start()
        self.factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.reactor.advance(1)
        f = self.failureResultOf(d, Unavailable)
        self.assertEqual(f.value.reason, "upstream-unreachable")


class AddressCacheTests(SynchronousTestCase):
    """Logins connect to the address a provider answered on, without a name lookup."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.cache = AddressCache(self.reactor, ttl=60.0)

    def connect(self):
        return ensureDeferred(
            connectUpstream(
                self.reactor,
                Upstream(host="imap.example.com", port=143, tls="plain"),
                "alice@example.com",
                "ya29.access-token",
                10.0,
                addresses=self.cache,
            )
        )

    def test_aRememberedAddressIsUsedUntilItExpires(self):
        """Within the TTL the remembered address is dialled directly; after it, it is not."""
        self.cache.remember("imap.example.com", 143, "192.0.2.5")
        self.assertEqual(self.cache.get("imap.example.com", 143), "192.0.2.5")
        d = self.connect()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.5", 143))
        self.reactor.advance(61)
        self.assertIsNone(self.cache.get("imap.example.com", 143))
        self.failureResultOf(d, Unavailable)  # timed out meanwhile

    def test_aFailingAddressIsForgottenAndTheNameLookedUpAgain(self):
        """A remembered address that refuses is dropped, and the login retries by name."""
        self.cache.remember("imap.example.com", 143, "192.0.2.5")
        d = self.connect()
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIsNone(self.cache.get("imap.example.com", 143))
        self.assertNoResult(d)  # retrying through the name
        self.reactor.advance(11)
        self.failureResultOf(d, Unavailable)

    def test_addressesAreNotCachedForAddresses(self):
        """A host given as an address needs no cache entry."""
        self.cache.remember("192.0.2.9", 143, "192.0.2.9")
        self.assertIsNone(self.cache.get("192.0.2.9", 143))


# --- Regression tests (each docstring says what was wrong; every test
# failed before its fix). ---


class SpareLongLineTests(_Driver):
    def test_aTooLongLineWhileSpareClosesIt(self):
        """
        proxy/upstream/imap.py: in state "spare" the LineReceiver still enforces
        MAX_LENGTH; ``lineLengthExceeded`` -> ``_fail`` (which does not
        exclude "spare") -> ``self.ready.errback`` on a Deferred that already
        fired.

        Expected: the spare is dropped quietly (connection closed, pool told
        through its onLost callback).
        Actual: AlreadyCalledError escapes dataReceived (in the reactor: the
        connection is torn down with an unhandled error), and since the state
        is then "failed", connectionLost never calls the pool's onLost, so the
        pool keeps a dead entry until its expiry timer.
        """
        self.connect()
        self.receive(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi", b"U1 OK [CAPABILITY X] ok"
        )
        proto = self.loggedIn()
        lost: list = []
        proto.keepAsSpare(lambda: lost.append(True))
        proto.dataReceived(b"* " + b"x" * (proto.MAX_LENGTH + 10))
        self.assertTrue(self.transport.disconnecting)
        proto.connectionLost()
        self.assertEqual(lost, [True])
