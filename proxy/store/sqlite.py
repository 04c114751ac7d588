"""
The embedded default store: one SQLite file, used from one dedicated thread so
that the reactor never waits on the disk and writes never contend. Records
are mapped by ``proxy.store._records``, shared with the other stores.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..encryption import SecretKeyError, Secrets
from ..model import Account, OAuth2App, PendingAuthorization, Token
from . import _records as R
from ._errors import MarkerWatch, StoreError, keyMatches, wrongKey
from ._interfaces import IStore
from ._sqlitedb import ENCRYPTED, _transaction, connect
from ._throttles import LocalThrottles

T = TypeVar("T")

__all__ = ["SQLiteStore", "StoreError"]


@implementer(IStore)
class SQLiteStore(LocalThrottles, Service):
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
        self._marker = MarkerWatch(path, "the database file replaced?")

    @property
    def secrets(self) -> Secrets:
        return self._secrets

    # -- life cycle ---------------------------------------------------------

    def open(self) -> Deferred[None]:
        return self._run(self.openBlocking)

    def close(self) -> Deferred[None]:
        if self._pool.joined:
            return succeed(None)
        if self._touchFlush is not None and self._touchFlush.active():
            self._touchFlush.cancel()
        self._flushTouches()
        d = self._run(self.closeBlocking)

        def stop(result: Any) -> Any:
            self._pool.stop()
            return result

        return d.addBoth(stop)

    def startService(self) -> None:
        # Queued first on the store's single thread: every later query runs
        # after it. (The server checked the file and key before starting.)
        super().startService()
        if self._db is None:
            self.open().addErrback(self._openFailed)

    def _openFailed(self, failure: Any) -> None:
        self.log.failure("the store could not be opened", failure)
        self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
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
        db, meta = connect(self.path, self._secrets)
        if not keyMatches(self._secrets, meta["key_check"]):
            db.close()
            raise wrongKey(self.path)
        self._marker.expected = meta["store_id"]
        self._db = db

    def closeBlocking(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    _closeBlocking = closeBlocking

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    def _markerBlocking(self) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
        return None if row is None else str(row[0])

    def checkHealth(self) -> Deferred[None]:
        return self._run(self._markerBlocking).addCallback(self._marker.check)

    # -- rows -----------------------------------------------------------------

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = self._conn().execute(sql, args).fetchone()
        return None if row is None else dict(row)

    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in self._conn().execute(sql, args)]

    def _insert(self, table: str, record: dict[str, Any], suffix: str = "", verb: str = "") -> None:
        names = ", ".join(record)
        marks = ", ".join("?" * len(record))
        self._conn().execute(
            f"INSERT {verb}INTO {table} ({names}) VALUES ({marks}){suffix}",
            tuple(record.values()),
        )

    def _update(self, table: str, key: str, value: str, fields: dict[str, Any]) -> None:
        sets = ", ".join(f"{name}=?" for name in fields)
        self._conn().execute(f"UPDATE {table} SET {sets} WHERE {key}=?", (*fields.values(), value))

    # -- accounts -----------------------------------------------------------

    _ACCOUNTS = f"SELECT {', '.join(R.ACCOUNT_COLUMNS)} FROM accounts"

    def _account(self, row: dict[str, Any]) -> Account:
        appId = row["oauth2_app"]
        app = self._appBlocking(appId) if appId is not None else None
        return R.accountFrom(row, app, self._secrets)

    def getAccount(self, accountId: str) -> Deferred[Account | None]:
        def q() -> Account | None:
            row = self._one(self._ACCOUNTS + " WHERE id=?", accountId)
            return None if row is None else self._account(row)

        return self._run(q)

    def listAccounts(self) -> Deferred[list[Account]]:
        return self._run(
            lambda: [self._account(r) for r in self._all(self._ACCOUNTS + " ORDER BY id")]
        )

    def putAccount(self, account: Account) -> Deferred[None]:
        record = R.accountRecord(account, self._secrets, time.time())
        kept = ("id", "created")
        # A changed account may point at another mailbox or server: its
        # saved access token must not follow it there.
        updates = [f"{c}=excluded.{c}" for c in record if c not in kept]
        updates += [f"{c}=NULL" for c in R.ACCESS_COLUMNS]
        suffix = " ON CONFLICT(id) DO UPDATE SET " + ", ".join(updates)
        return self._run(self._insert, "accounts", record, suffix)

    def removeAccount(self, accountId: str) -> Deferred[bool]:
        def q() -> bool:
            db = self._conn()
            with _transaction(db):
                db.execute("DELETE FROM tokens WHERE account=?", (accountId,))
                cur = db.execute("DELETE FROM accounts WHERE id=?", (accountId,))
            return cur.rowcount > 0

        return self._run(q)

    def setRefreshToken(self, accountId: str, refreshToken: str) -> Deferred[None]:
        fields = R.refreshTokenUpdate(refreshToken, self._secrets, time.time())
        return self._run(self._update, "accounts", "id", accountId, fields)

    def setAccountState(
        self, accountId: str, state: str, reason: str | None
    ) -> Deferred[str | None]:
        fields = R.stateUpdate(state, reason, time.time())

        def q() -> str | None:
            with _transaction(self._conn()):
                row = self._one("SELECT state FROM accounts WHERE id=?", accountId)
                self._update("accounts", "id", accountId, fields)
            return None if row is None else str(row["state"])

        return self._run(q)

    def getAccessToken(
        self, accountId: str
    ) -> Deferred[tuple[str, float | None, float | None] | None]:
        def q() -> tuple[str, float | None, float | None] | None:
            columns = ", ".join(R.ACCESS_COLUMNS)
            row = self._one(f"SELECT {columns} FROM accounts WHERE id=?", accountId)
            return None if row is None else R.accessFrom(row, self._secrets)

        return self._run(q)

    def saveAccessToken(
        self, accountId: str, token: str | None, expires: float | None, lifetime: float | None
    ) -> Deferred[None]:
        fields = R.accessRecord(token, expires, lifetime, self._secrets)
        return self._run(self._update, "accounts", "id", accountId, fields)

    # -- secret keys ----------------------------------------------------------

    def _ciphertexts(self) -> Iterable[tuple[str, str, str, Any, str]]:
        """Every stored ciphertext: (table, key column, column, key, value)."""
        db = self._conn()
        for table, key, column in ENCRYPTED:
            where = " AND key='key_check'" if table == "meta" else ""
            rows = db.execute(
                f"SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL{where}"
            ).fetchall()
            for k, value in rows:
                yield table, key, column, k, value

    def rotateSecrets(self) -> Deferred[int]:
        def q() -> int:
            db = self._conn()
            n = 0
            with _transaction(db):
                for table, key, column, k, value in list(self._ciphertexts()):
                    db.execute(
                        f"UPDATE {table} SET {column}=? WHERE {key}=?",
                        (self._secrets.rotate(value), k),
                    )
                    n += 1
            return n

        return self._run(q)

    def undecryptable(self, secrets: Secrets) -> Deferred[int]:
        def q() -> int:
            bad = 0
            for *_, value in self._ciphertexts():
                try:
                    secrets.decrypt(value)
                except SecretKeyError:
                    bad += 1
            return bad

        return self._run(q)

    def reloadSecrets(self) -> Deferred[bool]:
        return self._run(self._secrets.reloadBlocking)

    # -- OAuth2 apps ----------------------------------------------------------

    _APPS = f"SELECT {', '.join(R.APP_COLUMNS)} FROM oauth2_apps"

    def _appBlocking(self, appId: str) -> OAuth2App | None:
        row = self._one(self._APPS + " WHERE id=?", appId)
        return None if row is None else R.appFrom(row, self._secrets)

    def getApp(self, appId: str) -> Deferred[OAuth2App | None]:
        return self._run(self._appBlocking, appId)

    def listApps(self) -> Deferred[list[OAuth2App]]:
        return self._run(
            lambda: [R.appFrom(r, self._secrets) for r in self._all(self._APPS + " ORDER BY id")]
        )

    def putApp(self, app: OAuth2App) -> Deferred[None]:
        record = R.appRecord(app, self._secrets, time.time())
        return self._run(self._insert, "oauth2_apps", record, "", "OR REPLACE ")

    def removeApp(self, appId: str) -> Deferred[bool]:
        def q() -> bool:
            db = self._conn()
            with _transaction(db):
                (used,) = db.execute(
                    "SELECT COUNT(*) FROM accounts WHERE oauth2_app=?", (appId,)
                ).fetchone()
                if used:
                    raise R.appInUse(used)
                cur = db.execute("DELETE FROM oauth2_apps WHERE id=?", (appId,))
            return cur.rowcount > 0

        return self._run(q)

    # -- authorizations in progress -----------------------------------------

    def addPending(self, pending: PendingAuthorization) -> Deferred[None]:
        record = R.pendingRecord(pending, self._secrets)

        def q() -> None:
            self._conn().execute("DELETE FROM oauth2_pending WHERE expires < ?", (time.time(),))
            try:
                self._insert("oauth2_pending", record)
            except sqlite3.IntegrityError:
                raise R.pendingExists() from None

        return self._run(q)

    def takePending(self, state: str) -> Deferred[PendingAuthorization | None]:
        def q() -> PendingAuthorization | None:
            db = self._conn()
            columns = ", ".join(R.PENDING_COLUMNS)
            with _transaction(db):
                row = self._one(f"SELECT {columns} FROM oauth2_pending WHERE state=?", state)
                db.execute("DELETE FROM oauth2_pending WHERE state=?", (state,))
            return None if row is None else R.pendingFrom(row, self._secrets)

        return self._run(q)

    # -- tokens -------------------------------------------------------------

    _TOKENS = f"SELECT {', '.join(R.TOKEN_COLUMNS)} FROM tokens"

    def addToken(self, token: Token) -> Deferred[None]:
        record = R.tokenRecord(token)

        def q() -> None:
            try:
                self._insert("tokens", record)
            except sqlite3.IntegrityError:
                raise R.tokenExists() from None

        return self._run(q)

    def getToken(self, tokenId: str) -> Deferred[Token | None]:
        # The marker is read with the token: a store that lost its data
        # refuses logins as unavailable, not as unknown tokens.
        def q() -> tuple[str | None, dict[str, Any] | None]:
            return self._markerBlocking(), self._one(self._TOKENS + " WHERE id=?", tokenId)

        def found(result: tuple[str | None, dict[str, Any] | None]) -> Token | None:
            marker, row = result
            self._marker.check(marker)
            return None if row is None else self._withTouch(R.tokenFrom(row))

        return self._run(q).addCallback(found)

    def _withTouch(self, token: Token) -> Token:
        """A token as read, with its last use not written yet."""
        pending = self._touches.get(token.id)
        if pending is None:
            return token
        return attrs.evolve(token, lastUseTime=pending[0], lastUseAddress=pending[1])

    def listTokens(self, account: str | None = None) -> Deferred[list[Token]]:
        def q() -> list[dict[str, Any]]:
            if account is None:
                return self._all(self._TOKENS + " ORDER BY created DESC, id")
            return self._all(self._TOKENS + " WHERE account=? ORDER BY created DESC, id", account)

        return self._run(q).addCallback(
            lambda rows: [self._withTouch(R.tokenFrom(r)) for r in rows]
        )

    def removeToken(self, tokenId: str) -> Deferred[bool]:
        self._touches.pop(tokenId, None)
        return self._run(
            lambda: self._conn().execute("DELETE FROM tokens WHERE id=?", (tokenId,)).rowcount > 0
        )

    # Last uses are written together at most this often: one transaction (one
    # fsync) for a burst of logins, and never in a login's way on the store's
    # single thread.
    TOUCH_DELAY = 1.0

    def touchToken(self, tokenId: str, when: float, address: str) -> Deferred[None]:
        """Record a use; written within ``TOUCH_DELAY`` seconds (and at close)."""
        self._touches[tokenId] = (when, address)
        if self._touchFlush is None:
            self._touchFlush = self._reactor.callLater(self.TOUCH_DELAY, self._flushTouches)
        return succeed(None)

    def _flushTouches(self) -> Deferred[None]:
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
