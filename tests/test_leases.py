"""
Tests for ``proxy.oauth.leases`` and the refresh lease in ``AccessTokens``: two
cache instances (two proxies) share a lock, saved access tokens and stored
accounts, as they share Redis; time comes from one ``task.Clock``. The lock
here keeps Redis's semantics (SET NX PX, compare-and-renew, compare-and-del)
in memory; the Redis one is tested against a real redis-server in
test_store_redis.
"""

from __future__ import annotations

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import Unavailable
from proxy.imap import SessionRegistry
from proxy.oauth import (
    AccessTokens,
    Grant,
    RefreshLeases,
    RetryPolicy,
    SingleFlight,
    TokenCache,
)
from tests.test_oauth import FakeRefresher, account


class MemoryLock:
    """A lease lock with expiry, like the Redis one."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.held: dict[str, tuple[str, float]] = {}
        self.counter = 0
        self.broken = False

    def _live(self, key: str) -> tuple[str, float] | None:
        entry = self.held.get(key)
        if entry is not None and entry[1] <= self.clock.seconds():
            del self.held[key]
            return None
        return entry

    def acquire(self, key: str, ttl: float) -> Deferred[str | None]:
        if self.broken:
            return fail(RuntimeError("the store is unavailable"))
        if self._live(key) is not None:
            return succeed(None)
        self.counter += 1
        value = f"lease-{self.counter}"
        self.held[key] = (value, self.clock.seconds() + ttl)
        return succeed(value)

    def renew(self, key: str, value: str, ttl: float) -> Deferred[bool]:
        entry = self._live(key)
        if entry is None or entry[0] != value:
            return succeed(False)
        self.held[key] = (value, self.clock.seconds() + ttl)
        return succeed(True)

    def release(self, key: str, value: str) -> Deferred[bool]:
        entry = self._live(key)
        if entry is None or entry[0] != value:
            return succeed(False)
        del self.held[key]
        return succeed(True)


class SharedStore:
    """Saved access tokens and stored accounts, as both instances see them."""

    def __init__(self) -> None:
        self.saved: dict[str, tuple[str, float, float]] = {}
        self.accounts = {"alice": account()}

    def load(self, accountId: str) -> Deferred[tuple[str, float, float] | None]:
        return succeed(self.saved.get(accountId))

    def persist(
        self, accountId: str, token: str, expires: float, lifetime: float
    ) -> Deferred[None]:
        self.saved[accountId] = (token, expires, lifetime)
        return succeed(None)

    def saveRefreshToken(self, accountId: str, refreshToken: str) -> Deferred[None]:
        a = self.accounts[accountId]
        self.accounts[accountId] = attrs.evolve(
            a, oauth2=attrs.evolve(a.oauth2, refreshToken=refreshToken)
        )
        return succeed(None)

    def reload(self, accountId: str) -> Deferred[object]:
        return succeed(self.accounts.get(accountId))


class LeasedRefreshTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.lock = MemoryLock(self.clock)
        self.store = SharedStore()
        self.a = self.instance()
        self.b = self.instance()

    def instance(self) -> tuple[AccessTokens, FakeRefresher]:
        refresh = FakeRefresher()
        tokens = AccessTokens(
            refresh,
            self.store.saveRefreshToken,
            self.clock,
            cache=TokenCache(self.clock, load=self.store.load, persist=self.store.persist),
            policy=RetryPolicy(deadline=10.0),
            flight=SingleFlight(
                RefreshLeases(self.lock, self.clock, ttl=5.0), reload=self.store.reload
            ),
        )
        return tokens, refresh

    def advance(self, seconds: float) -> None:
        """Let time pass in small steps, as it does (renewals and polls interleave)."""
        steps = round(seconds / 0.05)
        self.clock.pump([0.05] * steps)

    def tearDown(self):
        self.advance(60)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.lock.held, {}, "a lease was left held")

    def test_concurrentRefreshesOnTwoInstancesCallTheProviderOnce(self):
        """A and B both need a token: A refreshes, B waits and uses what A saved."""
        (ta, ra), (tb, rb) = self.a, self.b
        da = ta.get(account())
        db = tb.get(account())
        self.assertEqual((len(ra.calls), len(rb.calls)), (1, 0))
        self.advance(1.0)
        ra.answer(Grant("at-A", 3600.0))
        self.advance(0.3)
        self.assertEqual(self.successResultOf(da).value, "at-A")
        self.assertEqual(self.successResultOf(db).value, "at-A")
        self.assertEqual(len(rb.calls), 0)

    def test_aCrashedHolderBlocksForOneLeaseAtMost(self):
        """A lease nobody renews expires: B refreshes within its deadline."""
        tb, rb = self.b
        self.lock.held["alice"] = ("dead-holder", self.clock.seconds() + 5.0)
        d = tb.get(account())
        self.advance(4.9)
        self.assertEqual(len(rb.calls), 0)
        self.advance(0.3)
        self.assertEqual(len(rb.calls), 1)
        rb.answer(Grant("at-B", 3600.0))
        self.assertEqual(self.successResultOf(d).value, "at-B")

    def test_aLateAnswerKeepsTheLeaseUntilItIsSaved(self):
        """A's request outlives its deadline: B waits on, and never reuses the grant."""
        (ta, ra), (tb, rb) = self.a, self.b
        da = ta.get(account())
        self.advance(10.5)
        self.failureResultOf(da, Unavailable)
        self.assertIn("alice", self.lock.held, "the lease must stay while the request is out")
        db = tb.get(account())
        self.advance(4.0)
        self.assertNoResult(db)
        self.assertEqual(len(rb.calls), 0)
        ra.answer(Grant("at-late", 3600.0, refreshToken="rt-2"))
        self.advance(0.3)
        self.assertEqual(self.successResultOf(db).value, "at-late")
        self.assertEqual(self.store.accounts["alice"].oauth2.refreshToken, "rt-2")

    def test_aSlowSaveDoesNotHoldTheLoginButKeepsTheLease(self):
        """
        The login has its token before the store has saved it; the lease is
        held until it has, so B reads A's token instead of refreshing again.
        """
        (ta, ra), (tb, rb) = self.a, self.b
        saving: list[Deferred[None]] = []

        def slowPersist(*entry: object) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            saving.append(d)
            return d.addCallback(lambda _: self.store.persist(*entry))  # type: ignore[arg-type]

        ta._cache._persist = slowPersist
        da = ta.get(account())
        ra.answer(Grant("at-A", 3600.0))
        self.assertEqual(self.successResultOf(da).value, "at-A")
        self.assertEqual(len(saving), 1)
        self.assertIn("alice", self.lock.held, "the lease must stay until the token is saved")
        db = tb.get(account())
        self.advance(1.0)
        self.assertNoResult(db)
        saving[0].callback(None)
        self.assertNotIn("alice", self.lock.held)
        self.advance(0.3)
        self.assertEqual(self.successResultOf(db).value, "at-A")
        self.assertEqual(len(rb.calls), 0)

    def test_anOlderTokenNeverLandsAfterANewerOne(self):
        """
        The first token's save is slow; the provider refuses that token and
        a second refresh brings another: it is saved after the first, so
        the store ends with the newer one.
        """
        ta, ra = self.a
        held: list[Deferred[None]] = []

        def persist(*entry: object) -> Deferred[None]:
            if entry[1] == "at-1":  # a busy store connection
                d: Deferred[None] = Deferred()
                held.append(d)
                return d.addCallback(lambda _: self.store.persist(*entry))  # type: ignore[arg-type]
            return self.store.persist(*entry)  # type: ignore[arg-type]

        ta._cache._persist = persist
        first = ta.get(account())
        ra.answer(Grant("at-1", 3600.0))
        self.assertEqual(self.successResultOf(first).value, "at-1")
        second = ta.get(account(), stale="at-1")
        ra.answer(Grant("at-2", 3600.0))
        self.assertEqual(self.successResultOf(second).value, "at-2")
        self.assertNotIn("alice", self.store.saved, "at-2 waits for at-1's save")
        held[0].callback(None)
        self.assertEqual(self.store.saved["alice"][0], "at-2")
        self.assertNotIn("alice", self.lock.held)

    def test_theNextHolderUsesTheRotatedRefreshToken(self):
        """After A's refresh rotated the grant, B's refresh sends the new refresh token."""
        (ta, ra), (tb, rb) = self.a, self.b
        da = ta.get(account())
        ra.answer(Grant("at-A", 3600.0, refreshToken="rt-2"))
        self.successResultOf(da)
        # B holds the old account (rt-1) and is told the saved token was refused.
        db = tb.get(account(), stale="at-A")
        self.assertEqual(len(rb.calls), 1)
        self.assertEqual(rb.calls[0][0].oauth2.refreshToken, "rt-2")
        rb.answer(Grant("at-B", 3600.0))
        self.assertEqual(self.successResultOf(db).value, "at-B")

    def test_aRefusedTokenIsRefreshedOnceAcrossInstances(self):
        """Both instances hold a token the provider refused: one refresh, both get its result."""
        (ta, ra), (tb, rb) = self.a, self.b
        self.store.saved["alice"] = ("at-old", 3600.0, 3600.0)
        da = ta.get(account(), stale="at-old")
        db = tb.get(account(), stale="at-old")
        self.assertEqual((len(ra.calls), len(rb.calls)), (1, 0))
        ra.answer(Grant("at-new", 3600.0))
        self.advance(0.3)
        self.assertEqual(self.successResultOf(da).value, "at-new")
        self.assertEqual(self.successResultOf(db).value, "at-new")

    def test_theLeaseIsRenewedWhileHeld(self):
        """A slow refresh (longer than the lease) keeps its lease by renewing it."""
        ta, ra = self.a
        da = ta.get(account())
        self.advance(9.0)
        self.assertEqual(self.lock.held["alice"][0], "lease-1")
        ra.answer(Grant("at-A", 3600.0))
        self.successResultOf(da)
        self.assertNotIn("alice", self.lock.held)

    def test_aStoreThatCannotLockRefusesTheLogin(self):
        """The lock's store failing gives Unavailable, not a refresh without the lock."""
        tb, rb = self.b
        self.lock.broken = True
        self.failureResultOf(tb.get(account()), Unavailable)
        self.assertEqual(len(rb.calls), 0)

    def test_waitingForAnotherInstanceIsBoundedByTheDeadline(self):
        """B waits at most its deadline for A's refresh, then fails; A's result still lands."""
        (ta, ra), (tb, rb) = self.a, self.b
        da = ta.get(account())
        db = tb.get(account())
        self.advance(10.0)
        self.failureResultOf(db, Unavailable)
        self.failureResultOf(da, Unavailable)
        self.assertEqual(len(rb.calls), 0)
        ra.answer(Grant("at-A", 3600.0))
        self.assertEqual(self.store.saved["alice"][0], "at-A")


class SessionRegistryTicketTests(SynchronousTestCase):
    """Close requests that arrive while a login is under way refuse that login."""

    def test_aCloseDuringTheLoginRefusesIt(self):
        """A revocation of the login's token after its ticket was taken refuses it."""
        r = SessionRegistry()
        ticket = r.loginStarted()
        r.close(tokenId="t1")
        self.assertTrue(r.loginEnded(ticket, "alice", "t1"))

    def test_aCloseOfAnotherTokenOrAccountDoesNot(self):
        """Other tokens and accounts are not affected."""
        r = SessionRegistry()
        ticket = r.loginStarted()
        r.close(tokenId="t2")
        r.close(account="bob")
        self.assertFalse(r.loginEnded(ticket, "alice", "t1"))

    def test_aCloseOfTheAccountRefusesIt(self):
        """Deleting the account during the login refuses it."""
        r = SessionRegistry()
        ticket = r.loginStarted()
        r.close(account="alice")
        self.assertTrue(r.loginEnded(ticket, "alice", "t1"))

    def test_aCloseBeforeTheLoginDoesNot(self):
        """A close request older than the login is no reason to refuse it."""
        r = SessionRegistry()
        r.close(tokenId="t1")
        ticket = r.loginStarted()
        self.assertFalse(r.loginEnded(ticket, "alice", "t1"))

    def test_closeRequestsAreForgottenWhenNoLoginNeedsThem(self):
        """Kept close requests are bounded by the logins under way."""
        r = SessionRegistry()
        first = r.loginStarted()
        for n in range(100):
            r.close(tokenId=f"t{n}")
        second = r.loginStarted()
        r.close(tokenId="late")
        self.assertFalse(r.loginEnded(first, "alice", "t-other"))
        self.assertEqual(len(r._closes), 1)
        self.assertTrue(r.loginEnded(second, "alice", "late"))
        self.assertEqual(len(r._closes), 0)
