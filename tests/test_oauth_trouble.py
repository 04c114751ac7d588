"""
Tests for a token endpoint in trouble (``proxy.oauth``, time from
``task.Clock``): an early refresh that fails or hangs does not fail a login
while the cached access token is still valid; a recovered endpoint serves
the next login at once (no login held by a hung request or a back-off); and
spare connections follow their access token and their account's grant.
"""

from __future__ import annotations

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import GrantInvalid, Unavailable
from proxy.oauth import AccessTokens, Grant, RetryPolicy, TokenCache
from proxy.upstream.spares import TOKEN_SLACK, WarmUpstreams
from tests.test_oauth import FakeRefresher, FakeSaver, account
from tests.test_warm import FakeUpstream

HOUR = 3600.0


class EarlyRefreshTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1764511200)
        self.refresh = FakeRefresher()
        self.policy = RetryPolicy(deadline=10.0, backoff=(0.5, 1.0), earlyWait=1.0)

    def tokens(self, **kw) -> AccessTokens:
        return AccessTokens(self.refresh, FakeSaver(), self.clock, policy=self.policy, **kw)

    def tearDown(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def cached(self, tokens: AccessTokens) -> None:
        """A first login caches at-1 (an hour), then the clock nears its end."""
        d = tokens.get(account())
        self.refresh.answer(Grant("at-1", HOUR))
        self.assertEqual(self.successResultOf(d).value, "at-1")
        # Inside the 300 s refresh margin, 100 s of life left.
        self.clock.advance(HOUR - 100)

    def test_failingEndpointUsesTheValidToken(self):
        """A refresh that fails while the cached token is valid: the login gets that token."""
        tokens = self.tokens()
        self.cached(tokens)
        d = tokens.get(account())
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.calls[-1][1].errback(Unavailable("oauth2-server-error"))
        self.assertEqual(self.successResultOf(d).value, "at-1")
        # The refresh is retried in the background, and its token then used.
        self.clock.advance(0.5)
        self.assertEqual(len(self.refresh.calls), 3)
        self.refresh.answer(Grant("at-2", HOUR))
        self.assertEqual(self.successResultOf(tokens.get(account())).value, "at-2")

    def test_slowEndpointUsesTheValidTokenAfterAShortWait(self):
        """A hung refresh holds a login with a valid token for earlyWait, no more."""
        tokens = self.tokens()
        self.cached(tokens)
        d = tokens.get(account())
        self.clock.advance(0.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d).value, "at-1")
        # A second login while it is still out does not wait at all.
        self.assertEqual(self.successResultOf(tokens.get(account())).value, "at-1")
        self.refresh.answer(Grant("at-2", HOUR))
        self.assertEqual(self.successResultOf(tokens.get(account())).value, "at-2")

    def test_deadGrantFailsTheLogin(self):
        """invalid_grant on an early refresh fails the login: the owner must consent."""
        tokens = self.tokens()
        self.cached(tokens)
        d = tokens.get(account())
        self.refresh.calls[-1][1].errback(GrantInvalid())
        self.failureResultOf(d, GrantInvalid)

    def test_expiredTokenIsNotUsed(self):
        """A token past its expiry is never the fallback."""
        tokens = self.tokens()
        self.cached(tokens)
        self.clock.advance(100)
        d = tokens.get(account())
        self.clock.advance(1.0)
        self.assertNoResult(d)
        self.refresh.calls[-1][1].errback(GrantInvalid())
        self.failureResultOf(d, GrantInvalid)

    def test_storeCopyNearItsEnd(self):
        """The store's copy, due for refresh but valid, serves when the refresh fails."""
        now = self.clock.seconds()
        cache = TokenCache(self.clock, load=lambda _: succeed(("at-saved", now + 100, HOUR)))
        tokens = self.tokens(cache=cache)
        d = tokens.get(account())
        self.assertEqual(len(self.refresh.calls), 1)
        self.refresh.calls[-1][1].errback(Unavailable("oauth2-unreachable"))
        self.assertEqual(self.successResultOf(d).value, "at-saved")
        self.clock.advance(0.5)
        self.refresh.answer(Grant("at-2", HOUR))


class RecoveryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1764511200)
        self.refresh = FakeRefresher()

    def tearDown(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def expired(self, tokens: AccessTokens, rotated: str | None = None) -> None:
        d = tokens.get(account())
        self.refresh.answer(Grant("at-1", HOUR, refreshToken=rotated))
        self.successResultOf(d)
        self.clock.advance(HOUR)

    def test_hungRequestDoesNotHoldTheNextLogin(self):
        """After a hung endpoint recovers, the next login sends a new request at once."""
        policy = RetryPolicy(deadline=3.0, backoff=(0.5,), resendAfter=2.0)
        tokens = AccessTokens(self.refresh, FakeSaver(), self.clock, policy=policy)
        self.expired(tokens)
        first = tokens.get(account())
        self.clock.advance(3.0)
        self.failureResultOf(first, Unavailable)
        # The endpoint is back; the hung request is still out.
        second = tokens.get(account())
        self.assertEqual(len(self.refresh.calls), 3)
        self.refresh.answer(Grant("at-2", HOUR))
        self.assertEqual(self.successResultOf(second).value, "at-2")
        self.refresh.answer(Grant("at-late", HOUR), index=1)

    def test_rotatingGrantStillWaits(self):
        """A grant seen rotating is never sent twice: the login waits for the hung one."""
        policy = RetryPolicy(deadline=3.0, backoff=(0.5,), resendAfter=2.0)
        tokens = AccessTokens(self.refresh, FakeSaver(), self.clock, policy=policy)
        self.expired(tokens, rotated="rt-2")
        first = tokens.get(account())
        self.clock.advance(3.0)
        self.failureResultOf(first, Unavailable)
        second = tokens.get(account())
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-2", HOUR, refreshToken="rt-3"))
        self.assertEqual(self.successResultOf(second).value, "at-2")

    def test_backOffCutShortByAWaitingLogin(self):
        """A login that joins a refresh waiting out its back-off has it try again now."""
        policy = RetryPolicy(deadline=20.0, backoff=(0.5, 8.0))
        tokens = AccessTokens(self.refresh, FakeSaver(), self.clock, policy=policy)
        self.expired(tokens)
        first = tokens.get(account())
        self.refresh.calls[-1][1].errback(Unavailable("oauth2-server-error"))
        self.clock.advance(0.5)
        self.refresh.calls[-1][1].errback(Unavailable("oauth2-server-error"))
        self.assertEqual(len(self.refresh.calls), 3)
        # 8 s to wait; the endpoint recovers and a login comes 1 s in.
        self.clock.advance(1.0)
        second = tokens.get(account())
        self.assertEqual(len(self.refresh.calls), 4)
        self.refresh.answer(Grant("at-2", HOUR))
        self.assertEqual(self.successResultOf(first).value, "at-2")
        self.assertEqual(self.successResultOf(second).value, "at-2")


class SpareRulesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.made: list[Deferred] = []
        self.warm = WarmUpstreams(self.connect, self.clock, keep=300.0, often=2)

    def tearDown(self):
        self.warm.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def connect(self, acct) -> Deferred:
        d: Deferred = Deferred()
        self.made.append(d)
        return d

    def spare(self, tokenExpires: float | None) -> FakeUpstream:
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.clock.advance(0)
        proto = FakeUpstream()
        proto.tokenExpires = tokenExpires  # type: ignore[attr-defined]
        self.made[-1].callback(proto)
        return proto

    def test_spareNeverOutlivesItsToken(self):
        """A spare whose access token ends in 100 s is logged out before it does."""
        proto = self.spare(self.clock.seconds() + 100)
        self.assertEqual(proto.state, "spare")
        self.clock.advance(100 - TOKEN_SLACK)
        self.assertEqual(proto.state, "logged-out")
        self.assertIsNone(self.warm.take(account()))

    def test_spareWithTokenAboutToExpireNotKept(self):
        """A spare made with a token about to expire is not kept at all."""
        proto = self.spare(self.clock.seconds() + TOKEN_SLACK / 2)
        self.assertEqual(proto.state, "logged-out")

    def test_noSpareForRevokedGrant(self):
        """A spare is not handed to an account whose grant is known revoked."""
        proto = self.spare(self.clock.seconds() + HOUR)
        revoked = attrs.evolve(account(), state="reauth-required")
        self.assertIsNone(self.warm.take(revoked))
        self.assertEqual(proto.state, "logged-out")
