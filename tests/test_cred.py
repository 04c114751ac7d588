"""
Tests for ``proxy.cred.UpstreamRealm``: an account id becomes a logged-in
upstream connection. The store and the connector are in-memory fakes, access
tokens come from the real ``AccessTokens`` over a fake refresher whose
Deferreds the test fires, and time from ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from proxy import realm
from proxy.cred import IUpstreamSession, UpstreamRealm
from proxy.errors import (
    AccessDenied,
    AuthenticationFailed,
    CertificateRejected,
    GrantInvalid,
    UpstreamRejectedToken,
)
from proxy.model import Account
from proxy.oauth import AccessTokens, Grant
from tests.test_oauth import FakeRefresher, FakeSaver, account

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
