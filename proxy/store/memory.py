"""
A store in memory: the same interfaces, records and rules as the SQLite and
Redis stores (it keeps the very records they keep, secrets encrypted), for
unit tests and trials. Every Deferred it returns has already fired, so code
over it runs to the end within the call; nothing survives the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from cryptography.fernet import Fernet
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from ..encryption import SecretKeyError, Secrets
from ..model import Account, OAuth2App, PendingAuthorization, Token
from . import _records as R
from ._errors import KEY_CHECK, MarkerWatch, StoreError, keyMatches, wrongKey
from ._interfaces import IStore
from ._throttles import LocalThrottles

T = TypeVar("T")


@attrs.define
class MemoryData:
    """
    What a memory store holds; several store objects may share one, as
    several processes share a file or a Redis.
    """

    meta: dict[str, str] = attrs.Factory(dict)
    accounts: dict[str, R.Record] = attrs.Factory(dict)
    apps: dict[str, R.Record] = attrs.Factory(dict)
    tokens: dict[str, R.Record] = attrs.Factory(dict)
    pending: dict[str, R.Record] = attrs.Factory(dict)

    def wipe(self) -> None:
        """Lose everything, as a Redis restarted without persistence does."""
        for table in (self.meta, self.accounts, self.apps, self.tokens, self.pending):
            table.clear()


@implementer(IStore)
class MemoryStore(LocalThrottles, Service):
    """
    :param secrets: the keys; a new random one when not given.
    :param clock: ``IReactorTime`` (or anything with ``seconds()``) for the
        creation and update times; the wall clock when not given.
    :param data: the records, to share them with another store object.
    """

    def __init__(
        self, secrets: Secrets | None = None, clock: Any = None, data: MemoryData | None = None
    ):
        self._secrets = secrets if secrets is not None else Secrets([Fernet.generate_key()])
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time
        self.data = data if data is not None else MemoryData()
        self.path = "memory"
        self._state = "new"
        self._marker = MarkerWatch(self.path, "the store was wiped?")

    @property
    def secrets(self) -> Secrets:
        return self._secrets

    # -- life cycle ---------------------------------------------------------

    def openBlocking(self) -> None:
        if self._state == "closed":
            raise StoreError("the store is closed")
        meta = self.data.meta
        meta.setdefault("key_check", self._secrets.encrypt(KEY_CHECK))
        meta.setdefault("store_id", R.newMarker())
        meta.setdefault("created", repr(self._now()))
        if not keyMatches(self._secrets, meta["key_check"]):
            raise wrongKey(self.path)
        self._marker.expected = meta["store_id"]
        self._state = "open"

    def closeBlocking(self) -> None:
        if self._state == "open":
            self._state = "new"

    def open(self) -> Deferred[None]:
        return maybeDeferred(self.openBlocking)

    def close(self) -> Deferred[None]:
        self._state = "closed"
        return succeed(None)

    def startService(self) -> None:
        super().startService()
        if self._state == "new":
            self.openBlocking()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

    def _run(self, f: Callable[[], T]) -> Deferred[T]:
        """Run ``f`` now if the store is open; its result or failure as a Deferred."""
        if self._state != "open":
            why = "closed" if self._state == "closed" else "not open"
            return fail(StoreError(f"the store is {why}"))
        return maybeDeferred(f)

    def checkHealth(self) -> Deferred[None]:
        return self._run(lambda: self._marker.check(self.data.meta.get("store_id")))

    # -- accounts -----------------------------------------------------------

    def _account(self, record: R.Record) -> Account:
        appId = record.get("oauth2_app")
        app = self.data.apps.get(appId) if appId is not None else None
        return R.accountFrom(record, R.appFrom(app, self._secrets) if app else None, self._secrets)

    def getAccount(self, accountId: str) -> Deferred[Account | None]:
        def q() -> Account | None:
            record = self.data.accounts.get(accountId)
            return None if record is None else self._account(record)

        return self._run(q)

    def listAccounts(self) -> Deferred[list[Account]]:
        accounts = self.data.accounts
        return self._run(lambda: [self._account(accounts[k]) for k in sorted(accounts)])

    def putAccount(self, account: Account) -> Deferred[None]:
        def q() -> None:
            record = R.accountRecord(account, self._secrets, self._now())
            old = self.data.accounts.get(account.id)
            if old is not None:
                record["created"] = old["created"]
            # No access columns: a changed account drops its saved token.
            self.data.accounts[account.id] = record

        return self._run(q)

    def removeAccount(self, accountId: str) -> Deferred[bool]:
        def q() -> bool:
            tokens = self.data.tokens
            for tid in [t for t, r in tokens.items() if r["account"] == accountId]:
                del tokens[tid]
            return self.data.accounts.pop(accountId, None) is not None

        return self._run(q)

    def _update(self, table: dict[str, R.Record], key: str, fields: R.Record) -> Deferred[None]:
        def q() -> None:
            if key in table:
                table[key].update(fields)

        return self._run(q)

    def setRefreshToken(self, accountId: str, refreshToken: str) -> Deferred[None]:
        fields = R.refreshTokenUpdate(refreshToken, self._secrets, self._now())
        return self._update(self.data.accounts, accountId, fields)

    def setAccountState(
        self, accountId: str, state: str, reason: str | None
    ) -> Deferred[str | None]:
        fields = R.stateUpdate(state, reason, self._now())

        def q() -> str | None:
            record = self.data.accounts.get(accountId)
            if record is None:
                return None
            old = record["state"]
            record.update(fields)
            return str(old)

        return self._run(q)

    def getAccessToken(
        self, accountId: str
    ) -> Deferred[tuple[str, float | None, float | None] | None]:
        def q() -> tuple[str, float | None, float | None] | None:
            record = self.data.accounts.get(accountId)
            return None if record is None else R.accessFrom(record, self._secrets)

        return self._run(q)

    def saveAccessToken(
        self, accountId: str, token: str | None, expires: float | None, lifetime: float | None
    ) -> Deferred[None]:
        fields = R.accessRecord(token, expires, lifetime, self._secrets)
        return self._update(self.data.accounts, accountId, fields)

    # -- secret keys ----------------------------------------------------------

    def _ciphertexts(self) -> list[tuple[R.Record | dict[str, str], str]]:
        """Where every ciphertext is: (record, column)."""
        found: list[tuple[R.Record | dict[str, str], str]] = [(self.data.meta, "key_check")]
        for kind, table in (
            ("accounts", self.data.accounts),
            ("apps", self.data.apps),
            ("pending", self.data.pending),
        ):
            for record in table.values():
                found += [(record, c) for c in R.ENCRYPTED[kind] if record.get(c) is not None]
        return found

    def rotateSecrets(self) -> Deferred[int]:
        def q() -> int:
            places = self._ciphertexts()
            # All or nothing: every value is re-encrypted before one is written.
            new = [self._secrets.rotate(record[column]) for record, column in places]
            for (record, column), value in zip(places, new, strict=True):
                record[column] = value
            return len(places)

        return self._run(q)

    def undecryptable(self, secrets: Secrets) -> Deferred[int]:
        def q() -> int:
            bad = 0
            for record, column in self._ciphertexts():
                try:
                    secrets.decrypt(record[column])
                except SecretKeyError:
                    bad += 1
            return bad

        return self._run(q)

    def reloadSecrets(self) -> Deferred[bool]:
        # A key file is small; tests have none or a temporary one.
        return maybeDeferred(self._secrets.reloadBlocking)

    # -- OAuth2 apps ----------------------------------------------------------

    def getApp(self, appId: str) -> Deferred[OAuth2App | None]:
        def q() -> OAuth2App | None:
            record = self.data.apps.get(appId)
            return None if record is None else R.appFrom(record, self._secrets)

        return self._run(q)

    def listApps(self) -> Deferred[list[OAuth2App]]:
        apps = self.data.apps
        return self._run(lambda: [R.appFrom(apps[k], self._secrets) for k in sorted(apps)])

    def putApp(self, app: OAuth2App) -> Deferred[None]:
        def q() -> None:
            self.data.apps[app.id] = R.appRecord(app, self._secrets, self._now())

        return self._run(q)

    def removeApp(self, appId: str) -> Deferred[bool]:
        def q() -> bool:
            used = sum(1 for r in self.data.accounts.values() if r.get("oauth2_app") == appId)
            if used:
                raise R.appInUse(used)
            return self.data.apps.pop(appId, None) is not None

        return self._run(q)

    # -- authorizations in progress -----------------------------------------

    def addPending(self, pending: PendingAuthorization) -> Deferred[None]:
        def q() -> None:
            table = self.data.pending
            now = self._now()
            for state in [s for s, r in table.items() if r["expires"] < now]:
                del table[state]
            if pending.state in table:
                raise R.pendingExists()
            table[pending.state] = R.pendingRecord(pending, self._secrets)

        return self._run(q)

    def takePending(self, state: str) -> Deferred[PendingAuthorization | None]:
        def q() -> PendingAuthorization | None:
            record = self.data.pending.pop(state, None)
            return None if record is None else R.pendingFrom(record, self._secrets)

        return self._run(q)

    # -- tokens -------------------------------------------------------------

    def addToken(self, token: Token) -> Deferred[None]:
        def q() -> None:
            if token.id in self.data.tokens:
                raise R.tokenExists()
            self.data.tokens[token.id] = R.tokenRecord(token)

        return self._run(q)

    def getToken(self, tokenId: str) -> Deferred[Token | None]:
        def q() -> Token | None:
            self._marker.check(self.data.meta.get("store_id"))
            record = self.data.tokens.get(tokenId)
            return None if record is None else R.tokenFrom(record)

        return self._run(q)

    def listTokens(self, account: str | None = None) -> Deferred[list[Token]]:
        def q() -> list[Token]:
            found = [
                R.tokenFrom(r)
                for r in self.data.tokens.values()
                if account is None or r["account"] == account
            ]
            return sorted(found, key=R.tokenOrder)

        return self._run(q)

    def removeToken(self, tokenId: str) -> Deferred[bool]:
        return self._run(lambda: self.data.tokens.pop(tokenId, None) is not None)

    def touchToken(self, tokenId: str, when: float, address: str) -> Deferred[None]:
        return self._update(
            self.data.tokens, tokenId, {"last_use_time": when, "last_use_address": address}
        )
