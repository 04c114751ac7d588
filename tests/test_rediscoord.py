"""
Tests for ``proxy.store._rediscoord`` against a real redis-server: the refresh
lock's lease semantics, and close requests carried between two instances'
session buses, including those published while one was not subscribed.
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from proxy.store import RefreshLock, SessionBus
from tests.test_store_redis import RedisHarness, setUpModule, tearDownModule

__all__ = ["setUpModule", "tearDownModule"]

# A close request reaches a subscribed instance well within this.
PROMPT = 5.0
ALICE = "imapproxy:lock:refresh:alice"
BOB = "imapproxy:lock:refresh:bob"


@inlineCallbacks
def until(condition, timeout: float = PROMPT):
    """Wait, without blocking the reactor, until ``condition()`` is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        yield deferLater(reactor, 0.02, lambda: None)


class RefreshLockTests(RedisHarness, TestCase):
    """The lease: one holder, released only by it, gone by itself after its TTL."""

    @inlineCallbacks
    def test_oneHolderAtATime(self):
        """A held lease refuses a second taker until its holder releases it."""
        lock = RefreshLock((yield self.openStore()))
        first = yield lock.acquire("alice", 5.0)
        self.assertIsNotNone(first)
        self.assertIsNone((yield lock.acquire("alice", 5.0)))
        self.assertIsNotNone((yield lock.acquire("bob", 5.0)), "leases are per account")
        self.assertFalse((yield lock.release("alice", "not-the-lease")))
        self.assertIsNone((yield lock.acquire("alice", 5.0)))
        self.assertTrue((yield lock.release("alice", first)))
        self.assertIsNotNone((yield lock.acquire("alice", 5.0)))

    @inlineCallbacks
    def test_aLeaseExpiresUnlessRenewed(self):
        """An unrenewed lease lapses after its TTL; a renewed one does not."""
        lock = RefreshLock((yield self.openStore()))
        lapsing = yield lock.acquire("alice", 30.0)
        kept = yield lock.acquire("bob", 30.0)
        # The TTL is Redis's own key TTL, set from the lease's; renewing restarts it.
        for key in (ALICE, BOB):
            self.assertTrue(0 < int(self.server.command("PTTL", key)) <= 30_000)
        self.assertTrue((yield lock.renew("bob", kept, 60.0)))
        self.assertGreater(int(self.server.command("PTTL", BOB)), 30_000)
        # Alice's TTL runs out: an expiry time in the past removes the key,
        # as Redis does when the time comes, without waiting for it.
        self.server.command("PEXPIREAT", ALICE, "1000")
        self.assertFalse((yield lock.renew("alice", lapsing, 30.0)), "lapsed: not ours")
        self.assertIsNotNone((yield lock.acquire("alice", 5.0)))
        self.assertIsNone((yield lock.acquire("bob", 5.0)))

    @inlineCallbacks
    def test_theLeaseLivesInTheStoresDatabase(self):
        """Leases are keys of the store's prefix and database, with a TTL."""
        lock = RefreshLock((yield self.openStore()))
        yield lock.acquire("alice", 5.0)
        keys = self.server.command("KEYS", "*lock*")
        self.assertEqual(keys, ["imapproxy:lock:refresh:alice"])
        self.assertGreater(int(self.server.command("PTTL", keys[0])), 4000)


class SessionBusTests(RedisHarness, TestCase):
    """Close requests published by one instance reach the others."""

    @inlineCallbacks
    def bus(self, url: str | None = None) -> Deferred[tuple[SessionBus, list]]:
        store = yield self.openStore(url=url)
        closed: list[tuple[str | None, str | None]] = []

        def close(account, token):
            closed.append((account, token))
            return 1

        bus = SessionBus(store, close, reactor, ping=0.5)
        bus.startService()
        self.addCleanup(bus.stopService)
        yield until(lambda: bus._subscribed)
        return bus, closed

    @inlineCallbacks
    def test_aCloseRequestReachesTheOtherInstance(self):
        """A's request closes sessions on B, and is not applied twice on A."""
        a, closedA = yield self.bus()
        b, closedB = yield self.bus()
        listening = yield a.publish(tokenId="t1")
        self.assertEqual(listening, 1)
        yield until(lambda: closedB)
        yield a.publish(account="alice")
        yield until(lambda: len(closedB) == 2)
        self.assertEqual(closedB, [(None, "t1"), ("alice", None)])
        self.assertEqual(closedA, [])

    @inlineCallbacks
    def test_requestsMissedWhileAwayAreAppliedOnReturn(self):
        """An instance that was not subscribed reads what it missed from the stream."""
        a, _ = yield self.bus()
        b, closedB = yield self.bus()
        yield b.stopService()
        yield a.publish(tokenId="t-missed")
        yield a.publish(account="bob")
        self.assertEqual(closedB, [])
        b.startService()
        yield until(lambda: len(closedB) == 2)
        self.assertEqual(closedB, [(None, "t-missed"), ("bob", None)])
        yield a.publish(tokenId="t-live")
        yield until(lambda: len(closedB) == 3)

    @inlineCallbacks
    def test_aNewInstanceDoesNotReplayOldRequests(self):
        """Requests made before an instance first subscribed are not its business."""
        a, _ = yield self.bus()
        yield a.publish(tokenId="t-old")
        b, closedB = yield self.bus()
        yield a.publish(tokenId="t-new")
        yield until(lambda: closedB)
        self.assertEqual(closedB, [(None, "t-new")])

    @inlineCallbacks
    def test_malformedMessagesAreIgnored(self):
        """Garbage on the channel is logged and skipped; later requests still work."""
        a, _ = yield self.bus()
        b, closedB = yield self.bus()
        for garbage in ["", "no-id", "99999999999999-0 {not json", "99999999999999-1 [1,2]"]:
            self.server.command("PUBLISH", b.channel, garbage)
        yield a.publish(tokenId="t1")
        yield until(lambda: closedB)
        self.assertEqual(closedB, [(None, "t1")])
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_databasesDoNotShareRequests(self):
        """Stores in different databases of one server are separate deployments."""
        a, _ = yield self.bus()
        other, closedOther = yield self.bus(url=self.server.url.rsplit("/", 1)[0] + "/1")
        b, closedB = yield self.bus()
        yield a.publish(tokenId="t1")
        yield until(lambda: closedB)
        self.assertEqual(closedOther, [])
