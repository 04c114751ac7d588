"""
The embedded default store: one SQLite file, used from one dedicated thread so
that the reactor never waits on the disk and writes never contend.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..encryption import SecretKeyError, Secrets
from ..model import Account, OAuth2App, OAuth2Grant, PendingAuthorization, Token, Upstream
from ._interfaces import IAccountStore, ITokenStore

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    imap_host TEXT NOT NULL,
    imap_port INTEGER NOT NULL,
    imap_tls TEXT NOT NULL,
    imap_ca_file TEXT,
    token_url TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret_enc TEXT NOT NULL,
    refresh_token_enc TEXT NOT NULL,
    oauth_scopes TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL DEFAULT 'ok',
    state_reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    account TEXT,
    scopes TEXT NOT NULL,
    description TEXT NOT NULL,
    addresses TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    expires REAL,
    last_use_time REAL,
    last_use_address TEXT
);
CREATE INDEX IF NOT EXISTS tokens_account ON tokens(account);
CREATE TABLE IF NOT EXISTS oauth2_apps (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret_enc TEXT NOT NULL,
    redirect_url TEXT,
    authorization_url TEXT,
    token_url TEXT NOT NULL,
    device_url TEXT,
    scopes TEXT NOT NULL,
    tenant TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth2_pending (
    state TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    app TEXT NOT NULL,
    verifier_enc TEXT NOT NULL,
    email TEXT,
    expires REAL NOT NULL,
    imap TEXT
);
"""

# Columns added after a store was first created: (table, column, definition).
MIGRATIONS = [
    ("accounts", "oauth2_app", "TEXT"),
    ("accounts", "access_token_enc", "TEXT"),
    ("accounts", "access_token_expires", "REAL"),
    ("accounts", "access_token_lifetime", "REAL"),
]

# Every encrypted column: (table, key column, encrypted column).
ENCRYPTED = [
    ("accounts", "id", "client_secret_enc"),
    ("accounts", "id", "refresh_token_enc"),
    ("accounts", "id", "access_token_enc"),
    ("oauth2_apps", "id", "client_secret_enc"),
    ("oauth2_pending", "state", "verifier_enc"),
    ("meta", "key", "value"),  # only key_check holds ciphertext
]

# Encrypted under the store's key when the store is created; a key that cannot
# decrypt it is the wrong key, and the store refuses to open.
_KEY_CHECK = "imapproxy key check"


class StoreError(Exception):
    """The store cannot be opened or used; the message is safe to show."""


@implementer(IAccountStore, ITokenStore)
class SQLiteStore(Service):
    """
    :param path: the database file; its directory is created (mode 0700).
    :param secrets: encrypts provider secrets on the way in, decrypts on the
        way out.
    """

    log = Logger()

    def __init__(self, path: str, secrets: Secrets, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.path = path
        self._secrets = secrets
        self._reactor = reactor
        self._touches: dict[str, tuple[float, str]] = {}
        self._touchFlush: Any = None
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="imapproxy-sqlite")
        self._db: sqlite3.Connection | None = None

    @property
    def secrets(self) -> Secrets:
        return self._secrets

    # -- life cycle ---------------------------------------------------------

    def open(self):
        """
        Open (or create) the database from the store's thread.

        :return: Deferred firing when the store is usable; errback
            ``StoreError`` when the file cannot be opened or the key is wrong.
        """
        return self._run(self.openBlocking)

    def close(self):
        if self._pool.joined:
            return succeed(None)
        if self._touchFlush is not None and self._touchFlush.active():
            self._touchFlush.cancel()
        self._flushTouches()
        d = self._run(self._closeBlocking)

        def stop(result):
            self._pool.stop()
            return result

        return d.addBoth(stop)

    def startService(self):
        # Queued first on the store's single thread: every later query runs
        # after it. (The server checked the file and key before starting.)
        super().startService()
        if self._db is None:
            self.open().addErrback(self._openFailed)

    def _openFailed(self, failure):
        self.log.failure("the store could not be opened", failure)
        self._reactor.stop()

    def stopService(self):
        super().stopService()
        return self.close()

    def _run(self, f: Callable[..., T], *args: Any):
        if self._pool.joined:
            return fail(StoreError("the store is closed"))
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def openBlocking(self) -> None:
        """
        Open the database in the calling thread: only before the reactor runs
        (or from the store's own thread). The connection is then used from the
        store's single thread only.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fresh = not os.path.exists(self.path)
            db = sqlite3.connect(
                self.path, isolation_level=None, timeout=10, check_same_thread=False
            )
            if fresh:
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=10000")
            db.executescript(SCHEMA)
            for table, column, definition in MIGRATIONS:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the SQLite store {self.path}: {e}") from None
        row = db.execute("SELECT value FROM meta WHERE key='key_check'").fetchone()
        if row is None:
            db.execute(
                "INSERT INTO meta(key, value) VALUES('key_check', ?)",
                (self._secrets.encrypt(_KEY_CHECK),),
            )
        else:
            try:
                ok = self._secrets.decrypt(row[0]) == _KEY_CHECK
            except SecretKeyError:
                ok = False
            if not ok:
                db.close()
                raise StoreError(
                    f"the secret key does not match the store {self.path}: "
                    "refusing to start (give the key the store's secrets were last "
                    "encrypted with: the newest one after 'imapproxy secrets rotate')"
                )
        self._db = db

    def _closeBlocking(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- accounts -----------------------------------------------------------

    _ACCOUNT_COLUMNS = (
        "id, email, imap_host, imap_port, imap_tls, imap_ca_file, token_url, "
        "client_id, client_secret_enc, refresh_token_enc, oauth_scopes, state, "
        "state_reason, created, updated, oauth2_app"
    )

    def _account(self, row: tuple) -> Account:
        (
            aid,
            email,
            host,
            port,
            tls,
            ca,
            url,
            cid,
            csec,
            rt,
            scopes,
            state,
            reason,
            created,
            updated,
            appId,
        ) = row
        if appId is not None:
            # The client side of the grant is the shared app's.
            app = self._appBlocking(appId)
            if app is not None:
                url, cid, scopesList = app.tokenURL, app.clientId, list(app.scopes)
                return Account(
                    id=aid,
                    email=email,
                    upstream=Upstream(host=host, port=port, tls=tls, caFile=ca),
                    oauth2=OAuth2Grant(
                        tokenURL=url,
                        clientId=cid,
                        clientSecret=app.clientSecret,
                        refreshToken=self._secrets.decrypt(rt),
                        scopes=tuple(scopesList),
                        app=appId,
                    ),
                    state=state,
                    stateReason=reason,
                    created=created,
                    updated=updated,
                )
        return Account(
            id=aid,
            email=email,
            upstream=Upstream(host=host, port=port, tls=tls, caFile=ca),
            oauth2=OAuth2Grant(
                tokenURL=url,
                clientId=cid,
                clientSecret=self._secrets.decrypt(csec),
                refreshToken=self._secrets.decrypt(rt),
                scopes=tuple(json.loads(scopes)),
            ),
            state=state,
            stateReason=reason,
            created=created,
            updated=updated,
        )

    def getAccount(self, accountId: str):
        def q() -> Account | None:
            row = (
                self._conn()
                .execute(
                    f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts WHERE id=?",
                    (accountId,),
                )
                .fetchone()
            )
            return None if row is None else self._account(row)

        return self._run(q)

    def listAccounts(self):
        def q() -> list[Account]:
            rows = self._conn().execute(f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts ORDER BY id")
            return [self._account(r) for r in rows]

        return self._run(q)

    def putAccount(self, account: Account):
        s = self._secrets
        now = time.time()
        grant = account.oauth2
        # An account of a shared app keeps only its own refresh token; the
        # client side is read from the app, so an app change applies to all.
        shared = grant.app is not None
        values = (
            account.id,
            account.email,
            account.upstream.host,
            account.upstream.port,
            account.upstream.tls,
            account.upstream.caFile,
            "" if shared else grant.tokenURL,
            "" if shared else grant.clientId,
            s.encrypt("" if shared else grant.clientSecret),
            s.encrypt(grant.refreshToken),
            json.dumps([] if shared else grant.scopes),
            account.state,
            account.stateReason,
            account.created or now,
            now,
            grant.app,
        )

        def q() -> None:
            self._conn().execute(
                f"INSERT INTO accounts ({self._ACCOUNT_COLUMNS}) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "email=excluded.email, imap_host=excluded.imap_host, "
                "imap_port=excluded.imap_port, imap_tls=excluded.imap_tls, "
                "imap_ca_file=excluded.imap_ca_file, token_url=excluded.token_url, "
                "client_id=excluded.client_id, "
                "client_secret_enc=excluded.client_secret_enc, "
                "refresh_token_enc=excluded.refresh_token_enc, "
                "oauth_scopes=excluded.oauth_scopes, state=excluded.state, "
                "state_reason=excluded.state_reason, updated=excluded.updated, "
                "oauth2_app=excluded.oauth2_app, "
                # A changed account may point at another mailbox or server:
                # its saved access token must not follow it there.
                "access_token_enc=NULL, access_token_expires=NULL, "
                "access_token_lifetime=NULL",
                values,
            )

        return self._run(q)

    def removeAccount(self, accountId: str):
        def q() -> bool:
            db = self._conn()
            with _transaction(db):
                db.execute("DELETE FROM tokens WHERE account=?", (accountId,))
                cur = db.execute("DELETE FROM accounts WHERE id=?", (accountId,))
            return cur.rowcount > 0

        return self._run(q)

    def setRefreshToken(self, accountId: str, refreshToken: str):
        enc = self._secrets.encrypt(refreshToken)

        def q() -> None:
            self._conn().execute(
                "UPDATE accounts SET refresh_token_enc=?, updated=? WHERE id=?",
                (enc, time.time(), accountId),
            )

        return self._run(q)

    def setAccountState(self, accountId: str, state: str, reason: str | None):
        def q() -> None:
            self._conn().execute(
                "UPDATE accounts SET state=?, state_reason=?, updated=? WHERE id=?",
                (state, reason, time.time(), accountId),
            )

        return self._run(q)

    def getAccessToken(self, accountId: str):
        """
        :return: Deferred firing with ``(token, expires, lifetime)`` as saved
            by ``saveAccessToken``, or None.
        """

        def q() -> tuple[str, float, float] | None:
            row = (
                self._conn()
                .execute(
                    "SELECT access_token_enc, access_token_expires, access_token_lifetime "
                    "FROM accounts WHERE id=?",
                    (accountId,),
                )
                .fetchone()
            )
            if row is None or row[0] is None:
                return None
            return self._secrets.decrypt(row[0]), row[1], row[2]

        return self._run(q)

    def saveAccessToken(
        self, accountId: str, token: str | None, expires: float | None, lifetime: float | None
    ):
        """Save (encrypted) or, with None, drop an account's provider access token."""
        enc = self._secrets.encrypt(token) if token is not None else None

        def q() -> None:
            self._conn().execute(
                "UPDATE accounts SET access_token_enc=?, access_token_expires=?, "
                "access_token_lifetime=? WHERE id=?",
                (enc, expires, lifetime, accountId),
            )

        return self._run(q)

    # -- secret keys ----------------------------------------------------------

    def rotateSecrets(self):
        """
        Re-encrypt every stored secret under the newest key, in one
        transaction. :return: Deferred firing with how many values.
        """

        def q() -> int:
            db = self._conn()
            n = 0
            with _transaction(db):
                for table, key, column in ENCRYPTED:
                    where = " AND key='key_check'" if table == "meta" else ""
                    rows = db.execute(
                        f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL{where}"
                    ).fetchall()
                    for k, value in rows:
                        db.execute(
                            f"UPDATE {table} SET {column}=? WHERE {key}=?",
                            (self._secrets.rotate(value), k),
                        )
                        n += 1
            return n

        return self._run(q)

    def undecryptable(self, secrets: Secrets):
        """
        :return: Deferred firing with how many stored secrets ``secrets``
            cannot decrypt (0 means older keys may be retired).
        """

        def q() -> int:
            db = self._conn()
            bad = 0
            for table, _key, column in ENCRYPTED:
                where = " AND key='key_check'" if table == "meta" else ""
                for (value,) in db.execute(
                    f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL{where}"
                ):
                    try:
                        secrets.decrypt(value)
                    except SecretKeyError:
                        bad += 1
            return bad

        return self._run(q)

    def reloadSecrets(self):
        """Re-read the key file from the store's thread; Deferred(True) if it changed."""
        return self._run(self._secrets.reloadBlocking)

    # -- OAuth2 apps ----------------------------------------------------------

    _APP_COLUMNS = (
        "id, provider, client_id, client_secret_enc, redirect_url, authorization_url, "
        "token_url, device_url, scopes, tenant, created, updated"
    )

    def _app(self, row: tuple) -> OAuth2App:
        (
            aid,
            provider,
            cid,
            csec,
            redirect,
            auth,
            token,
            device,
            scopes,
            tenant,
            created,
            updated,
        ) = row
        return OAuth2App(
            id=aid,
            provider=provider,
            clientId=cid,
            clientSecret=self._secrets.decrypt(csec),
            redirectURL=redirect,
            authorizationURL=auth,
            tokenURL=token,
            deviceURL=device,
            scopes=tuple(json.loads(scopes)),
            tenant=tenant,
            created=created,
            updated=updated,
        )

    def _appBlocking(self, appId: str) -> OAuth2App | None:
        row = (
            self._conn()
            .execute(f"SELECT {self._APP_COLUMNS} FROM oauth2_apps WHERE id=?", (appId,))
            .fetchone()
        )
        return None if row is None else self._app(row)

    def getApp(self, appId: str):
        return self._run(self._appBlocking, appId)

    def listApps(self):
        def q() -> list[OAuth2App]:
            rows = self._conn().execute(f"SELECT {self._APP_COLUMNS} FROM oauth2_apps ORDER BY id")
            return [self._app(r) for r in rows]

        return self._run(q)

    def putApp(self, app: OAuth2App):
        now = time.time()
        values = (
            app.id,
            app.provider,
            app.clientId,
            self._secrets.encrypt(app.clientSecret),
            app.redirectURL,
            app.authorizationURL,
            app.tokenURL,
            app.deviceURL,
            json.dumps(app.scopes),
            app.tenant,
            app.created or now,
            now,
        )

        def q() -> None:
            self._conn().execute(
                f"INSERT OR REPLACE INTO oauth2_apps ({self._APP_COLUMNS}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                values,
            )

        return self._run(q)

    def removeApp(self, appId: str):
        """:return: Deferred(True) when removed; ``StoreError`` while accounts use it."""

        def q() -> bool:
            db = self._conn()
            with _transaction(db):
                used = db.execute(
                    "SELECT COUNT(*) FROM accounts WHERE oauth2_app=?", (appId,)
                ).fetchone()[0]
                if used:
                    raise StoreError(f"{used} account(s) use this app")
                cur = db.execute("DELETE FROM oauth2_apps WHERE id=?", (appId,))
            return cur.rowcount > 0

        return self._run(q)

    # -- authorizations in progress -----------------------------------------

    def addPending(self, pending: PendingAuthorization):
        enc = self._secrets.encrypt(pending.verifier)

        def q() -> None:
            db = self._conn()
            db.execute("DELETE FROM oauth2_pending WHERE expires < ?", (time.time(),))
            db.execute(
                "INSERT INTO oauth2_pending (state, account, app, verifier_enc, email, "
                "expires, imap) VALUES (?,?,?,?,?,?,?)",
                (
                    pending.state,
                    pending.account,
                    pending.app,
                    enc,
                    pending.email,
                    pending.expires,
                    pending.imap,
                ),
            )

        return self._run(q)

    def takePending(self, state: str):
        """
        Remove and return the authorization with this state (single use), or
        None when there is none.
        """

        def q() -> PendingAuthorization | None:
            db = self._conn()
            with _transaction(db):
                row = db.execute(
                    "SELECT state, account, app, verifier_enc, email, expires, imap "
                    "FROM oauth2_pending WHERE state=?",
                    (state,),
                ).fetchone()
                db.execute("DELETE FROM oauth2_pending WHERE state=?", (state,))
            if row is None:
                return None
            return PendingAuthorization(
                state=row[0],
                account=row[1],
                app=row[2],
                verifier=self._secrets.decrypt(row[3]),
                email=row[4],
                expires=row[5],
                imap=row[6],
            )

        return self._run(q)

    # -- tokens -------------------------------------------------------------

    _TOKEN_COLUMNS = (
        "id, account, scopes, description, addresses, created, expires, "
        "last_use_time, last_use_address"
    )

    @staticmethod
    def _token(row: tuple) -> Token:
        tid, account, scopes, desc, addrs, created, expires, lut, lua = row
        return Token(
            id=tid,
            account=account,
            scopes=tuple(json.loads(scopes)),
            description=desc,
            addresses=tuple(json.loads(addrs)),
            created=created,
            expires=expires,
            lastUseTime=lut,
            lastUseAddress=lua,
        )

    def addToken(self, token: Token):
        values = (
            token.id,
            token.account,
            json.dumps(token.scopes),
            token.description,
            json.dumps(token.addresses),
            token.created,
            token.expires,
            None,
            None,
        )

        def q() -> None:
            self._conn().execute(
                f"INSERT INTO tokens ({self._TOKEN_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                values,
            )

        return self._run(q)

    def getToken(self, tokenId: str):
        def q() -> Token | None:
            row = (
                self._conn()
                .execute(f"SELECT {self._TOKEN_COLUMNS} FROM tokens WHERE id=?", (tokenId,))
                .fetchone()
            )
            return None if row is None else self._token(row)

        return self._run(q).addCallback(self._withTouch)

    def _withTouch(self, token: Token | None) -> Token | None:
        """A token as read, with its last use not written yet."""
        if token is None:
            return None
        pending = self._touches.get(token.id)
        if pending is None:
            return token
        return attrs.evolve(token, lastUseTime=pending[0], lastUseAddress=pending[1])

    def listTokens(self, account: str | None = None):
        def q() -> list[Token]:
            sql = f"SELECT {self._TOKEN_COLUMNS} FROM tokens"
            args: tuple = ()
            if account is not None:
                sql += " WHERE account=?"
                args = (account,)
            rows = self._conn().execute(sql + " ORDER BY created DESC, id", args)
            return [self._token(r) for r in rows]

        return self._run(q).addCallback(lambda found: [self._withTouch(t) for t in found])

    def removeToken(self, tokenId: str):
        self._touches.pop(tokenId, None)

        def q() -> bool:
            cur = self._conn().execute("DELETE FROM tokens WHERE id=?", (tokenId,))
            return cur.rowcount > 0

        return self._run(q)

    # Last uses are written together at most this often: one transaction (one
    # fsync) for a burst of logins, and never in a login's way on the store's
    # single thread.
    TOUCH_DELAY = 1.0

    def touchToken(self, tokenId: str, when: float, address: str):
        """Record a use; written within ``TOUCH_DELAY`` seconds (and at close)."""
        self._touches[tokenId] = (when, address)
        if self._touchFlush is None:
            self._touchFlush = self._reactor.callLater(self.TOUCH_DELAY, self._flushTouches)
        return succeed(None)

    def _flushTouches(self):
        self._touchFlush = None
        if not self._touches:
            return succeed(None)
        rows = [(w, a, tid) for tid, (w, a) in self._touches.items()]
        self._touches = {}

        def q() -> None:
            db = self._conn()
            with _transaction(db):
                db.executemany(
                    "UPDATE tokens SET last_use_time=?, last_use_address=? WHERE id=?", rows
                )

        d = self._run(q)
        d.addErrback(lambda f: self.log.failure("recording token use failed", f))
        return d

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db


class _transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, tb):
        self._db.execute("ROLLBACK" if kind else "COMMIT")
        return False
