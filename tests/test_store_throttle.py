"""
The stores' records of throttled accounts (``IThrottleStore``): one contract
for the in-process stores (memory, SQLite) and the Redis store, and what
Redis adds: records shared by every instance, ended by a TTL.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

import tests.test_store as storetests
from proxy.store._throttles import IThrottleStore

NOW = 1764511200.0


class ThrottleContractMixin:
    """What every store keeps of a throttling: reason, when, until when."""

    def openStore(self):
        store = self.newStore()
        return store.open().addCallback(lambda _: store)

    @inlineCallbacks
    def test_recordAndForget(self):
        """A record is read back per account and protocol, and forgotten after keep."""
        store = yield self.openStore()
        self.assertTrue(verifyObject(IThrottleStore, store))
        yield store.setThrottle("alice", "imap", "throttled-backoff", NOW, NOW + 3.0, 60.0)
        found = yield store.getThrottles(
            [("alice", "imap"), ("alice", "smtp"), ("bob", "imap")], NOW + 1
        )
        self.assertEqual(found, [("throttled-backoff", NOW, NOW + 3.0), None, None])
        yield store.setThrottle("alice", "imap", "throttled-connections", NOW + 5, NOW + 15, 60.0)
        (found,) = yield store.getThrottles([("alice", "imap")], NOW + 6)
        self.assertEqual(found, ("throttled-connections", NOW + 5, NOW + 15))

    @inlineCallbacks
    def test_longerNotShortened(self):
        """
        A shorter back-off met later (a concurrent login) does not end a longer
        one early: the provider's lock-out still runs. A later-ending one replaces it.
        """
        store = yield self.openStore()
        yield store.setThrottle("alice", "imap", "throttled-bandwidth", NOW, NOW + 60.0, 60.0)
        yield store.setThrottle("alice", "imap", "throttled-connections", NOW + 1, NOW + 11, 60.0)
        (found,) = yield store.getThrottles([("alice", "imap")], NOW + 2)
        self.assertEqual(found, ("throttled-bandwidth", NOW, NOW + 60.0))
        yield store.setThrottle("alice", "imap", "throttled-quota", NOW + 2, NOW + 62, 60.0)
        (found,) = yield store.getThrottles([("alice", "imap")], NOW + 3)
        self.assertEqual(found, ("throttled-quota", NOW + 2, NOW + 62))

    @inlineCallbacks
    def test_noKeys(self):
        """Asking for nothing answers nothing."""
        store = yield self.openStore()
        self.assertEqual((yield store.getThrottles([], NOW)), [])


class MemoryThrottleTests(ThrottleContractMixin, TestCase):
    setUp = storetests.MemoryStoreTests.setUp
    newStore = storetests.MemoryStoreTests.newStore

    @inlineCallbacks
    def test_forgottenAfterKeep(self):
        """In process, a record is dropped once ``until + keep`` has passed."""
        store = yield self.openStore()
        yield store.setThrottle("alice", "imap", "throttled", NOW, NOW + 3.0, 60.0)
        self.assertEqual((yield store.getThrottles([("alice", "imap")], NOW + 63.0)), [None])


class SQLiteThrottleTests(ThrottleContractMixin, TestCase):
    setUp = storetests.SQLiteStoreTests.setUp
    newStore = storetests.SQLiteStoreTests.newStore
    closeOnce = staticmethod(storetests.SQLiteStoreTests.closeOnce)
