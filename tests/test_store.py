"""
Tests for the stores: one contract every implementation must meet
(``StoreContractMixin``: every method of ``IStore``), run here against
``SQLiteStore`` on a real temporary file and against ``MemoryStore``, and in
``tests/test_store_redis.py`` against ``RedisStore`` on a real redis-server;
plus what is particular to SQLite (encryption at rest, the key check).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from typing import Any

import attrs
from cryptography.fernet import Fernet
from twisted._threads import AlreadyQuit
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from proxy.encryption import SecretKeyError, Secrets, loadSecrets, writeKeyFile
from proxy.model import (
    Account,
    OAuth2App,
    OAuth2Grant,
    PendingAuthorization,
    Restrictions,
    Token,
    Upstream,
)
from proxy.store import (
    IAccessTokenStore,
    IAccountStore,
    IAppStore,
    IPendingStore,
    ISecretStore,
    IStore,
    ITokenStore,
    MemoryData,
    MemoryStore,
    SQLiteStore,
    StoreDataLost,
    StoreError,
    StoreUnavailable,
)
from proxy.store._sqlitedb import MIGRATIONS, _transaction, connect

REFRESH = "rt-plaintext-3f9a1c7e5d"
CLIENT_SECRET = "cs-plaintext-8b2e4d6f0a"
ACCESS = "at-plaintext-5c1d9e2b7f"
APP_SECRET = "app-plaintext-0e6a4c8d2b"
VERIFIER = "pkce-plaintext-7d3f1b9a5e"


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


def app(aid: str = "mail-app", **kw) -> OAuth2App:
    fields = dict(
        id=aid,
        provider="generic",
        clientId="shared-client",
        clientSecret=APP_SECRET,
        redirectURL="https://proxy.example.com/oauth2/callback",
        authorizationURL="https://oauth.example.com/authorize",
        tokenURL="https://oauth.example.com/app-token",
        deviceURL=None,
        scopes=("openid", "https://mail.example.com/"),
        tenant="common",
        created=100.0,
    )
    fields.update(kw)
    return OAuth2App(**fields)


def sharedAccount(aid: str = "bob", appId: str = "mail-app") -> Account:
    return account(
        aid,
        oauth2=OAuth2Grant(
            tokenURL="", clientId="", clientSecret="", refreshToken=REFRESH, app=appId
        ),
    )


def pending(state: str = "state-1", **kw) -> PendingAuthorization:
    fields = dict(
        state=state,
        account="alice",
        app="mail-app",
        verifier=VERIFIER,
        email=None,
        expires=time.time() + 600,
        imap=json.dumps({"host": "imap.example.com"}),
    )
    fields.update(kw)
    return PendingAuthorization(**fields)


class StoreContractMixin:
    """
    The behaviour every ``IStore`` shares. A subclass (also a trial
    ``TestCase``) sets ``self.key`` and defines ``newStore(secrets=None)``: a
    new store object, not yet opened, over the same data as the others of
    the test (empty at the start of each test; keyed ``self.key`` unless
    ``secrets`` is given), closed again at cleanup; and ``loseData()``: empty
    the store behind its back, as a Redis restarted without persistence is.
    """

    key: bytes

    def newStore(self, secrets: Secrets | None = None):
        raise NotImplementedError

    def loseData(self) -> None:
        raise NotImplementedError

    def openStore(self, secrets: Secrets | None = None):
        store = self.newStore(secrets)
        return store.open().addCallback(lambda _: store)

    @inlineCallbacks
    def test_interfaces(self):
        """The store provides every store interface, with every method and attribute."""
        store = yield self.openStore()
        for interface in (
            IStore,
            IAccountStore,
            IAccessTokenStore,
            ITokenStore,
            IAppStore,
            IPendingStore,
            ISecretStore,
        ):
            self.assertTrue(verifyObject(interface, store), interface)

    # -- life cycle -----------------------------------------------------------

    @inlineCallbacks
    def test_notOpen(self):
        """A store used before it is opened errbacks with StoreError."""
        store = self.newStore()
        yield self.assertFailure(store.listAccounts(), StoreError)
        yield self.assertFailure(store.checkHealth(), StoreError)

    @inlineCallbacks
    def test_useAfterClose(self):
        """After close() every use errbacks with StoreError (it does not raise); twice is fine."""
        store = yield self.openStore()
        yield store.close()
        yield store.close()
        try:
            d = store.getToken("t1")
        except Exception as e:
            self.fail(f"getToken after close raised {e!r} instead of failing its Deferred")
        e = yield self.assertFailure(d, StoreError)
        self.assertEqual(str(e), "the store is closed")

    @inlineCallbacks
    def test_openBlockingAndCloseBlocking(self):
        """openBlocking opens before the reactor; closeBlocking undoes it until open() again."""
        first = self.newStore()
        first.openBlocking()
        yield first.putAccount(account())
        self.assertEqual((yield first.getAccount("alice")).oauth2.refreshToken, REFRESH)
        # As twistd does: check the store before the reactor runs, then let
        # the service open it.
        store = self.newStore()
        store.openBlocking()
        store.closeBlocking()
        yield self.assertFailure(store.getAccount("alice"), StoreError)
        yield store.open()
        self.assertEqual([a.id for a in (yield store.listAccounts())], ["alice"])

    @inlineCallbacks
    def test_wrongKeyRefused(self):
        """A store opened with another key refuses to open, saying so but not the key."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        other = self.newStore(Secrets([Fernet.generate_key()]))
        e = yield self.assertFailure(other.open(), StoreError)
        self.assertIn("secret key does not match", str(e))
        self.assertNotIn(self.key.decode(), str(e))
        # Refused means not open, not half-open.
        yield self.assertFailure(other.getAccount("alice"), StoreError)
        e = self.assertRaises(
            StoreError, self.newStore(Secrets([Fernet.generate_key()])).openBlocking
        )
        self.assertIn("secret key does not match", str(e))

    # -- health: the marker written when the store was created --------------------

    @inlineCallbacks
    def test_healthy(self):
        """An open store that holds its data is healthy, and stays so when reopened."""
        store = yield self.openStore()
        self.assertIsNone((yield store.checkHealth()))
        again = yield self.openStore()
        self.assertIsNone((yield again.checkHealth()))
        self.assertIsNone((yield store.checkHealth()))

    @inlineCallbacks
    def test_dataLost(self):
        """A store emptied behind its back is unhealthy (data lost) and refuses token reads."""
        store = yield self.openStore()
        yield store.addToken(token("t1"))
        self.loseData()
        e = yield self.assertFailure(store.checkHealth(), StoreDataLost)
        self.assertIsInstance(e, StoreUnavailable)
        self.assertTrue(str(e).startswith("data lost: marker missing"), str(e))
        # A login is refused as unavailable, not as an unknown token.
        e = yield self.assertFailure(store.getToken("t1"), StoreDataLost)
        self.assertIn("marker missing", str(e))

    @inlineCallbacks
    def test_dataLostLoggedOnce(self):
        """The loss is logged once however often it is seen, with its reason."""
        store = yield self.openStore()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.loseData()
        for _ in range(3):
            yield self.assertFailure(store.checkHealth(), StoreDataLost)
            yield self.assertFailure(store.getToken("t1"), StoreDataLost)
        lost = [e for e in events if "lost its data" in e.get("log_format", "")]
        self.assertEqual(len(lost), 1, lost)
        self.assertIn("marker missing", lost[0]["why"])

    @inlineCallbacks
    def test_recreatedStoreIsAnother(self):
        """A store created again on the emptied data is healthy; the old one sees another marker."""
        store = yield self.openStore()
        self.loseData()
        fresh = yield self.openStore()
        self.assertIsNone((yield fresh.checkHealth()))
        e = yield self.assertFailure(store.checkHealth(), StoreDataLost)
        self.assertIn("marker changed", str(e))

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
    def test_connectionCapsRoundTrip(self):
        """An account's connection caps (IMAP, SMTP; 0 and None alike) come back as put."""
        store = yield self.openStore()
        imap = Upstream(host="imap.example.com", maxConnections=15)
        smtp = Upstream(host="smtp.example.com", port=587, tls="starttls", maxConnections=0)
        yield store.putAccount(account(upstream=imap, smtp=smtp))
        got = yield store.getAccount("alice")
        self.assertEqual((got.upstream, got.smtp), (imap, smtp))
        yield store.putAccount(account())
        got = (yield store.listAccounts())[0]
        self.assertIsNone(got.upstream.maxConnections)

    @inlineCallbacks
    def test_smtpServerRoundTrips(self):
        """An account's SMTP server comes back as put; putting it without one removes it."""
        store = yield self.openStore()
        smtp = Upstream(host="smtp.example.com", port=587, tls="starttls", caFile="/ca/smtp.pem")
        yield store.putAccount(account(smtp=smtp))
        yield store.putAccount(account("bob", smtp=Upstream(host="smtp.example.org", port=465)))
        self.assertEqual((yield store.getAccount("alice")).smtp, smtp)
        listed = {a.id: a.smtp for a in (yield store.listAccounts())}
        self.assertEqual(listed["bob"], Upstream(host="smtp.example.org", port=465))
        yield store.putAccount(account())
        got = yield store.getAccount("alice")
        self.assertIsNone(got.smtp)
        self.assertEqual(got.upstream, account().upstream)

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
    def test_tokenRestrictions(self):
        """A token's IMAP restrictions come back as added; an unrestricted token's are None."""
        store = yield self.openStore()
        limited = token(
            "t1", restrictions=Restrictions(readOnly=True, mailboxes=("INBOX", "Archiv/&AOQ-*"))
        )
        yield store.addToken(limited)
        yield store.addToken(token("t2", restrictions=Restrictions(mailboxes=("Work/%",))))
        yield store.addToken(token("t3"))
        self.assertEqual((yield store.getToken("t1")), limited)
        self.assertEqual(
            (yield store.getToken("t2")).restrictions, Restrictions(mailboxes=("Work/%",))
        )
        self.assertIsNone((yield store.getToken("t3")).restrictions)
        listed = {t.id: t.restrictions for t in (yield store.listTokens("alice"))}
        self.assertEqual(listed["t1"], limited.restrictions)

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

    @inlineCallbacks
    def test_accessToken(self):
        """A saved access token comes back decrypted with its expiry and lifetime."""
        store = yield self.openStore()
        yield store.putAccount(account())
        self.assertIsNone((yield store.getAccessToken("alice")))
        yield store.saveAccessToken("alice", ACCESS, 5000.25, 3600.0)
        self.assertEqual((yield store.getAccessToken("alice")), (ACCESS, 5000.25, 3600.0))
        yield store.saveAccessToken("alice", None, None, None)
        self.assertIsNone((yield store.getAccessToken("alice")))

    @inlineCallbacks
    def test_putAccountDropsAccessToken(self):
        """Replacing an account drops its saved access token."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.saveAccessToken("alice", ACCESS, 5000.0, 3600.0)
        yield store.putAccount(account(email="moved@example.com"))
        self.assertIsNone((yield store.getAccessToken("alice")))

    @inlineCallbacks
    def test_updatesOfMissingAccount(self):
        """Updating an account that does not exist changes nothing and creates nothing."""
        store = yield self.openStore()
        yield store.setRefreshToken("ghost", "rt")
        self.assertIsNone((yield store.setAccountState("ghost", "disabled", "why")))
        yield store.saveAccessToken("ghost", ACCESS, 5000.0, 3600.0)
        self.assertIsNone((yield store.getAccount("ghost")))
        self.assertIsNone((yield store.getAccessToken("ghost")))
        self.assertEqual((yield store.listAccounts()), [])

    @inlineCallbacks
    def test_setAccountState(self):
        """setAccountState sets the state and its reason (None clears it), not the grant."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.setAccountState("alice", "reauth-required", "invalid-grant")
        got = yield store.getAccount("alice")
        self.assertEqual((got.state, got.stateReason), ("reauth-required", "invalid-grant"))
        self.assertEqual(got.oauth2.refreshToken, REFRESH)
        yield store.setAccountState("alice", "ok", None)
        got = yield store.getAccount("alice")
        self.assertEqual((got.state, got.stateReason), ("ok", None))

    @inlineCallbacks
    def test_setAccountStateAnswersTheStateItReplaced(self):
        """
        setAccountState answers the state before it, so that of two callers
        setting the same state only one sees a change (one webhook event).
        """
        store = yield self.openStore()
        yield store.putAccount(account())
        first = yield store.setAccountState("alice", "reauth-required", "invalid-grant (1)")
        second = yield store.setAccountState("alice", "reauth-required", "invalid-grant (2)")
        self.assertEqual((first, second), ("ok", "reauth-required"))
        got = yield store.getAccount("alice")
        self.assertEqual(got.stateReason, "invalid-grant (2)")
        self.assertEqual(
            (yield store.setAccountState("alice", "disabled", None)), "reauth-required"
        )

    @inlineCallbacks
    def test_textStaysText(self):
        """Values that look like numbers come back as the strings they were."""
        store = yield self.openStore()
        yield store.putAccount(account("123", email="1e5@example.com"))
        yield store.addToken(token("t1", "123", description="0042", addresses=()))
        got = yield store.getAccount("123")
        self.assertEqual((got.id, got.email), ("123", "1e5@example.com"))
        t = yield store.getToken("t1")
        self.assertEqual((t.account, t.description), ("123", "0042"))
        self.assertEqual([t.id for t in (yield store.listTokens("123"))], ["t1"])

    @inlineCallbacks
    def test_unicode(self):
        """Non-ASCII text round-trips."""
        store = yield self.openStore()
        yield store.addToken(token("t1", description="Bürø ✓ 日本"))
        self.assertEqual((yield store.getToken("t1")).description, "Bürø ✓ 日本")

    @inlineCallbacks
    def test_touchMissingToken(self):
        """Touching a token that does not exist creates nothing."""
        store = yield self.openStore()
        yield store.touchToken("nope", 1.0, "192.0.2.1")
        self.assertIsNone((yield store.getToken("nope")))
        self.assertEqual((yield store.listTokens()), [])

    @inlineCallbacks
    def test_listTokensTies(self):
        """Tokens created at the same time are listed by id."""
        store = yield self.openStore()
        for tid in ("b", "c", "a"):
            yield store.addToken(token(tid, created=5.0))
        yield store.addToken(token("z", created=1.0))
        self.assertEqual([t.id for t in (yield store.listTokens())], ["a", "b", "c", "z"])

    @inlineCallbacks
    def test_addTokenTwice(self):
        """Adding a token id that exists fails and keeps the first record."""
        store = yield self.openStore()
        yield store.addToken(token("t1", description="first"))
        yield self.assertFailure(store.addToken(token("t1", description="second")), Exception)
        self.assertEqual((yield store.getToken("t1")).description, "first")

    @inlineCallbacks
    def test_removeAccountKeepsOtherTokens(self):
        """Removing an unknown account says so and leaves every token alone."""
        store = yield self.openStore()
        yield store.addToken(token("t1", "bob"))
        self.assertFalse((yield store.removeAccount("alice")))
        self.assertEqual([t.id for t in (yield store.listTokens())], ["t1"])

    # -- OAuth2 apps -----------------------------------------------------------

    @inlineCallbacks
    def test_putGetApp(self):
        """An app comes back as it was put, its client secret decrypted."""
        store = yield self.openStore()
        self.assertIsNone((yield store.getApp("mail-app")))
        a = app()
        yield store.putApp(a)
        got = yield store.getApp("mail-app")
        self.assertGreater(got.updated, 0)
        self.assertEqual(got, attrs.evolve(a, updated=got.updated))

    @inlineCallbacks
    def test_putAppReplaces(self):
        """Putting an app again replaces all of it, its creation time too."""
        store = yield self.openStore()
        yield store.putApp(app(created=5.0, deviceURL="https://oauth.example.com/device"))
        yield store.putApp(app(created=7.0, clientSecret="new", deviceURL=None))
        got = yield store.getApp("mail-app")
        self.assertEqual((got.created, got.clientSecret, got.deviceURL), (7.0, "new", None))
        self.assertEqual(len((yield store.listApps())), 1)

    @inlineCallbacks
    def test_listApps(self):
        """listApps gives every app, by id."""
        store = yield self.openStore()
        self.assertEqual((yield store.listApps()), [])
        for aid in ("zeta", "alpha", "mid"):
            yield store.putApp(app(aid))
        self.assertEqual([a.id for a in (yield store.listApps())], ["alpha", "mid", "zeta"])

    @inlineCallbacks
    def test_removeApp(self):
        """removeApp deletes an unused app and says whether it existed."""
        store = yield self.openStore()
        yield store.putApp(app())
        self.assertTrue((yield store.removeApp("mail-app")))
        self.assertIsNone((yield store.getApp("mail-app")))
        self.assertFalse((yield store.removeApp("mail-app")))

    @inlineCallbacks
    def test_removeAppInUse(self):
        """An app cannot be removed while an account uses it, and can once it is gone."""
        store = yield self.openStore()
        yield store.putApp(app())
        yield store.putAccount(sharedAccount("bob"))
        yield store.putAccount(sharedAccount("carol"))
        e = yield self.assertFailure(store.removeApp("mail-app"), StoreError)
        self.assertIn("2 account(s) use this app", str(e))
        yield store.removeAccount("bob")
        yield store.putAccount(account("carol"))  # carol leaves the app
        self.assertTrue((yield store.removeApp("mail-app")))

    @inlineCallbacks
    def test_sharedAppAccount(self):
        """An account of a shared app takes its client side from the app, as it changes."""
        store = yield self.openStore()
        yield store.putApp(app())
        yield store.putAccount(sharedAccount("bob"))
        got = yield store.getAccount("bob")
        self.assertEqual(
            got.oauth2,
            OAuth2Grant(
                tokenURL="https://oauth.example.com/app-token",
                clientId="shared-client",
                clientSecret=APP_SECRET,
                refreshToken=REFRESH,
                scopes=("openid", "https://mail.example.com/"),
                app="mail-app",
            ),
        )
        yield store.putApp(app(clientSecret="rotated-app-secret"))
        listed = yield store.listAccounts()
        self.assertEqual(listed[0].oauth2.clientSecret, "rotated-app-secret")

    @inlineCallbacks
    def test_accountOfMissingApp(self):
        """An account naming an app that does not exist falls back to its own fields."""
        store = yield self.openStore()
        yield store.putAccount(sharedAccount("bob", "no-such-app"))
        got = yield store.getAccount("bob")
        self.assertEqual(
            got.oauth2,
            OAuth2Grant(tokenURL="", clientId="", clientSecret="", refreshToken=REFRESH),
        )

    # -- authorizations in progress -------------------------------------------

    @inlineCallbacks
    def test_pendingSingleUse(self):
        """A pending authorization can be taken once, as it was added."""
        store = yield self.openStore()
        p = pending(email="a@example.com")
        yield store.addPending(p)
        self.assertEqual((yield store.takePending("state-1")), p)
        self.assertIsNone((yield store.takePending("state-1")))
        self.assertIsNone((yield store.takePending("unknown")))

    @inlineCallbacks
    def test_pendingKeepsSMTPSettings(self):
        """A consent in progress keeps the SMTP settings it was given (none: None)."""
        store = yield self.openStore()
        p = pending(smtp=json.dumps({"host": "smtp.example.com", "port": 2465}))
        yield store.addPending(p)
        yield store.addPending(pending("state-2"))
        self.assertEqual((yield store.takePending("state-1")), p)
        self.assertIsNone((yield store.takePending("state-2")).smtp)

    @inlineCallbacks
    def test_pendingTakenOnceUnderConcurrency(self):
        """Of two takes of the same authorization at once, exactly one gets it."""
        store = yield self.openStore()
        yield store.addPending(pending(imap=None))
        results = yield gatherResults([store.takePending("state-1") for _ in range(2)])
        self.assertEqual(sorted(r is None for r in results), [False, True])

    # -- secret keys ----------------------------------------------------------

    @inlineCallbacks
    def fillWithSecrets(self, store):
        """One of each encrypted value: 8 ciphertexts with the key check."""
        yield store.putAccount(account("alice"))
        yield store.saveAccessToken("alice", ACCESS, 5000.0, 3600.0)
        yield store.putApp(app())
        yield store.putAccount(sharedAccount("bob"))
        yield store.addPending(pending())

    @inlineCallbacks
    def assertAllReadable(self, store):
        self.assertEqual((yield store.getAccount("alice")).oauth2.clientSecret, CLIENT_SECRET)
        self.assertEqual((yield store.getAccount("bob")).oauth2.clientSecret, APP_SECRET)
        self.assertEqual((yield store.getAccessToken("alice"))[0], ACCESS)
        self.assertEqual((yield store.takePending("state-1")).verifier, VERIFIER)

    @inlineCallbacks
    def test_rotateSecrets(self):
        """rotateSecrets re-encrypts every secret under the newest key, which then suffices."""
        store = yield self.openStore()
        yield self.fillWithSecrets(store)
        yield store.close()
        new = Fernet.generate_key()
        both = yield self.openStore(Secrets([new, self.key]))
        self.assertEqual((yield both.undecryptable(Secrets([new]))), 8)
        self.assertEqual((yield both.rotateSecrets()), 8)
        self.assertEqual((yield both.undecryptable(Secrets([new]))), 0)
        self.assertEqual((yield both.undecryptable(Secrets([self.key]))), 8)
        yield both.close()
        newOnly = yield self.openStore(Secrets([new]))
        yield self.assertAllReadable(newOnly)

    @inlineCallbacks
    def test_rotateRefusesUndecryptable(self):
        """A secret no key can decrypt makes rotation fail and change nothing."""
        other = Fernet.generate_key()
        store = yield self.openStore()
        yield store.close()
        # Written under a key the next store will not have.
        writer = yield self.openStore(Secrets([other, self.key]))
        yield writer.putAccount(account())
        yield writer.close()
        store = yield self.openStore()
        self.assertEqual((yield store.undecryptable(store.secrets)), 2)
        yield self.assertFailure(store.rotateSecrets(), SecretKeyError)
        self.assertEqual((yield store.undecryptable(Secrets([other]))), 1)

    @inlineCallbacks
    def test_reloadSecrets(self):
        """reloadSecrets picks up keys added to the key file, and says whether they changed."""
        keyDir = tempfile.mkdtemp(prefix="imapproxy-test-keys-")
        self.addCleanup(shutil.rmtree, keyDir, True)
        path = os.path.join(keyDir, "secret.key")
        writeKeyFile(path, [self.key])
        store = yield self.openStore(loadSecrets(path, None))
        self.assertFalse((yield store.reloadSecrets()))
        new = Fernet.generate_key()
        writeKeyFile(path, [new, self.key])
        self.assertTrue((yield store.reloadSecrets()))
        self.assertEqual(store.secrets.keys, [new, self.key])


class MemoryStoreTests(StoreContractMixin, TestCase):
    """The contract against the in-memory store."""

    def setUp(self):
        self.data = MemoryData()
        self.key = Fernet.generate_key()

    def newStore(self, secrets: Secrets | None = None) -> MemoryStore:
        store = MemoryStore(secrets or Secrets([self.key]), data=self.data)
        self.addCleanup(store.close)
        return store

    def loseData(self) -> None:
        self.data.wipe()

    @inlineCallbacks
    def test_service(self):
        """As a service the store opens on start and closes on stop."""
        store = self.newStore()
        store.startService()
        yield store.putAccount(account())
        yield store.stopService()
        yield self.assertFailure(store.getAccount("alice"), StoreError)


class SQLiteStoreTests(StoreContractMixin, TestCase):
    def setUp(self):
        # Not self.mktemp(): under pytest that writes into the working tree.
        # Registered first, so it runs after every store is closed.
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "state", "imapproxy.sqlite3")
        self.key = Fernet.generate_key()

    def newStore(self, secrets: Secrets | None = None) -> SQLiteStore:
        store = SQLiteStore(self.path, secrets or Secrets([self.key]))
        self.addCleanup(self.closeOnce, store)
        return store

    def loseData(self) -> None:
        # Another process's hand on the file: the marker row is gone.
        with sqlite3.connect(self.path, timeout=10) as db:
            db.execute("DELETE FROM meta")
            db.execute("DELETE FROM tokens")
        db.close()

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
    def test_storeFromBeforeSMTPOpens(self):
        """
        A store file written before accounts had SMTP servers (no smtp_*
        columns, no smtp in consents) opens: its accounts read back without
        one, and can be given one.
        """
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.addPending(pending())
        yield store.close()
        with sqlite3.connect(self.path) as db:
            for column in ("smtp_host", "smtp_port", "smtp_tls", "smtp_ca_file"):
                db.execute(f"ALTER TABLE accounts DROP COLUMN {column}")
            db.execute("ALTER TABLE oauth2_pending DROP COLUMN smtp")
        db.close()
        again = self.newStore()
        yield again.open()
        got = yield again.getAccount("alice")
        self.assertEqual((got.oauth2.refreshToken, got.smtp), (REFRESH, None))
        self.assertEqual((yield again.takePending("state-1")).smtp, None)
        smtp = Upstream(host="smtp.example.com", port=465)
        yield again.putAccount(account(smtp=smtp))
        self.assertEqual((yield again.getAccount("alice")).smtp, smtp)

    @inlineCallbacks
    def test_storeFromBeforeCapsOpens(self):
        """
        A store file written before connection caps (no *_max_connections
        columns) opens: its accounts read back with none (the default), and
        can be given one.
        """
        store = yield self.openStore()
        yield store.putAccount(account(smtp=Upstream(host="smtp.example.com", port=465)))
        yield store.close()
        with sqlite3.connect(self.path) as db:
            for column in ("imap_max_connections", "smtp_max_connections"):
                db.execute(f"ALTER TABLE accounts DROP COLUMN {column}")
        db.close()
        again = self.newStore()
        yield again.open()
        got = yield again.getAccount("alice")
        self.assertEqual((got.upstream.maxConnections, got.smtp.maxConnections), (None, None))
        capped = Upstream(host="imap.example.com", maxConnections=4)
        yield again.putAccount(account(upstream=capped))
        self.assertEqual((yield again.getAccount("alice")).upstream, capped)

    @inlineCallbacks
    def test_storeFromBeforeRestrictionsOpens(self):
        """
        A store file written before tokens had IMAP restrictions (no
        restrictions column) opens: its tokens are unrestricted, and new
        tokens keep theirs.
        """
        store = yield self.openStore()
        yield store.addToken(token("t1"))
        yield store.close()
        with sqlite3.connect(self.path) as db:
            db.execute("ALTER TABLE tokens DROP COLUMN restrictions")
        db.close()
        again = self.newStore()
        yield again.open()
        self.assertEqual((yield again.getToken("t1")), token("t1"))
        limited = token("t2", restrictions=Restrictions(readOnly=True))
        yield again.addToken(limited)
        self.assertEqual((yield again.getToken("t2")), limited)

    @inlineCallbacks
    def test_storeFromBeforeOpenedByManyAtOnce(self):
        """
        Processes that open an older store at the same moment (admin
        commands run in parallel after an upgrade) each bring it up to date
        or see it so: none fails on a column another has just added.
        """
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        dropped = [(t, c) for t, c, _ in MIGRATIONS if (t, c) != ("tokens", "restrictions")]
        with sqlite3.connect(self.path) as db:
            for table, column in dropped:
                db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.close()
        openers = 8
        start = threading.Barrier(openers)
        failures: list[BaseException] = []

        def openIt() -> None:
            start.wait()
            try:
                db, _meta = connect(self.path, Secrets([self.key]))
                db.close()
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=openIt) for _ in range(openers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(failures, [])
        with sqlite3.connect(self.path) as db:
            have = {(t, r[1]) for t, _c in dropped for r in db.execute(f"PRAGMA table_info({t})")}
        db.close()
        self.assertEqual(set(dropped) - have, set())
        again = self.newStore()
        yield again.open()
        self.assertEqual((yield again.getAccount("alice")).oauth2.refreshToken, REFRESH)

    def test_transactionKeepsTheErrorWhenSQLiteRolledBackItself(self):
        """
        An error inside a transaction SQLite has already rolled back comes
        out as it is, not as "no transaction is active".
        """
        db = sqlite3.connect(":memory:", isolation_level=None)
        self.addCleanup(db.close)
        db.execute("CREATE TABLE t (x)")
        with self.assertRaises(ValueError):
            with _transaction(db):
                db.execute("INSERT INTO t VALUES (1)")
                db.execute("ROLLBACK")  # as SQLite does on some errors
                raise ValueError("the real error")
        self.assertFalse(db.in_transaction)
        with _transaction(db):
            db.execute("INSERT INTO t VALUES (2)")
        self.assertEqual(db.execute("SELECT x FROM t").fetchall(), [(2,)])

    def test_storeThatDoesNotOpenIsClosed(self):
        """A file that is no database is refused, and its connection closed."""
        os.makedirs(os.path.dirname(self.path), mode=0o700)
        with open(self.path, "wb") as f:
            f.write(b"not a database" * 100)
        opened: list[sqlite3.Connection] = []
        real = sqlite3.connect

        def connecting(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            opened.append(real(*args, **kwargs))
            return opened[-1]

        self.patch(sqlite3, "connect", connecting)
        self.assertRaises(StoreError, connect, self.path, Secrets([self.key]))
        self.assertEqual(len(opened), 1)
        self.assertRaises(sqlite3.ProgrammingError, opened[0].execute, "SELECT 1")

    @inlineCallbacks
    def test_rotatedKeys(self):
        """A store reopened with keys [new, old] opens and reads old secrets."""
        store = yield self.openStore()
        yield store.putAccount(account())
        yield store.close()
        rotated = self.newStore(Secrets([Fernet.generate_key(), self.key]))
        yield rotated.open()
        got = yield rotated.getAccount("alice")
        self.assertEqual(got.oauth2.clientSecret, CLIENT_SECRET)

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


class StoreCopyTests(TestCase):
    """``store copy`` (``proxy.store.copy``) between an SQLite and a memory store."""

    @inlineCallbacks
    def test_copiesSMTPServers(self):
        """Accounts arrive with their SMTP servers, and those without one without."""
        from twisted.internet.defer import Deferred

        from proxy.store.copy import copyStore

        directory = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        source = SQLiteStore(os.path.join(directory, "s.sqlite3"), Secrets([Fernet.generate_key()]))
        yield source.open()
        self.addCleanup(source.close)
        target = MemoryStore()
        target.openBlocking()
        smtp = Upstream(host="smtp.example.com", port=587, tls="starttls", caFile="/ca.pem")
        yield source.putAccount(account("alice", smtp=smtp))
        yield source.putAccount(account("bob"))
        report = yield Deferred.fromCoroutine(copyStore(source, target))
        self.assertEqual(report.accounts, 2)
        self.assertEqual((yield target.getAccount("alice")).smtp, smtp)
        self.assertIsNone((yield target.getAccount("bob")).smtp)

    @inlineCallbacks
    def test_copiesTokenRestrictions(self):
        """Tokens arrive with their IMAP restrictions, unrestricted ones without."""
        from twisted.internet.defer import Deferred

        from proxy.store.copy import copyStore

        directory = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        source = SQLiteStore(os.path.join(directory, "s.sqlite3"), Secrets([Fernet.generate_key()]))
        yield source.open()
        self.addCleanup(source.close)
        target = MemoryStore()
        target.openBlocking()
        yield source.putAccount(account("alice"))
        limited = Restrictions(readOnly=True, mailboxes=("INBOX", "Archive/*"))
        yield source.addToken(token("t1", restrictions=limited))
        yield source.addToken(token("t2"))
        yield Deferred.fromCoroutine(copyStore(source, target))
        self.assertEqual((yield target.getToken("t1")).restrictions, limited)
        self.assertIsNone((yield target.getToken("t2")).restrictions)


# --- Regression tests (each docstring says what was wrong; every test
# failed before its fix). ---


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
