"""
The Redis store behind a real Sentinel set (one master, one replica, three
sentinels on 127.0.0.1): after the master is killed, the store and the
session bus carry on with the promoted replica by themselves, with nothing
written before the kill lost; after a manual failover (the old master stays
up) writes follow the new master; writes that matter wait for the replica.
"""

from __future__ import annotations

import itertools
import shutil
import time
from unittest import SkipTest

from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from proxy.encryption import Secrets
from proxy.store import SessionBus, StoreError, StoreUnavailable
from proxy.store._redissentinel import WAIT_MS
from proxy.store.redis import RedisStore
from tests.test_rediscoord import until
from tests.test_store import sharedAccount, token
from tests.test_store_redis import eventually
from tests.upstream.osutil import wait_until
from tests.upstream.redissentinel import SentinelSet
from tests.upstream.redisserver import RedisServerError

# The store works again within this after the master is killed (a failover
# takes 1-3 s with the set's settings, plus a reconnection).
RECOVERY = 15.0

_set: SentinelSet | None = None


def setUpModule():
    global _set
    if shutil.which("redis-server") is None:
        raise SkipTest("redis-server is not installed")
    _set = SentinelSet()
    _set.start()


def tearDownModule():
    global _set
    if _set is not None:
        _set.cleanup()
        _set = None


class SentinelStoreTests(TestCase):
    def setUp(self):
        assert _set is not None
        self.set = _set
        self.set.master().flush()
        self.key = Fernet.generate_key()
        # Last: a turn of the reactor for what txredisapi parses in the next one.
        self.addCleanup(deferLater, reactor, 0.05, lambda: None)

    @inlineCallbacks
    def openStore(self, query: str = ""):
        store = RedisStore(self.set.url + query, Secrets([self.key]))
        self.addCleanup(store.close)
        yield store.open()
        return store

    def failover(self, manual: bool = False):
        """
        Kill the master (or ask for a failover) once the replica holds all it
        wrote; wait for the new one; revive the old.
        """
        self.set.wait_replicated()
        old = self.set.master()
        if manual:
            # A sentinel takes a few seconds to see a revived server (an
            # earlier test's old master) as a good replica again; until then
            # it answers NOGOODSLAVE (or INPROG, a failover still running).
            def asked() -> bool:
                try:
                    self.set.sentinels[0].command("SENTINEL", "FAILOVER", self.set.service)
                except RedisServerError as e:
                    if "NOGOODSLAVE" in str(e) or "INPROG" in str(e):
                        return False
                    raise
                return True

            wait_until(asked, RECOVERY, "a sentinel taking the failover")
        else:
            old.kill()
        self.addCleanup(self.set.revive, old)
        assert old.port is not None
        return self.set.wait_failover(old.port)

    @inlineCallbacks
    def test_theMasterKilled(self):
        """Reads and writes work again within seconds; nothing written before is lost."""
        store = yield self.openStore()
        other = yield self.openStore()
        yield store.putAccount(sharedAccount("alice"))
        for i in range(20):
            yield store.addToken(token(f"t{i}", "alice"))
        closed = []
        a = SessionBus(store, lambda *_: 0, reactor, ping=0.5)
        b = SessionBus(other, lambda acct, tok: closed.append((acct, tok)) or 1, reactor, ping=0.5)
        for bus in (a, b):
            bus.startService()
            self.addCleanup(bus.stopService)
        yield until(lambda: a._subscribed and b._subscribed)

        started = time.monotonic()
        new = self.failover()
        yield eventually(lambda: store.addToken(token("after", "alice")), RECOVERY)
        self.assertLess(time.monotonic() - started, RECOVERY)
        tokens = yield store.listTokens("alice")
        self.assertEqual(
            sorted(t.id for t in tokens), sorted(["after"] + [f"t{i}" for i in range(20)])
        )
        self.assertIsNotNone((yield store.getAccount("alice")))
        self.assertEqual(new.command("EXISTS", "imapproxy:token:after"), 1)
        # The session bus: the subscriber found the new master by itself.
        yield eventually(lambda: a.publish(tokenId="t3"), RECOVERY)
        yield until(lambda: closed == [(None, "t3")], RECOVERY)

    @inlineCallbacks
    def test_writesFollowAManualFailover(self):
        """
        The old master stays up (and takes writes until the sentinels demote
        it): the store's writes soon reach the new one, and no write the
        store reported done is lost with the old master.
        """
        store = yield self.openStore()
        yield store.addToken(token("before", None))
        new = self.failover(manual=True)
        done: list[str] = []
        deadline = time.monotonic() + RECOVERY
        for n in itertools.count():
            try:
                yield store.addToken(token(f"w{n}", None))
            except StoreError:
                pass
            else:
                done.append(f"w{n}")
                if new.command("EXISTS", f"imapproxy:token:w{n}"):
                    break
            self.assertLess(time.monotonic(), deadline, "the writes never reached the new master")
            yield deferLater(reactor, 0.05, lambda: None)
        lost = [t for t in done if not new.command("EXISTS", f"imapproxy:token:{t}")]
        self.assertEqual(lost, [])
        self.assertIsNotNone((yield store.getToken("before")))

    @inlineCallbacks
    def test_writesThatMatterWaitForTheReplica(self):
        """A token is on the replica when addToken returns; a hung replica delays it, no more."""
        store = yield self.openStore()
        replica = next(s for s in self.set.servers if s is not self.set.master())
        yield store.addToken(token("t1", None))
        self.assertEqual(replica.command("EXISTS", "imapproxy:token:t1"), 1)
        replica.pause()
        try:
            started = time.monotonic()
            yield store.addToken(token("t2", None))
            self.assertGreaterEqual(time.monotonic() - started, WAIT_MS / 1000)
            self.assertTrue(store._replicasShort)
        finally:
            replica.resume()
        # Not waited for: a login's touch, say.
        unwaited = yield self.openStore("?replicas=0")
        replica.pause()
        try:
            started = time.monotonic()
            yield unwaited.addToken(token("t3", None))
            self.assertLess(time.monotonic() - started, WAIT_MS / 1000)
        finally:
            replica.resume()


class PasswordTests(TestCase):
    """A set whose servers and sentinels each require their own password."""

    def setUp(self):
        self.set = SentinelSet(password="server-pw", sentinel_password="sentinel-pw")
        self.set.start()
        self.addCleanup(self.set.cleanup)
        self.addCleanup(deferLater, reactor, 0.05, lambda: None)

    def store(self, url: str) -> RedisStore:
        store = RedisStore(url, Secrets([Fernet.generate_key()]))
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_bothPasswords(self):
        """The URL's password logs in to the servers, ``sentinel_password`` to the sentinels."""
        store = self.store(self.set.url)
        store.openBlocking()
        yield store.addToken(token("t1", None))
        self.assertEqual(self.set.master().command("EXISTS", "imapproxy:token:t1"), 1)

    @inlineCallbacks
    def test_noSentinelPassword(self):
        """Sentinels that want a password and get none: unavailable, promptly, saying why."""
        url = self.set.url.split("?")[0]
        with self.assertRaises(StoreUnavailable) as caught:
            self.store(url).openBlocking()
        self.assertIn("NOAUTH", str(caught.exception))
        started = time.monotonic()
        with self.assertRaises(StoreUnavailable):
            yield self.store(url).open()
        self.assertLess(time.monotonic() - started, 5)
