"""
Tests for ``RedisStore`` against a real redis-server (one per module, flushed
before each test): the store contract from ``tests.test_store`` (which the
SQLite and in-memory stores pass too), and what is particular to Redis: TTLs,
the key layout, encryption at rest, outages, the marker restored.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from unittest import SkipTest

from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import tests.test_store as contract
from proxy.encryption import Secrets
from proxy.store import (
    IAccountStore,
    IRedisAccess,
    ISlotCounter,
    ITokenStore,
    RedisSlots,
    StoreDataLost,
    StoreError,
)
from proxy.store._redisconn import (
    MAX_REPLY_BYTES,
    MAX_REPLY_DEPTH,
    MAX_REPLY_ELEMENTS,
    _blockingCommand,
    _readReply,
)
from proxy.store.redis import RedisAddress, RedisStore, StoreUnavailable, parseRedisURL
from tests.test_store import (
    ACCESS,
    APP_SECRET,
    CLIENT_SECRET,
    REFRESH,
    VERIFIER,
    account,
    app,
    pending,
    sharedAccount,
    token,
)
from tests.test_store_throttle import NOW, ThrottleContractMixin
from tests.upstream.redisserver import RedisServer

# An operation against a Redis that is gone or hung fails within this.
PROMPT = 3.5

_server: RedisServer | None = None


def setUpModule():
    global _server
    if shutil.which("redis-server") is None:
        raise SkipTest("redis-server is not installed")
    _server = RedisServer()
    _server.start()


def tearDownModule():
    global _server
    if _server is not None:
        _server.cleanup()
        _server = None


def moduleServer() -> RedisServer:
    assert _server is not None, "setUpModule did not run"
    return _server


@inlineCallbacks
def eventually(f, timeout: float = 10.0):
    """Call ``f`` until its Deferred succeeds (Redis coming back), or give up."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            result = yield f()
            return result
        except StoreError:
            if reactor.seconds() > deadline:
                raise
        yield deferLater(reactor, 0.05, lambda: None)


class RedisHarness:
    """A fresh ``RedisStore`` on the module's server, flushed before each test."""

    def setUp(self):
        self.server = moduleServer()
        self.server.flush()
        self.key = Fernet.generate_key()

    def newStore(self, secrets: Secrets | None = None, url: str | None = None, **kw) -> RedisStore:
        store = RedisStore(url or self.server.url, secrets or Secrets([self.key]), **kw)
        self.addCleanup(store.close)
        return store

    def openStore(self, secrets: Secrets | None = None, url: str | None = None, **kw):
        store = self.newStore(secrets, url, **kw)
        return store.open().addCallback(lambda _: store)

    def loseData(self) -> None:
        # What a Redis restarted without persistence holds: nothing.
        self.server.command("FLUSHALL")


class RedisStoreContractTests(RedisHarness, contract.StoreContractMixin, TestCase):
    """The shared store contract, against Redis."""


class RedisStoreTests(RedisHarness, TestCase):
    """What is particular to the Redis store."""

    def raw(self, *args: str):
        return self.server.command(*args)

    @inlineCallbacks
    def test_interfaces(self):
        """The store provides both store interfaces before it is even opened."""
        store = self.newStore()
        self.assertTrue(IAccountStore.providedBy(store))
        self.assertTrue(ITokenStore.providedBy(store))
        # What the refresh lock and the session bus use of it.
        self.assertTrue(verifyObject(IRedisAccess, store))
        yield store.close()

    @inlineCallbacks
    def test_keyLayout(self):
        """Records live under the prefix in the documented keys and types."""
        store = yield self.openStore()
        yield store.putApp(app())
        yield store.putAccount(sharedAccount("alice"))
        yield store.addToken(token("t1", "alice"))
        yield store.addToken(token("root", None))
        yield store.addPending(pending())
        types = {k: self.raw("TYPE", k) for k in self.raw("KEYS", "*")}
        self.assertEqual(
            types,
            {
                "imapproxy:meta": "hash",
                "imapproxy:accounts": "set",
                "imapproxy:account:alice": "hash",
                "imapproxy:app-accounts:mail-app": "set",
                "imapproxy:apps": "set",
                "imapproxy:app:mail-app": "hash",
                "imapproxy:token:t1": "hash",
                "imapproxy:token:root": "hash",
                "imapproxy:tokens:all": "zset",
                "imapproxy:tokens:account:alice": "zset",
                "imapproxy:pending:state-1": "hash",
                "imapproxy:pendings": "zset",
            },
        )

    @inlineCallbacks
    def test_markerInMeta(self):
        """The marker (the store's id and creation time) is written once, under the prefix."""
        before = time.time()
        store = yield self.openStore()
        meta = self.server.command("HGETALL", "imapproxy:meta")
        meta = dict(zip(meta[::2], meta[1::2], strict=True))
        self.assertEqual(sorted(meta), ["created", "key_check", "schema", "store_id"])
        self.assertLessEqual(before, float(meta["created"]))
        yield self.openStore()
        self.assertEqual(self.raw("HGET", "imapproxy:meta", "store_id"), meta["store_id"])
        self.assertIsNone((yield store.checkHealth()))

    @inlineCallbacks
    def test_markerRestored(self):
        """Data restored from a backup (the same marker) makes the store healthy again."""
        store = yield self.openStore()
        yield store.addToken(token("t1"))
        saved = {k: self.raw("HGETALL", k) for k in ("imapproxy:meta", "imapproxy:token:t1")}
        self.loseData()
        yield self.assertFailure(store.checkHealth(), StoreDataLost)
        for k, fields in saved.items():
            self.raw("HSET", k, *fields)
        self.assertIsNone((yield store.checkHealth()))
        self.assertEqual((yield store.getToken("t1")), token("t1"))

    @inlineCallbacks
    def test_prefixAndDatabase(self):
        """Stores with other prefixes or databases do not see each other's records."""
        default = yield self.openStore()
        other = yield self.openStore(url=self.server.url + "?prefix=other%3A")
        db3 = yield self.openStore(url=self.server.url.replace("/0", "/3"))
        yield default.putAccount(account("alice"))
        yield other.putAccount(account("bob"))
        yield db3.putAccount(account("carol"))
        self.assertEqual([a.id for a in (yield default.listAccounts())], ["alice"])
        self.assertEqual([a.id for a in (yield other.listAccounts())], ["bob"])
        self.assertEqual([a.id for a in (yield db3.listAccounts())], ["carol"])
        self.assertTrue(self.raw("EXISTS", "other:account:bob"))
        self.assertEqual(self.raw("EXISTS", "imapproxy:account:carol"), 0)

    @inlineCallbacks
    def test_unixSocket(self):
        """A unix:// URL reaches the same data over the Unix socket."""
        tcp = yield self.openStore()
        yield tcp.putAccount(account())
        unix = yield self.openStore(url=self.server.unix_url)
        self.assertEqual((yield unix.getAccount("alice")).oauth2.refreshToken, REFRESH)

    @inlineCallbacks
    def test_tokenTTL(self):
        """A token with an expiry gets a Redis TTL at that time; one without, none."""
        store = yield self.openStore()
        expires = time.time() + 3600
        yield store.addToken(token("t1", expires=expires))
        yield store.addToken(token("t2"))
        at = self.raw("PEXPIRETIME", "imapproxy:token:t1")
        self.assertLess(abs(at / 1000 - expires), 0.01)
        self.assertEqual(self.raw("TTL", "imapproxy:token:t2"), -1)
        yield store.touchToken("t1", 1.0, "192.0.2.1")
        self.assertEqual(self.raw("PEXPIRETIME", "imapproxy:token:t1"), at)

    @inlineCallbacks
    def test_expiredTokenVanishes(self):
        """A token whose TTL has passed is gone from getToken and listTokens, indexes too."""
        store = yield self.openStore()
        yield store.addToken(token("t1", "alice", expires=time.time() + 3600))
        yield store.addToken(token("t2", "alice"))
        self.raw("PEXPIREAT", "imapproxy:token:t1", "1000")
        self.assertIsNone((yield store.getToken("t1")))
        self.assertEqual([t.id for t in (yield store.listTokens())], ["t2"])
        self.assertEqual([t.id for t in (yield store.listTokens("alice"))], ["t2"])
        self.assertEqual(self.raw("ZRANGE", "imapproxy:tokens:all", "0", "-1"), ["t2"])
        self.assertEqual(self.raw("ZRANGE", "imapproxy:tokens:account:alice", "0", "-1"), ["t2"])

    @inlineCallbacks
    def test_tokenWrittenExpired(self):
        """A token written already expired is kept a minute: the proxy judges expiry."""
        store = yield self.openStore()
        yield store.addToken(token("t1", expires=time.time() - 10))
        self.assertEqual((yield store.getToken("t1")).id, "t1")
        ttl = self.raw("PTTL", "imapproxy:token:t1")
        self.assertTrue(0 < ttl <= 61_000, ttl)

    @inlineCallbacks
    def test_pendingTTL(self):
        """A pending authorization expires in Redis at its expiry, then cannot be taken."""
        store = yield self.openStore()
        p = pending()
        yield store.addPending(p)
        at = self.raw("PEXPIRETIME", "imapproxy:pending:state-1")
        self.assertLess(abs(at / 1000 - p.expires), 0.01)
        self.raw("PEXPIREAT", "imapproxy:pending:state-1", "1000")
        self.assertIsNone((yield store.takePending("state-1")))

    @inlineCallbacks
    def test_pendingIndexCleaned(self):
        """Adding an authorization drops index entries of expired ones."""
        store = yield self.openStore()
        yield store.addPending(pending("old", expires=time.time() - 3600))
        self.raw("ZADD", "imapproxy:pendings", "1000", "old")
        yield store.addPending(pending("new"))
        self.assertEqual(self.raw("ZRANGE", "imapproxy:pendings", "0", "-1"), ["new"])

    @inlineCallbacks
    def test_secretsEncryptedAtRest(self):
        """No secret is stored in plaintext: not in keys, fields or values."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.setRefreshToken("alice", REFRESH + "-rotated")
        yield store.saveAccessToken("alice", ACCESS, 5000.0, 3600.0)
        yield store.putApp(app())
        yield store.addPending(pending())
        flat = repr(self.server.dump())
        self.assertIn("imap.example.com", flat)  # the records are there, readable...
        for secret in (REFRESH, CLIENT_SECRET, ACCESS, APP_SECRET, VERIFIER):
            self.assertNotIn(secret, flat)  # ...but not their secrets

    @inlineCallbacks
    def test_wrongKeyRefused(self):
        """A store opened with a different key refuses to open with StoreError."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        other = self.newStore(Secrets([Fernet.generate_key()]))
        e = yield self.assertFailure(other.open(), StoreError)
        self.assertIn("secret key does not match", str(e))
        self.assertNotIn(self.key.decode(), str(e))
        # Refused means not open, not half-open.
        yield self.assertFailure(other.getAccount("alice"), StoreError)

    @inlineCallbacks
    def test_rotatedKeys(self):
        """A store opened with keys [new, old] opens and reads old secrets."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        rotated = yield self.openStore(Secrets([Fernet.generate_key(), self.key]))
        self.assertEqual((yield rotated.getAccount("alice")).oauth2.clientSecret, CLIENT_SECRET)

    @inlineCallbacks
    def test_rotateRetriesOnConflict(self):
        """A secret changed during a rotation is not overwritten: the rotation runs again."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        new = Fernet.generate_key()
        both = yield self.openStore(Secrets([new, self.key]))
        collect, calls = both._collect, []

        def racingCollect():
            d = collect()
            calls.append(d)
            if len(calls) == 1:
                d.addCallback(
                    lambda found: both.setRefreshToken("alice", "rt-changed").addCallback(
                        lambda _: found
                    )
                )
            return d

        both._collect = racingCollect
        self.assertEqual((yield both.rotateSecrets()), 3)
        self.assertEqual(len(calls), 2)
        newOnly = yield self.openStore(Secrets([new]))
        self.assertEqual((yield newOnly.getAccount("alice")).oauth2.refreshToken, "rt-changed")

    @inlineCallbacks
    def test_manyAtOnce(self):
        """Many operations at once over the pool all complete, each with its own answer."""
        store = yield self.openStore(poolSize=2)
        ids = [f"t{i:03d}" for i in range(200)]
        yield gatherResults([store.addToken(token(t, created=float(i))) for i, t in enumerate(ids)])
        got = yield gatherResults([store.getToken(t) for t in ids])
        self.assertEqual([t.id for t in got], ids)
        self.assertEqual([t.id for t in (yield store.listTokens())], ids[::-1])

    @inlineCallbacks
    def test_notOpen(self):
        """A store used before open() errbacks with StoreError."""
        store = self.newStore()
        yield self.assertFailure(store.listAccounts(), StoreError)

    @inlineCallbacks
    def test_useAfterClose(self):
        """A store used after close() errbacks with StoreError; a second close is harmless."""
        store = yield self.openStore()
        yield store.close()
        yield store.close()
        e = yield self.assertFailure(store.getToken("t1"), StoreError)
        self.assertEqual(str(e), "the store is closed")
        yield self.assertFailure(store.open(), StoreError)

    @inlineCallbacks
    def test_openBlocking(self):
        """openBlocking checks the key before the reactor; the store then connects on use."""
        store = self.newStore()
        store.openBlocking()
        self.assertIsNone(store._redis)
        yield store.putAccount(account())
        self.assertEqual((yield store.getAccount("alice")).oauth2.refreshToken, REFRESH)
        other = self.newStore(Secrets([Fernet.generate_key()]))
        e = self.assertRaises(StoreError, other.openBlocking)
        self.assertIn("secret key does not match", str(e))

    @inlineCallbacks
    def test_closeBlocking(self):
        """_closeBlocking after openBlocking leaves the store to be opened again."""
        store = self.newStore()
        store.openBlocking()
        store._closeBlocking()
        yield self.assertFailure(store.getAccount("alice"), StoreError)
        yield store.open()
        self.assertEqual((yield store.listAccounts()), [])

    @inlineCallbacks
    def test_service(self):
        """As a service the store opens on start and closes on stop."""
        store = self.newStore()
        store.startService()
        yield eventually(lambda: store.putAccount(account()))
        yield store.stopService()
        yield self.assertFailure(store.getAccount("alice"), StoreError)


class RedisOutageTests(TestCase):
    """
    A Redis of its own per test, taken away and brought back with its data
    (it persists every write), or once without it.
    """

    def setUp(self):
        if shutil.which("redis-server") is None:
            raise SkipTest("redis-server is not installed")
        self.server = RedisServer(persist=True)
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.key = Fernet.generate_key()

    def newStore(self, url: str | None = None) -> RedisStore:
        store = RedisStore(url or self.server.url, Secrets([self.key]))
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def assertUnavailablePromptly(self, d):
        start = reactor.seconds()
        e = yield self.assertFailure(d, StoreUnavailable)
        self.assertLess(reactor.seconds() - start, PROMPT)
        self.assertIn("unavailable", str(e))
        return e

    @inlineCallbacks
    def test_downThenBack(self):
        """With Redis gone operations fail promptly; once back the store reconnects by itself."""
        store = self.newStore()
        yield store.open()
        yield store.addToken(token("t1"))
        self.server.stop()
        yield self.assertUnavailablePromptly(store.getToken("t1"))
        yield self.assertUnavailablePromptly(store.addToken(token("t2")))
        self.server.start()
        yield eventually(lambda: store.addToken(token("t3")))
        self.assertEqual((yield store.getToken("t3")), token("t3"))

    @inlineCallbacks
    def test_restartedEmpty(self):
        """A Redis back without its data: unhealthy with the reason, token reads unavailable."""
        server = RedisServer()
        server.start()
        self.addCleanup(server.cleanup)
        store = self.newStore(server.url)
        yield store.open()
        yield store.addToken(token("t1"))
        self.assertIsNone((yield store.checkHealth()))
        server.stop()
        yield self.assertUnavailablePromptly(store.checkHealth())
        server.start()
        deadline = reactor.seconds() + 10
        while True:
            try:
                yield store.checkHealth()
            except StoreDataLost as e:
                self.assertEqual(str(e), "data lost: marker missing (Redis restarted empty?)")
                break
            except StoreUnavailable:
                self.assertLess(reactor.seconds(), deadline, "Redis did not come back")
                yield deferLater(reactor, 0.05, lambda: None)
            else:
                self.fail("an empty store was healthy")
        yield self.assertFailure(store.getToken("t1"), StoreDataLost)

    @inlineCallbacks
    def test_knownDownFailsAtOnce(self):
        """Once Redis is known to be down, later operations fail at once, not after the timeout."""
        store = self.newStore()
        yield store.open()
        self.server.stop()
        yield self.assertUnavailablePromptly(store.getToken("t1"))
        start = reactor.seconds()
        for n in range(5):
            yield self.assertFailure(store.getToken(f"t{n}"), StoreUnavailable)
        self.assertLess(reactor.seconds() - start, 0.5)
        self.server.start()
        yield eventually(lambda: store.addToken(token("t9")))

    @inlineCallbacks
    def test_hungThenBack(self):
        """With Redis hung operations fail promptly; once it answers again, so does the store."""
        store = self.newStore()
        yield store.open()
        yield store.addToken(token("t1"))
        self.server.pause()
        try:
            yield self.assertUnavailablePromptly(store.getToken("t1"))
        finally:
            self.server.resume()
        got = yield eventually(lambda: store.getToken("t1"))
        self.assertEqual(got, token("t1"))

    @inlineCallbacks
    def test_openWhileDown(self):
        """Opening a store whose Redis is down fails promptly with StoreError, leaving it closed."""
        self.server.stop()
        store = self.newStore()
        e = yield self.assertUnavailablePromptly(store.open())
        self.assertIn(self.server.url, str(e))
        yield self.assertFailure(store.getToken("t1"), StoreError)
        start = reactor.seconds()
        self.assertRaises(StoreError, store.openBlocking)
        self.assertLess(reactor.seconds() - start, PROMPT)

    @inlineCallbacks
    def test_closeFailsWaiting(self):
        """Closing the store fails at once the operations waiting for Redis."""
        store = self.newStore()
        yield store.open()
        self.server.stop()
        d = store.getToken("t1")
        start = reactor.seconds()
        yield store.close()
        e = yield self.assertFailure(d, StoreError)
        self.assertEqual(str(e), "the store is closed")
        self.assertLess(reactor.seconds() - start, 0.5)


class RedisPasswordTests(TestCase):
    """A Redis that wants a password, in another database."""

    def setUp(self):
        if shutil.which("redis-server") is None:
            raise SkipTest("redis-server is not installed")
        self.server = RedisServer(password="s3cret-pass")
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.key = Fernet.generate_key()

    def newStore(self, url: str, **kw) -> RedisStore:
        store = RedisStore(url, Secrets([self.key]), **kw)
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_password(self):
        """The password in the URL logs in, over TCP and the Unix socket, in database 2."""
        store = self.newStore(self.server.url.replace("/0", "/2"))
        yield store.open()
        yield store.putAccount(account())
        unix = self.newStore(self.server.unix_url.replace("db=0", "db=2"))
        yield unix.open()
        self.assertEqual((yield unix.getAccount("alice")).oauth2.refreshToken, REFRESH)
        self.assertEqual(self.server.command("DBSIZE"), 0)  # database 0

    @inlineCallbacks
    def test_wrongPassword(self):
        """A wrong password fails open promptly, saying why but not the password."""
        url = self.server.url.replace("s3cret-pass", "wrong-pass")
        store = self.newStore(url)
        start = reactor.seconds()
        e = yield self.assertFailure(store.open(), StoreError)
        self.assertLess(reactor.seconds() - start, PROMPT)
        self.assertIn("WRONGPASS", str(e))
        self.assertNotIn("wrong-pass", str(e))
        other = self.newStore(url)
        e = self.assertRaises(StoreError, other.openBlocking)
        self.assertIn("WRONGPASS", str(e))
        self.assertNotIn("wrong-pass", str(e))

    @inlineCallbacks
    def test_hungLoginThenBack(self):
        """A reconnection whose login Redis does not answer is retried, not abandoned."""
        store = self.newStore(self.server.url.replace("/0", "/1"), poolSize=1, timeout=0.5)
        yield store.open()
        self.server.pause()
        try:
            # A reply times out and the connection is dropped (0.5 s), Redis
            # is dialled again (0.2 s) and the login times out (0.5 s): keep
            # using the store, hung, for longer than that.
            start = reactor.seconds()
            while reactor.seconds() - start < 2.0:
                yield self.assertFailure(store.getToken("t1"), StoreUnavailable)
                yield deferLater(reactor, 0.05, lambda: None)
        finally:
            self.server.resume()
        self.assertIsNone((yield eventually(lambda: store.getToken("t1"))))


class RedisURLTests(SynchronousTestCase):
    def test_tcp(self):
        """A redis:// URL gives host, port, database and credentials, percent-decoded."""
        a = parseRedisURL("redis://user:p%40ss@redis.example.com:6380/4")
        self.assertEqual(
            (a.host, a.port, a.db, a.username, a.password, a.path),
            ("redis.example.com", 6380, 4, "user", "p@ss", None),
        )
        self.assertEqual(a.prefix, "imapproxy:")
        self.assertNotIn("p@ss", repr(a))
        self.assertEqual(a.describe(), "redis://redis.example.com:6380/4")

    def test_defaults(self):
        """Host, port and database default to localhost, 6379 and 0."""
        a = parseRedisURL("redis://")
        self.assertEqual((a.host, a.port, a.db, a.password), ("localhost", 6379, 0, None))
        self.assertEqual(parseRedisURL("redis://:pw@h").password, "pw")

    def test_ipv6(self):
        """An IPv6 literal host is understood and described in brackets."""
        a = parseRedisURL("redis://[::1]:7000/1")
        self.assertEqual((a.host, a.port), ("::1", 7000))
        self.assertEqual(a.describe(), "redis://[::1]:7000/1")

    def test_unix(self):
        """A unix:// URL gives the socket path, database, password and prefix."""
        a = parseRedisURL("unix:///run/redis/redis.sock?db=3&password=pw&prefix=p%3A")
        self.assertEqual(
            (a.path, a.db, a.password, a.prefix), ("/run/redis/redis.sock", 3, "pw", "p:")
        )
        self.assertEqual(a.describe(), "unix:///run/redis/redis.sock?db=3")

    def test_bad(self):
        """Malformed URLs are refused with StoreError."""
        for url in (
            "sqlite:///x",
            "rediss://h",
            "redis://h:notaport",
            "redis://h/x",
            "redis://h/1?db=2",
            "redis://h?password=pw",
            "redis://h?color=red",
            "redis://h?db=1&db=2",
            "unix://host/path",
            "unix://",
            "unix:///s?db=-1",
        ):
            with self.assertRaises(StoreError, msg=url):
                parseRedisURL(url)


class BlockingReplyLimitTests(SynchronousTestCase):
    """The blocking client (``openBlocking``'s) does not trust reply sizes."""

    def read(self, data: bytes):
        return _readReply(io.BytesIO(data))

    def test_withinLimits(self):
        """Replies up to the limits are read."""
        big = b"x" * MAX_REPLY_BYTES
        self.assertEqual(self.read(b"$%d\r\n%s\r\n" % (len(big), big)), big.decode())
        many = b"*%d\r\n" % MAX_REPLY_ELEMENTS + b":1\r\n" * MAX_REPLY_ELEMENTS
        self.assertEqual(self.read(many), [1] * MAX_REPLY_ELEMENTS)
        deep = b"*1\r\n" * MAX_REPLY_DEPTH + b"+OK\r\n"
        reply = self.read(deep)
        for _ in range(MAX_REPLY_DEPTH):
            (reply,) = reply
        self.assertEqual(reply, "OK")
        self.assertEqual(self.read(b"*2\r\n$-1\r\n*-1\r\n"), [None, None])

    def test_tooLong(self):
        """A string longer than the limit is refused before it is read."""
        with self.assertRaisesRegex(ValueError, "too long"):
            self.read(b"$%d\r\n" % (MAX_REPLY_BYTES + 1))
        with self.assertRaisesRegex(ValueError, "too long"):
            self.read(b"$99999999999999999999\r\n")

    def test_tooLongInAll(self):
        """Strings that are each short but too long together are refused."""
        half = b"x" * (MAX_REPLY_BYTES // 2 + 1)
        bulk = b"$%d\r\n%s\r\n" % (len(half), half)
        with self.assertRaisesRegex(ValueError, "too long"):
            self.read(b"*2\r\n" + bulk + bulk)

    def test_tooManyElements(self):
        """An array with more elements than the limit (in all) is refused."""
        with self.assertRaisesRegex(ValueError, "too many elements"):
            self.read(b"*%d\r\n" % (MAX_REPLY_ELEMENTS + 1))
        half = MAX_REPLY_ELEMENTS // 2 + 1
        inner = b"*%d\r\n" % half + b":1\r\n" * half
        with self.assertRaisesRegex(ValueError, "too many elements"):
            self.read(b"*2\r\n" + inner + inner)

    def test_tooDeep(self):
        """Arrays nested deeper than the limit are refused."""
        with self.assertRaisesRegex(ValueError, "nested too deeply"):
            self.read(b"*1\r\n" * (MAX_REPLY_DEPTH + 1) + b"+OK\r\n")

    def test_lineTooLong(self):
        """A status line without end is not read for ever."""
        with self.assertRaisesRegex(ValueError, "line is too long"):
            self.read(b"+" + b"x" * (1024 * 1024))

    def test_unavailable(self):
        """A server that announces a huge reply makes the store unavailable."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(10)

        def serve():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"+OK\r\n$%d\r\n" % (50 * 1024 * 1024 * 1024))

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        self.addCleanup(server.join, 10)
        address = RedisAddress(host="127.0.0.1", port=listener.getsockname()[1])
        with self.assertRaisesRegex(StoreUnavailable, "too long"):
            _blockingCommand(address, 5.0, ["PING"])


class RedisSlotsTests(RedisHarness, TestCase):
    """Connection slots in Redis: a cap shared by instances, slots that expire unrenewed."""

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.store = yield self.openStore()
        self.slots = RedisSlots(self.store, expiry=30.0)
        self.assertTrue(verifyObject(ISlotCounter, self.slots))

    @inlineCallbacks
    def test_capAcrossHolders(self):
        """Holders (of any instance) get slots up to the cap; a released one is free again."""
        got = []
        for holder in ("a:1", "b:1", "a:2"):
            got.append((yield self.slots.tryAcquire("alice/imap", 2, holder, 1000.0)))
        self.assertEqual(got, [True, True, False])
        self.assertTrue((yield self.slots.tryAcquire("alice/smtp", 2, "a:3", 1000.0)))
        self.assertEqual((yield self.slots.count("alice/imap", 1000.0)), 2)
        yield self.slots.release("alice/imap", "b:1")
        self.assertTrue((yield self.slots.tryAcquire("alice/imap", 2, "a:2", 1001.0)))
        ttl = self.server.command("PTTL", "imapproxy:slots:alice/imap")
        self.assertTrue(0 < int(ttl) <= 30000, ttl)

    @inlineCallbacks
    def test_unrenewedSlotsExpire(self):
        """A slot its instance stopped renewing is free after the expiry; a renewed one is not."""
        yield self.slots.tryAcquire("alice/imap", 2, "dead:1", 1000.0)
        yield self.slots.tryAcquire("alice/imap", 2, "live:1", 1000.0)
        yield self.slots.refresh([("alice/imap", "live:1")], 1020.0)
        self.assertFalse((yield self.slots.tryAcquire("alice/imap", 2, "new:1", 1029.0)))
        self.assertTrue((yield self.slots.tryAcquire("alice/imap", 2, "new:1", 1030.5)))
        self.assertFalse((yield self.slots.tryAcquire("alice/imap", 2, "new:2", 1031.0)))
        # Renewing never revives a slot swept meanwhile (that could pass the cap).
        yield self.slots.refresh([("alice/imap", "dead:1")], 1031.0)
        self.assertEqual((yield self.slots.count("alice/imap", 1031.0)), 2)

    @inlineCallbacks
    def test_wantedSpares(self):
        """A want lasts its seconds and is seen by every instance for that key only."""
        yield self.slots.want("alice/imap", 5.0)
        self.assertEqual((yield self.slots.wanted(["bob/imap", "alice/imap"])), ["alice/imap"])
        ttl = int(self.server.command("PTTL", "imapproxy:slots-want:alice/imap"))
        self.assertTrue(0 < ttl <= 5000, ttl)


class RedisThrottleTests(RedisHarness, ThrottleContractMixin, TestCase):
    """The throttle contract against Redis, and what Redis adds: shared, ended by a TTL."""

    @inlineCallbacks
    def test_sharedBetweenStores(self):
        """A back-off one instance records is what another instance reads."""
        one = yield self.openStore()
        two = yield self.openStore()
        yield one.setThrottle("alice", "imap", "throttled-backoff", NOW, NOW + 30.0, 60.0)
        found = yield two.getThrottles([("alice", "imap"), ("alice", "smtp")], NOW + 1)
        self.assertEqual(found, [("throttled-backoff", NOW, NOW + 30.0), None])

    @inlineCallbacks
    def test_keyEndsWithTTL(self):
        """The key lives ``until - at + keep``, then Redis drops it."""
        store = yield self.openStore()
        yield store.setThrottle("alice", "imap", "throttled-backoff", NOW, NOW + 30.0, 60.0)
        ttl = int(self.server.command("PTTL", "imapproxy:throttle:imap:alice"))
        self.assertTrue(85_000 < ttl <= 90_000, ttl)
        yield store.setThrottle("bob", "smtp", "throttled-busy", NOW, NOW + 0.2, 0.1)
        deadline = reactor.seconds() + 10.0
        while self.server.command("EXISTS", "imapproxy:throttle:smtp:bob"):
            self.assertLess(reactor.seconds(), deadline, "the throttle key outlived its TTL")
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield store.getThrottles([("bob", "smtp")], NOW)), [None])

    @inlineCallbacks
    def test_noSecretStored(self):
        """The key and value hold the account, protocol, reason and times, nothing else."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.setThrottle("alice", "imap", "throttled-backoff", NOW, NOW + 30.0, 60.0)
        keys = [k for k in self.server.dump() if "throttle" in k]
        self.assertEqual(keys, ["imapproxy:throttle:imap:alice"])
        value = self.server.command("GET", keys[0])
        value = value.decode() if isinstance(value, bytes) else value
        self.assertEqual(value, f"throttled-backoff {NOW!r} {NOW + 30.0!r}")
        for secret in (ACCESS, REFRESH, CLIENT_SECRET, APP_SECRET, VERIFIER):
            self.assertNotIn(secret, keys[0] + value)
