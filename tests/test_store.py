"""
Tests for the stores: one contract every implementation must meet
(``StoreContractMixin``), run here against ``SQLiteStore`` on a real temporary
file, plus what is particular to SQLite (encryption at rest, the key check).
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import stat
import tempfile

import attrs
from cryptography.fernet import Fernet
from twisted._threads import AlreadyQuit
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy.encryption import Secrets
from proxy.model import Account, OAuth2Grant, Token, Upstream
from proxy.store import IAccountStore, ITokenStore, SQLiteStore, StoreError

REFRESH = "rt-plaintext-3f9a1c7e5d"
CLIENT_SECRET = "cs-plaintext-8b2e4d6f0a"


def account(aid: str = "alice", **kw) -> Account:
    fields = dict(
        id=aid,
        email=f"{aid}@example.com",
        upstream=Upstream(host="imap.example.com", port=993, tls="implicit", caFile=None),
        oauth2=OAuth2Grant(
            tokenURL="https://oauth.example.com/token",
            clientId="client-1",
            clientSecret=CLIENT_SECRET,
            refreshToken=REFRESH,
            scopes=("https://mail.example.com/",),
        ),
    )
    fields.update(kw)
    return Account(**fields)


def token(tid: str, acct: str | None = "alice", created: float = 1000.0, **kw) -> Token:
    fields = dict(
        id=tid,
        account=acct,
        scopes=("imap-proxy",),
        description=f"token {tid}",
        addresses=("10.0.0.0/8",),
        created=created,
        expires=None,
    )
    fields.update(kw)
    return Token(**fields)


class StoreContractMixin:
    """
    The behaviour every ``IAccountStore``/``ITokenStore`` shares. A subclass
    (also a trial ``TestCase``) defines ``openStore()``: a Deferred firing with
    a fresh, open, empty store that is closed again at cleanup.
    """

    def openStore(self):
        raise NotImplementedError

    @inlineCallbacks
    def test_interfaces(self):
        """The store provides both store interfaces."""
        store = yield self.openStore()
        self.assertTrue(IAccountStore.providedBy(store))
        self.assertTrue(ITokenStore.providedBy(store))

    @inlineCallbacks
    def test_getAccountMissing(self):
        """An unknown account id gives None."""
        store = yield self.openStore()
        self.assertIsNone((yield store.getAccount("nobody")))

    @inlineCallbacks
    def test_putGetAccount(self):
        """An account comes back as it was put, secrets decrypted, times set."""
        store = yield self.openStore()
        a = account(
            upstream=Upstream(host="h", port=143, tls="starttls", caFile="/ca.pem"),
            state="reauth-required",
            stateReason="invalid-grant",
        )
        yield store.putAccount(a)
        got = yield store.getAccount("alice")
        self.assertGreater(got.created, 0)
        self.assertGreater(got.updated, 0)
        self.assertEqual(got, attrs.evolve(a, created=got.created, updated=got.updated))
        self.assertEqual(got.oauth2.refreshToken, REFRESH)
        self.assertEqual(got.oauth2.clientSecret, CLIENT_SECRET)

    @inlineCallbacks
    def test_putAccountReplaces(self):
        """Putting an existing id replaces its fields and keeps its creation time."""
        store = yield self.openStore()
        yield store.putAccount(account(created=123.0))
        yield store.putAccount(account(email="new@example.com", state="disabled"))
        got = yield store.getAccount("alice")
        self.assertEqual(got.email, "new@example.com")
        self.assertEqual(got.state, "disabled")
        self.assertEqual(got.created, 123.0)
        self.assertEqual(len((yield store.listAccounts())), 1)

    @inlineCallbacks
    def test_listAccounts(self):
        """listAccounts gives every account, by id."""
        store = yield self.openStore()
        self.assertEqual((yield store.listAccounts()), [])
        for aid in ("carol", "alice", "bob"):
            yield store.putAccount(account(aid))
        got = yield store.listAccounts()
        self.assertEqual([a.id for a in got], ["alice", "bob", "carol"])
        self.assertEqual({a.oauth2.refreshToken for a in got}, {REFRESH})

    @inlineCallbacks
    def test_removeAccount(self):
        """removeAccount deletes the account and says whether it existed."""
        store = yield self.openStore()
        yield store.putAccount(account())
        self.assertTrue((yield store.removeAccount("alice")))
        self.assertIsNone((yield store.getAccount("alice")))
        self.assertFalse((yield store.removeAccount("alice")))

    @inlineCallbacks
    def test_removeAccountRemovesItsTokens(self):
        """Removing an account removes its tokens and no one else's."""
        store = yield self.openStore()
        yield store.putAccount(account("alice"))
        yield store.putAccount(account("bob"))
        yield store.addToken(token("t1", "alice"))
        yield store.addToken(token("t2", "alice"))
        yield store.addToken(token("t3", "bob"))
        yield store.addToken(token("t4", None))
        yield store.removeAccount("alice")
        self.assertIsNone((yield store.getToken("t1")))
        self.assertIsNone((yield store.getToken("t2")))
        left = yield store.listTokens()
        self.assertEqual(sorted(t.id for t in left), ["t3", "t4"])

    @inlineCallbacks
    def test_setRefreshToken(self):
        """setRefreshToken replaces only the refresh token."""
        store = yield self.openStore()
        yield store.putAccount(account())
        before = yield store.getAccount("alice")
        yield store.setRefreshToken("alice", "rt-rotated")
        after = yield store.getAccount("alice")
        self.assertEqual(after.oauth2.refreshToken, "rt-rotated")
        self.assertEqual(after.oauth2.clientSecret, CLIENT_SECRET)
        self.assertEqual(
            attrs.evolve(after, updated=0, oauth2=before.oauth2), attrs.evolve(before, updated=0)
        )

    @inlineCallbacks
    def test_addGetToken(self):
        """A token record comes back as it was added."""
        store = yield self.openStore()
        t = token(
            "t1",
            scopes=("imap-proxy", "api"),
            addresses=("10.0.0.0/8", "2001:db8::/32"),
            expires=5000.5,
        )
        yield store.addToken(t)
        self.assertEqual((yield store.getToken("t1")), t)

    @inlineCallbacks
    def test_rootToken(self):
        """A token without an account (root) is stored with account None."""
        store = yield self.openStore()
        yield store.addToken(token("root", None, scopes=("*",), addresses=()))
        got = yield store.getToken("root")
        self.assertIsNone(got.account)
        self.assertEqual(got.scopes, ("*",))
        self.assertEqual(got.addresses, ())

    @inlineCallbacks
    def test_getTokenMissing(self):
        """An unknown token id gives None."""
        store = yield self.openStore()
        self.assertIsNone((yield store.getToken("nope")))

    @inlineCallbacks
    def test_listTokens(self):
        """listTokens gives tokens newest first, optionally one account's only."""
        store = yield self.openStore()
        yield store.addToken(token("old", "alice", created=1.0))
        yield store.addToken(token("new", "alice", created=3.0))
        yield store.addToken(token("bob", "bob", created=2.0))
        self.assertEqual([t.id for t in (yield store.listTokens())], ["new", "bob", "old"])
        self.assertEqual([t.id for t in (yield store.listTokens("alice"))], ["new", "old"])
        self.assertEqual((yield store.listTokens("carol")), [])

    @inlineCallbacks
    def test_removeToken(self):
        """removeToken deletes the token and says whether it existed."""
        store = yield self.openStore()
        yield store.addToken(token("t1"))
        self.assertTrue((yield store.removeToken("t1")))
        self.assertIsNone((yield store.getToken("t1")))
        self.assertFalse((yield store.removeToken("t1")))

    @inlineCallbacks
    def test_touchToken(self):
        """touchToken records the last use time and address."""
        store = yield self.openStore()
        yield store.addToken(token("t1"))
        yield store.touchToken("t1", 4242.0, "192.0.2.7")
        got = yield store.getToken("t1")
        self.assertEqual((got.lastUseTime, got.lastUseAddress), (4242.0, "192.0.2.7"))
        self.assertEqual(attrs.evolve(got, lastUseTime=None, lastUseAddress=None), token("t1"))


class SQLiteStoreTests(StoreContractMixin, TestCase):
    def setUp(self):
        # Not self.mktemp(): under pytest that writes into the working tree.
        # Registered first, so it runs after every store is closed.
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "state", "imapproxy.sqlite3")
        self.key = Fernet.generate_key()

    def newStore(self, keys=None) -> SQLiteStore:
        store = SQLiteStore(self.path, Secrets(keys or [self.key]))
        self.addCleanup(self.closeOnce, store)
        return store

    @staticmethod
    def closeOnce(store: SQLiteStore):
        # Tests that close a store themselves must not have it closed again
        # here: a second close() is tested on its own (test_closeTwice).
        if store._pool.joined:
            return None
        try:
            return store.close()
        except AlreadyQuit:
            # test_closeTwice / test_useAfterClose have already failed on this.
            return None

    def openStore(self):
        store = self.newStore()
        return store.open().addCallback(lambda _: store)

    def rawBytes(self) -> bytes:
        data = b""
        for name in glob.glob(self.path + "*"):
            with open(name, "rb") as f:
                data += f.read()
        return data

    @inlineCallbacks
    def test_lastUsesAreWrittenTogetherAndSurviveAClose(self):
        """A burst of uses is one later write: seen at once by reads, on disk after close."""
        store = yield self.openStore()
        for n in range(3):
            yield store.addToken(token(f"{n:064x}"))
        written: list[int] = []
        real = store._run

        def counting(f, *args):
            written.append(1)
            return real(f, *args)

        store._run = counting
        for n in range(3):
            yield store.touchToken(f"{n:064x}", 1000.0 + n, f"192.0.2.{n}")
        self.assertEqual(written, [], "a use is not written in the login's way")
        seen = yield store.getToken(f"{2:064x}")
        self.assertEqual((seen.lastUseTime, seen.lastUseAddress), (1002.0, "192.0.2.2"))
        listed = yield store.listTokens()
        self.assertEqual(sorted(t.lastUseTime for t in listed), [1000.0, 1001.0, 1002.0])
        written.clear()
        yield store.close()
        self.assertEqual(len(written), 2, "one write for all three uses, then the close")
        again = yield self.openStore()
        stored = yield again.getToken(f"{1:064x}")
        self.assertEqual((stored.lastUseTime, stored.lastUseAddress), (1001.0, "192.0.2.1"))

    @inlineCallbacks
    def test_fileCreatedPrivate(self):
        """open() creates the directory and a database file readable only by its owner."""
        yield self.openStore()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(os.path.isdir(os.path.dirname(self.path)))

    @inlineCallbacks
    def test_secretsEncryptedAtRest(self):
        """Neither the refresh token nor the client secret is stored in plaintext."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.setRefreshToken("alice", REFRESH + "-rotated")
        with sqlite3.connect(self.path) as db:
            rows = db.execute("SELECT * FROM accounts").fetchall()
        db.close()
        self.assertEqual(len(rows), 1)
        flat = repr(rows)
        self.assertIn("client-1", flat)  # the row is there, readable...
        self.assertNotIn(REFRESH, flat)  # ...but not its secrets
        self.assertNotIn(CLIENT_SECRET, flat)
        yield store.close()
        raw = self.rawBytes()
        self.assertIn(b"imap.example.com", raw)
        self.assertNotIn(REFRESH.encode(), raw)
        self.assertNotIn(CLIENT_SECRET.encode(), raw)

    @inlineCallbacks
    def test_persists(self):
        """Data survives closing and reopening the store with the same key."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.addToken(token("t1"))
        yield store.close()
        again = self.newStore()
        yield again.open()
        self.assertEqual((yield again.getAccount("alice")).oauth2.refreshToken, REFRESH)
        self.assertEqual((yield again.getToken("t1")), token("t1"))

    @inlineCallbacks
    def test_wrongKeyRefused(self):
        """A store reopened with a different key refuses to open with StoreError."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        other = self.newStore([Fernet.generate_key()])
        e = yield self.assertFailure(other.open(), StoreError)
        self.assertIn("secret key does not match", str(e))
        self.assertNotIn(self.key.decode(), str(e))
        # Refused means not open, not half-open.
        yield self.assertFailure(other.getAccount("alice"), StoreError)

    @inlineCallbacks
    def test_rotatedKeys(self):
        """A store reopened with keys [new, old] opens and reads old secrets."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        rotated = self.newStore([Fernet.generate_key(), self.key])
        yield rotated.open()
        got = yield rotated.getAccount("alice")
        self.assertEqual(got.oauth2.clientSecret, CLIENT_SECRET)

    @inlineCallbacks
    def test_notOpen(self):
        """A store used before open() errbacks with StoreError."""
        store = self.newStore()
        yield self.assertFailure(store.listAccounts(), StoreError)

    @inlineCallbacks
    def test_unopenablePath(self):
        """A path that cannot be a database errbacks open() with StoreError."""
        os.makedirs(self.path)  # a directory where the file should be
        store = self.newStore()
        yield self.assertFailure(store.open(), StoreError)

    @inlineCallbacks
    def test_closeStopsPool(self):
        """close() stops the store's thread pool."""
        store = yield self.openStore()
        self.assertTrue(store._pool.started)
        yield store.close()
        self.assertFalse(store._pool.started)

    @inlineCallbacks
    def test_closeTwice(self):
        """A second close() is harmless (stopService after an explicit close)."""
        store = yield self.openStore()
        yield store.close()
        yield store.close()
        self.assertFalse(store._pool.started)

    @inlineCallbacks
    def test_useAfterClose(self):
        """A store used after close() errbacks with StoreError, it does not raise."""
        store = yield self.openStore()
        yield store.close()
        try:
            d = store.getAccount("alice")
        except Exception as e:
            self.fail(f"getAccount after close raised {e!r} instead of failing its Deferred")
        yield self.assertFailure(d, StoreError)


class MissingKeyTests(SynchronousTestCase):
    def test_existingStoreWithoutKeyRefuses(self):
        """An existing store whose default key file is gone refuses to open and makes no key."""
        from proxy.store import makeStore

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        url = "sqlite://" + os.path.join(d, "s.sqlite3")
        store = makeStore(url, None)
        store.openBlocking()
        store._closeBlocking()
        os.unlink(os.path.join(d, "secret.key"))
        with self.assertRaises(StoreError) as e:
            makeStore(url, None)
        self.assertIn("key file", str(e.exception))
        self.assertFalse(os.path.exists(os.path.join(d, "secret.key")))


# --- Regression tests moved from test_review_regressions.py (each docstring
# says what was wrong; every test failed before its fix). ---


class StoreCopyOverwriteTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-review-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    @inlineCallbacks
    def openStore(self, name):
        store = SQLiteStore(
            os.path.join(self.dir, name, "s.sqlite3"), Secrets([Fernet.generate_key()])
        )
        yield store.open()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_overwriteReplacesTokensWithTheSameIds(self):
        """
        proxy/store/copy.py copyStore(overwrite=True) is documented as
        "replacing records with the same ids", but it calls
        ``target.addToken``, which refuses an existing id (SQLite: UNIQUE
        constraint; Redis: StoreError "a token with this id exists").

        Expected: copying again with --overwrite (e.g. re-running an
        interrupted copy, or refreshing the target) succeeds.
        Actual: it fails on the first token already there, after apps and
        accounts were rewritten, leaving a partial copy.
        """
        from twisted.internet.defer import Deferred

        from proxy.store.copy import copyStore

        source = yield self.openStore("from")
        target = yield self.openStore("to")
        yield source.putAccount(account("alice"))
        yield source.addToken(token("t1"))
        first = yield Deferred.fromCoroutine(copyStore(source, target))
        self.assertEqual(first.tokens, 1)
        again = yield Deferred.fromCoroutine(copyStore(source, target, overwrite=True))
        self.assertEqual(again.tokens, 1)
