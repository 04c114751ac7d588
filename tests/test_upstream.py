"""
Tests for ``proxy.upstream``: the client-side login state machine, driven
line by line over a ``StringTransport``, and the SASL authenticators.
"""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import LimitReached, Unavailable, UpstreamRejectedToken
from proxy.model import Upstream
from proxy.upstream import (
    AddressCache,
    OAUTHBEARERAuthenticator,
    UpstreamProtocol,
    XOAUTH2Authenticator,
    connectUpstream,
    hasCapability,
    responseCode,
)

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
        self.assertEqual(self.loggedIn().capabilities, [b"IMAP4rev1", b"IDLE", b"MOVE"])
        self.assertEqual(self.sent(), [])
        self.assertFalse(self.transport.disconnecting)

    def test_greetingWithoutCapabilities(self):
        """A greeting without capabilities makes the proxy ask CAPABILITY first."""
        self.connect()
        self.receive(b"* OK IMAP ready")
        self.assertEqual(self.sent(), [b"U1 CAPABILITY"])
        self.receive(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2", b"U1 OK done")
        self.assertEqual(self.sent(), [b"U2 AUTHENTICATE XOAUTH2 " + XOAUTH2])
        self.receive(b"U2 OK [CAPABILITY IMAP4rev1 IDLE] ok")
        self.assertEqual(self.loggedIn().capabilities, [b"IMAP4rev1", b"IDLE"])

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
        self.assertEqual(self.loggedIn().capabilities, [b"IMAP4rev1", b"IDLE", b"NAMESPACE"])

    def test_postLoginCapabilityFailure(self):
        """A failed CAPABILITY after login is Unavailable."""
        self.greetAndAuth()
        self.receive(b"U1 OK Logged in", b"U2 NO sorry")
        self.failed(Unavailable)

    def test_untaggedCapabilityBeforeOk(self):
        """An untagged CAPABILITY before the tagged OK is used without asking again."""
        self.greetAndAuth()
        self.receive(b"* CAPABILITY IMAP4rev1 IDLE", b"U1 OK Logged in")
        self.assertEqual(self.loggedIn().capabilities, [b"IMAP4rev1", b"IDLE"])
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
        self.assertEqual(proto.capabilities, [b"IMAP4rev1", b"IDLE"])

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


# --- Regression tests moved from test_review_regressions.py (each docstring
# says what was wrong; every test failed before its fix). ---


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
