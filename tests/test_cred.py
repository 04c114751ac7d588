"""
Tests for ``proxy.cred.UpstreamRealm`` (``proxy.realm``): an account id
becomes a logged-in upstream connection, IMAP or SMTP. The store and the
connector are in-memory fakes, access tokens come from the real
``AccessTokens`` over a fake refresher whose Deferreds the test fires, and
time from ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy import realm
from proxy.cred import (
    ISubmissionSession,
    IUpstreamSession,
    UpstreamRealm,
    upstreamConnector,
)
from proxy.errors import (
    AccessDenied,
    AuthenticationFailed,
    CertificateRejected,
    GrantInvalid,
    NoSMTPServer,
    SMTPAuthDisabled,
    UpstreamRejectedToken,
)
from proxy.model import Account, Upstream
from proxy.oauth import AccessTokens, Grant
from tests.test_oauth import FakeRefresher, FakeSaver, account
from tests.test_upstream_smtp import MS_DISABLED

TOKEN_CERT = CertificateRejected(
    "certificate-untrusted",
    detail="token endpoint oauth.example.com:443: self-signed certificate in certificate chain",
)
IMAP_CERT = CertificateRejected(
    "certificate-hostname",
    detail="IMAP server imap.example.com:993: Hostname mismatch, certificate is not valid",
)


class MemoryAccounts:
    """The two account-store calls the realm makes, in memory."""

    def __init__(self, *accounts: Account) -> None:
        self.accounts = {a.id: a for a in accounts}
        self.states: list[tuple[str, str, str | None]] = []

    def getAccount(self, accountId: str) -> Deferred[Account | None]:
        return succeed(self.accounts.get(accountId))

    def setAccountState(self, accountId: str, state: str, reason: str | None) -> Deferred[None]:
        self.states.append((accountId, state, reason))
        a = self.accounts[accountId]
        self.accounts[accountId] = attrs.evolve(a, state=state, stateReason=reason)
        return succeed(None)


class FakeConnector:
    """``connect(upstream, user, token)``: records the token, then answers as told."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.answers: list[Any] = []

    def __call__(self, upstream: Any, user: str, token: str) -> Deferred[Any]:
        self.tokens.append(token)
        answer = self.answers.pop(0) if self.answers else object()
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


class UpstreamRealmTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1764511200)  # 2025-11-30T14:00:00Z
        self.refresh = FakeRefresher()
        self.store = MemoryAccounts(account())
        self.connect = FakeConnector()
        self.tokens = AccessTokens(self.refresh, FakeSaver(), self.clock)
        self.realm = UpstreamRealm(self.store, self.tokens, self.connect, self.clock)
        self.events: list[dict] = []
        self.patch(realm, "log", Logger(observer=self.events.append))

    def tearDown(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def login(self, accountId: str = "alice") -> Deferred[Any]:
        return self.realm.requestAvatar((accountId, "token-id"), None, IUpstreamSession)

    def loggedIn(self, value: str = "at-1") -> Any:
        """A login that refreshes, answered with ``value``; :return: the avatar."""
        d = self.login()
        self.refresh.answer(Grant(value, 3600.0))
        return self.successResultOf(d)

    def warnings(self) -> list[dict]:
        return [e for e in self.events if e["log_level"].name == "warn"]

    def test_loginConnectsWithTheAccessToken(self):
        """A login fetches a token, connects with it and yields the session."""
        proto = object()
        self.connect.answers = [proto]
        iface, session, logout = self.loggedIn("at-1")
        self.assertIs(iface, IUpstreamSession)
        self.assertIs(session.protocol, proto)
        self.assertEqual((session.account, session.tokenId), ("alice", "token-id"))
        self.assertEqual(self.connect.tokens, ["at-1"])

    def test_refusedCachedTokenIsRefreshedAndRetriedOnce(self):
        """The provider refuses a cached token: one refresh, one more login, which succeeds."""
        self.loggedIn("at-1")
        self.connect.answers = [UpstreamRejectedToken()]
        d = self.login()
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-2", 3600.0))
        self.successResultOf(d)
        self.assertEqual(self.connect.tokens, ["at-1", "at-1", "at-2"])

    def test_noSecondRetry(self):
        """The refreshed token refused too: AuthenticationFailed, no third try."""
        self.loggedIn("at-1")
        self.connect.answers = [UpstreamRejectedToken(), UpstreamRejectedToken()]
        d = self.login()
        self.refresh.answer(Grant("at-2", 3600.0))
        self.assertEqual(
            self.failureResultOf(d, AuthenticationFailed).value.reason, "upstream-auth"
        )
        self.assertEqual(self.connect.tokens, ["at-1", "at-1", "at-2"])
        self.assertEqual(len(self.refresh.calls), 2)

    def test_refusedFreshTokenIsFinal(self):
        """A token fetched for this very login and refused is not refreshed again."""
        self.connect.answers = [UpstreamRejectedToken()]
        d = self.login()
        self.refresh.answer(Grant("at-1", 3600.0))
        self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(len(self.refresh.calls), 1)
        self.assertEqual(self.connect.tokens, ["at-1"])

    def test_aBurstOfRefusalsCostsOneRefresh(self):
        """Logins refused with the same cached token together share one refresh."""
        self.loggedIn("at-1")
        self.connect.answers = [UpstreamRejectedToken(), UpstreamRejectedToken()]
        first, second = self.login(), self.login()
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-2", 3600.0))
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.connect.tokens, ["at-1", "at-1", "at-1", "at-2", "at-2"])

    def test_reauthRequiredFailsFast(self):
        """An account waiting for re-authorization is refused without a refresh or connect."""
        self.store.accounts["alice"] = attrs.evolve(account(), state="reauth-required")
        self.failureResultOf(self.login(), GrantInvalid)
        self.assertEqual((self.refresh.calls, self.connect.tokens), ([], []))

    def test_unknownAndDisabledAccounts(self):
        """No such account, or a disabled one: AccessDenied with its reason."""
        self.assertEqual(
            self.failureResultOf(self.login("bob"), AccessDenied).value.reason, "username"
        )
        self.store.accounts["alice"] = attrs.evolve(account(), state="disabled")
        f = self.failureResultOf(self.login(), AccessDenied)
        self.assertEqual(f.value.reason, "account-disabled")
        self.assertEqual(self.refresh.calls, [])

    def test_tokenEndpointCertificateIsRecorded(self):
        """A refused token endpoint certificate: not retried, logged once, in the state reason."""
        d = self.login()
        self.refresh.calls[0][1].errback(TOKEN_CERT)
        f = self.failureResultOf(d, CertificateRejected)
        self.assertEqual(
            f.value.imapResponse(),
            b"NO [UNAVAILABLE] The provider's certificate was refused, the operator must act",
        )
        self.assertEqual(len(self.refresh.calls), 1)
        self.assertEqual(self.connect.tokens, [])
        reason = (
            "certificate-untrusted: token endpoint oauth.example.com:443: "
            "self-signed certificate in certificate chain (2025-11-30T14:00:00Z)"
        )
        self.assertEqual(self.store.states, [("alice", "ok", reason)])
        [warning] = self.warnings()
        self.assertEqual(
            (warning["account"], warning["reason"], warning["detail"]),
            ("alice", "certificate-untrusted", TOKEN_CERT.detail),
        )

    def test_upstreamCertificateIsRecorded(self):
        """A refused IMAP server certificate is recorded the same way, state unchanged."""
        self.connect.answers = [IMAP_CERT]
        d = self.login()
        self.refresh.answer(Grant("at-1", 3600.0))
        self.failureResultOf(d, CertificateRejected)
        [(aid, state, reason)] = self.store.states
        self.assertEqual((aid, state), ("alice", "ok"))
        self.assertTrue(reason.startswith("certificate-hostname: IMAP server imap.example.com:993"))
        self.assertEqual(len(self.warnings()), 1)
        self.assertNotIn("at-1", repr(self.events))

    def test_aLaterLoginClearsTheCertificateReason(self):
        """Once the certificate is trusted again, a successful login clears the reason."""
        d = self.login()
        self.refresh.calls[0][1].errback(TOKEN_CERT)
        self.failureResultOf(d, CertificateRejected)
        self.loggedIn("at-1")
        self.assertEqual(self.store.states[-1], ("alice", "ok", None))
        self.assertIsNone(self.store.accounts["alice"].stateReason)
        self.successResultOf(self.login())
        self.assertEqual(len(self.store.states), 2)

    def test_otherReasonsAreKept(self):
        """A successful login leaves a reason that is not about a certificate alone."""
        self.store.accounts["alice"] = attrs.evolve(account(), stateReason="set by the operator")
        self.loggedIn("at-1")
        self.assertEqual(self.store.states, [])

    def test_aStateChangedDuringTheLoginIsNotUndone(self):
        """An account disabled while its login was under way stays disabled."""
        d = self.login()
        self.store.accounts["alice"] = attrs.evolve(account(), state="disabled")
        self.refresh.calls[0][1].errback(TOKEN_CERT)
        self.failureResultOf(d, CertificateRejected)
        self.assertEqual(self.store.states, [])
        self.assertEqual(self.store.accounts["alice"].state, "disabled")


SMTP = Upstream(host="smtp.example.com", port=587, tls="starttls")
SMTP_CERT = CertificateRejected(
    "certificate-untrusted",
    detail="smtp.example.com:587: unable to get local issuer certificate (server certificate)",
)


class FakeSMTPConnector:
    """``connect.smtp(upstream, user, token, ehloName)``: records, then answers as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, str, str]] = []
        self.answers: list[Any] = []

    def __call__(self, upstream: Any, user: str, token: str, ehloName: str) -> Deferred[Any]:
        self.calls.append((upstream, user, token, ehloName))
        answer = self.answers.pop(0) if self.answers else FakeSMTPProtocol()
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    @property
    def tokens(self) -> list[str]:
        return [c[2] for c in self.calls]


class FakeSMTPProtocol:
    extensions = [b"SIZE 35882577", b"8BITMIME"]
    transport = None


class SubmissionRealmTests(SynchronousTestCase):
    """The realm's SMTP avatar: the same way as IMAP's, to the account's SMTP server."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1764511200)  # 2025-11-30T14:00:00Z
        self.refresh = FakeRefresher()
        self.store = MemoryAccounts(attrs.evolve(account(), smtp=SMTP))
        self.imap = FakeConnector()
        self.smtp = FakeSMTPConnector()
        self.imap.smtp = self.smtp  # type: ignore[attr-defined]
        self.tokens = AccessTokens(self.refresh, FakeSaver(), self.clock)
        self.realm = UpstreamRealm(self.store, self.tokens, self.imap, self.clock)
        self.events: list[dict] = []
        self.patch(realm, "log", Logger(observer=self.events.append))

    def tearDown(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def login(self, mind: Any = "client.example") -> Deferred[Any]:
        return self.realm.requestAvatar(("alice", "token-id"), mind, ISubmissionSession)

    def loggedIn(self, value: str = "at-1", mind: Any = "client.example") -> Any:
        d = self.login(mind)
        self.refresh.answer(Grant(value, 3600.0))
        return self.successResultOf(d)

    def warnings(self) -> list[dict]:
        return [e for e in self.events if e["log_level"].name == "warn"]

    def disabled(self) -> None:
        """An SMTP login the provider refuses with 5.7.139."""
        self.smtp.answers = [SMTPAuthDisabled()]
        d = self.login()
        if len(self.refresh.calls) == 1 and not self.refresh.calls[0][1].called:
            self.refresh.answer(Grant("at-1", 3600.0))
        self.failureResultOf(d, SMTPAuthDisabled)

    def test_aLoginConnectsToTheSMTPServer(self):
        """The account's SMTP server, its mailbox, the access token, the client's EHLO name."""
        proto = FakeSMTPProtocol()
        self.smtp.answers = [proto]
        iface, session, logout = self.loggedIn("at-1")
        self.assertIs(iface, ISubmissionSession)
        self.assertTrue(ISubmissionSession.providedBy(session))
        self.assertEqual(self.smtp.calls, [(SMTP, "alice@example.com", "at-1", "client.example")])
        self.assertIs(session.protocol, proto)
        self.assertEqual(
            (session.account, session.tokenId, session.server),
            ("alice", "token-id", "smtp.example.com:587"),
        )
        self.assertEqual(session.extensions, [b"SIZE 35882577", b"8BITMIME"])
        self.assertEqual(self.imap.tokens, [])
        logout()

    def test_anUnusableEHLONameIsReplaced(self):
        """No EHLO name, or one that is not a name: the fixed one goes upstream."""
        self.loggedIn(mind=None)
        self.successResultOf(self.login("bad name\r\nRCPT TO:<x>"))
        self.assertEqual([c[3] for c in self.smtp.calls], ["localhost", "localhost"])

    def test_aRefusedCachedTokenIsRefreshedAndRetriedOnce(self):
        """The SMTP server refuses a cached token: one refresh, one more login."""
        self.loggedIn("at-1")
        self.smtp.answers = [UpstreamRejectedToken()]
        d = self.login()
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-2", 3600.0))
        self.successResultOf(d)
        self.assertEqual(self.smtp.tokens, ["at-1", "at-1", "at-2"])

    def test_noSecondRetry(self):
        """The refreshed token refused too: AuthenticationFailed, no third try."""
        self.loggedIn("at-1")
        self.smtp.answers = [UpstreamRejectedToken(), UpstreamRejectedToken()]
        d = self.login()
        self.refresh.answer(Grant("at-2", 3600.0))
        f = self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(
            f.value.smtpResponse(), b"535 5.7.8 Authentication with the provider failed"
        )
        self.assertEqual(self.smtp.tokens, ["at-1", "at-1", "at-2"])

    def test_noSMTPServer(self):
        """An account without an SMTP server: NoSMTPServer, no token fetched, nothing dialled."""
        self.store.accounts["alice"] = account()
        self.failureResultOf(self.login(), NoSMTPServer)
        self.assertEqual((self.refresh.calls, self.smtp.calls), ([], []))

    def test_theAccountStateCountsAsForIMAP(self):
        """No such account, a disabled one, one to re-authorize: IMAP's refusals."""
        d = self.realm.requestAvatar(("bob", "t"), None, ISubmissionSession)
        self.assertEqual(self.failureResultOf(d, AccessDenied).value.reason, "username")
        self.store.accounts["alice"] = attrs.evolve(self.store.accounts["alice"], state="disabled")
        self.assertEqual(
            self.failureResultOf(self.login(), AccessDenied).value.reason, "account-disabled"
        )
        self.store.accounts["alice"] = attrs.evolve(
            self.store.accounts["alice"], state="reauth-required"
        )
        self.failureResultOf(self.login(), GrantInvalid)
        self.assertEqual((self.refresh.calls, self.smtp.calls), ([], []))

    def test_SMTPAuthDisabledIsRecordedWithItsFix(self):
        """5.7.139: not retried; a warning and the state reason name the account and the fix."""
        self.disabled()
        self.assertEqual(len(self.smtp.calls), 1)
        fix = "Set-CASMailbox -Identity alice@example.com -SmtpClientAuthenticationDisabled $false"
        [(aid, state, reason)] = self.store.states
        self.assertEqual((aid, state), ("alice", "ok"))
        self.assertTrue(reason.startswith("smtp-auth-disabled: "), reason)
        self.assertIn(fix, reason)
        [warning] = self.warnings()
        self.assertEqual((warning["account"], warning["fix"]), ("alice", fix))
        self.assertIn(fix, formatEvent(warning))

    def test_theNextSMTPLoginClearsIt(self):
        """The next successful SMTP login clears that reason; an IMAP login does not."""
        self.disabled()
        self.successResultOf(
            self.realm.requestAvatar(("alice", "token-id"), None, IUpstreamSession)
        )
        self.assertEqual(len(self.store.states), 1)
        self.successResultOf(self.login())
        self.assertEqual(self.store.states[-1], ("alice", "ok", None))
        self.successResultOf(self.login())
        self.assertEqual(len(self.store.states), 2)

    def test_anSMTPCertificateIsRecorded(self):
        """A refused SMTP server certificate: recorded as for IMAP, cleared by the next login."""
        self.smtp.answers = [SMTP_CERT]
        d = self.login()
        self.refresh.answer(Grant("at-1", 3600.0))
        self.failureResultOf(d, CertificateRejected)
        reason = self.store.accounts["alice"].stateReason
        self.assertTrue(reason.startswith("certificate-untrusted: smtp.example.com:587: "))
        self.successResultOf(self.login())
        self.assertIsNone(self.store.accounts["alice"].stateReason)

    def test_otherReasonsAreKept(self):
        """A successful SMTP login leaves an operator's reason alone."""
        self.store.accounts["alice"] = attrs.evolve(
            self.store.accounts["alice"], stateReason="set by the operator"
        )
        self.loggedIn()
        self.assertEqual(self.store.states, [])

    def test_withoutAnSMTPConnector(self):
        """A realm that cannot log in to SMTP refuses the interface, as for any other."""
        r = UpstreamRealm(self.store, self.tokens, FakeConnector(), self.clock)
        with self.assertRaises(NotImplementedError):
            r.requestAvatar(("alice", "t"), None, ISubmissionSession)


class SubmissionSecretsTests(SynchronousTestCase):
    """
    The whole SMTP login (realm, access tokens, ``connectSMTP`` over a
    ``MemoryReactorClock``): no log event, whatever its namespace, carries
    the access token or the XOAUTH2 string, refused or not.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1764511200)
        self.refresh = FakeRefresher()
        plain = Upstream(host="127.0.0.1", port=587, tls="plain")
        store = MemoryAccounts(attrs.evolve(account(), smtp=plain))
        self.realm = UpstreamRealm(
            store,
            AccessTokens(self.refresh, FakeSaver(), self.reactor),
            upstreamConnector(self.reactor, 10.0),
            self.reactor,
        )
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def serve(self, index: int, *lines: bytes) -> Any:
        factory = self.reactor.tcpClients[index][2]
        wire = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 587))
        transport = StringTransport()
        wire.makeConnection(transport)
        wire.dataReceived(b"".join(line + b"\r\n" for line in lines))
        return wire, transport

    def test_noSecretInTheLog(self):
        """A refused cached token, refreshed, then 5.7.139: tokens only on the wire."""
        first = self.realm.requestAvatar(("alice", "t"), "client.example", ISubmissionSession)
        self.refresh.answer(Grant("at-secret-1", 3600.0))
        wire, transport = self.serve(0, b"220 hi", b"250-me", b"250 AUTH XOAUTH2")
        self.assertIn(b"AUTH XOAUTH2 ", transport.value())
        wire.dataReceived(b"235 2.7.0 ok\r\n")
        self.successResultOf(first)[2]()  # logged out
        wire.connectionLost(Failure(ConnectionDone()))
        second = self.realm.requestAvatar(("alice", "t"), "client.example", ISubmissionSession)
        wire, transport = self.serve(1, b"220 hi", b"250-me", b"250 AUTH XOAUTH2")
        xoauth2 = transport.value().split(b"AUTH XOAUTH2 ")[1].strip()
        wire.dataReceived(b"334 e30=\r\n535 5.7.8 no\r\n")
        wire.connectionLost(Failure(ConnectionDone()))
        self.refresh.answer(Grant("at-secret-2", 3600.0))
        wire, transport = self.serve(2, b"220 hi", b"250-me", b"250 AUTH XOAUTH2")
        wire.dataReceived(MS_DISABLED + b"\r\n")
        wire.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(second, SMTPAuthDisabled)
        self.assertTrue(any("refreshing" in (formatEvent(e) or "") for e in self.events))
        self.assertTrue(any("Set-CASMailbox" in (formatEvent(e) or "") for e in self.events))
        text = repr(self.events) + "".join(formatEvent(e) or "" for e in self.events)
        for secret in ("at-secret-1", "at-secret-2", xoauth2.decode()):
            self.assertNotIn(secret, text)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
