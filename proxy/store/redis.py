"""
The shared store: one Redis database (or a key prefix in one), for several
proxies behind a load balancer. Each operation is one command or one Lua
script, so it is atomic and takes one round trip (key rotation, two: a read,
then a compare-and-set of every ciphertext, repeated if anything changed).
Redis that is gone or hung fails operations with ``StoreUnavailable`` in
about ``timeout`` seconds; the connections come back by themselves.

Key layout (``prefix`` defaults to ``imapproxy:``)::

    meta                    hash: key_check (ciphertext), schema
    accounts                set of account ids
    account:<id>            hash, the columns of SQLite's ``accounts``
    app-accounts:<app>      set of the account ids that use an OAuth2 app
    apps                    set of OAuth2 app ids
    app:<id>                hash, the columns of ``oauth2_apps``
    pending:<state>         hash, with a TTL at its expiry
    pendings                sorted set of states by expiry (to find them)
    token:<id>              hash, with a TTL at its expiry (if it has one)
    tokens:all              sorted set of token ids by creation time
    tokens:account:<id>     the same, one account's tokens
    penalties               hash: source address -> "failures time" (login penalties)
    penalties-seen          sorted set of those addresses by last failure (to bound them)
    throttle:<proto>:<id>   "reason at until", with a TTL (provider throttling)

A TTL only collects garbage: the proxy judges expiry by its own clock, so a
record written already expired is kept a minute (``MIN_TTL``). Index entries
whose record has expired are dropped when they are next listed.
"""

from __future__ import annotations

import math
import time

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from ..encryption import SecretKeyError, Secrets
from ..model import Account, OAuth2App, PendingAuthorization, Token
from . import _records as R
from ._errors import StoreError
from ._interfaces import IRedisAccess, IStore
from ._redisbase import SCHEMA, _RedisStoreBase
from ._rediscodec import MIN_TTL, _deferred, _expireAt, _hash, _pairs, _text
from ._redisconn import DEFAULT_PREFIX, RedisAddress, StoreUnavailable, parseRedisURL
from ._redislua import (
    _ADD_PENDING,
    _ADD_TOKEN,
    _COLLECT,
    _GET_ACCOUNTS,
    _GET_TOKEN,
    _LIST_APPS,
    _LIST_TOKENS,
    _PUT_ACCOUNT,
    _PUT_APP,
    _REMOVE_ACCOUNT,
    _REMOVE_APP,
    _REMOVE_TOKEN,
    _ROTATE,
    _SET_STATE,
    _TAKE_PENDING,
    _UPDATE,
)
from ._redisthrottle import RedisThrottles

__all__ = [
    "DEFAULT_PREFIX",
    "MIN_TTL",
    "SCHEMA",
    "RedisAddress",
    "RedisStore",
    "StoreUnavailable",
    "parseRedisURL",
]

# Optimistic rotation attempts before giving up on a store that keeps changing.
ROTATE_ATTEMPTS = 10


@implementer(IStore, IRedisAccess)
class RedisStore(RedisThrottles, _RedisStoreBase):
    """
    :param url: ``redis://…``, ``unix://…`` or ``redis+sentinel://…``, see
        ``parseRedisURL``; writes that must survive a failover (accounts,
        refresh tokens, apps, tokens) wait for the Sentinel URL's replicas.
    :param secrets: encrypts provider secrets on the way in, decrypts on the
        way out, as in the SQLite store.
    :param timeout: seconds to connect, and to wait for a connection and for
        each reply; then the operation fails with ``StoreUnavailable``.
    :param poolSize: connections kept open to Redis.
    """

    # -- accounts -----------------------------------------------------------

    async def _accounts(self, mode: str, accountId: str = "") -> list[Account]:
        reply = await self._eval(_GET_ACCOUNTS, [], [self.address.prefix, mode, accountId])
        return [
            R.accountFrom(
                _hash(a), R.appFrom(_hash(app), self._secrets) if app else None, self._secrets
            )
            for a, app in zip(reply[::2], reply[1::2], strict=True)
        ]

    @_deferred
    async def getAccount(self, accountId: str) -> Account | None:
        found = await self._accounts("one", accountId)
        return found[0] if found else None

    @_deferred
    async def listAccounts(self) -> list[Account]:
        return sorted(await self._accounts("all"), key=lambda a: a.id)

    def putAccount(self, account: Account) -> Deferred[None]:
        # Replacing keeps the creation time (the script does) and drops the
        # saved access token (the record has none).
        record = R.accountRecord(account, self._secrets, time.time())
        created = record.pop("created")
        keys = [self._key("account", account.id), self._key("accounts")]
        args = [self.address.prefix, account.id, _text(created), *_pairs(record)]
        return self._eval(_PUT_ACCOUNT, keys, args, durable=True).addCallback(lambda _: None)

    def removeAccount(self, accountId: str) -> Deferred[bool]:
        keys = [self._key("account", accountId), self._key("accounts")]
        d = self._eval(_REMOVE_ACCOUNT, keys, [self.address.prefix, accountId], durable=True)
        return d.addCallback(lambda n: int(n) > 0)

    def _update(self, key: str, fields: dict[str, object], durable: bool = False) -> Deferred[None]:
        """Set (or, for None, drop) fields of a record that exists; else nothing."""
        values = _pairs(fields)
        drop = [name for name, value in fields.items() if value is None]
        args = [str(len(values) // 2), *values, *drop]
        return self._eval(_UPDATE, [key], args, durable).addCallback(lambda _: None)

    def setRefreshToken(self, accountId: str, refreshToken: str) -> Deferred[None]:
        # The provider may have retired the old one: this one must outlive a failover.
        fields = R.refreshTokenUpdate(refreshToken, self._secrets, time.time())
        return self._update(self._key("account", accountId), fields, durable=True)

    def setAccountState(
        self, accountId: str, state: str, reason: str | None
    ) -> Deferred[str | None]:
        # One script: of instances racing to the same state, one sees the old.
        fields = R.stateUpdate(state, reason, time.time())
        values = _pairs(fields)
        drop = [name for name, value in fields.items() if value is None]
        args = [str(len(values) // 2), *values, *drop]
        d = self._eval(_SET_STATE, [self._key("account", accountId)], args)
        return d.addCallback(lambda old: str(old) if old else None)

    @_deferred
    async def getAccessToken(self, accountId: str) -> tuple[str, float | None, float | None] | None:
        values = await self._call("hmget", self._key("account", accountId), list(R.ACCESS_COLUMNS))
        return R.accessFrom(dict(zip(R.ACCESS_COLUMNS, values, strict=True)), self._secrets)

    def saveAccessToken(
        self, accountId: str, token: str | None, expires: float | None, lifetime: float | None
    ) -> Deferred[None]:
        fields = R.accessRecord(token, expires, lifetime, self._secrets)
        return self._update(self._key("account", accountId), fields)

    # -- secret keys ----------------------------------------------------------

    @_deferred
    async def rotateSecrets(self) -> int:
        """
        A compare-and-set of every ciphertext, retried if any changed meanwhile.
        """
        prefix = self.address.prefix
        for _ in range(ROTATE_ATTEMPTS):
            found = await self._collect()
            args = [prefix]
            for i in range(0, len(found), 3):
                key, field, value = found[i : i + 3]
                args += [key, field, value, self._secrets.rotate(value)]
            n = int(await self._eval(_ROTATE, [], args, durable=True))
            if n >= 0:
                return n
        raise StoreError("the store kept changing while its secrets were rotated: try again")

    def _collect(self) -> Deferred[list[str]]:
        return self._eval(_COLLECT, [], [self.address.prefix])

    @_deferred
    async def undecryptable(self, secrets: Secrets) -> int:
        found = await self._collect()
        bad = 0
        for value in found[2::3]:
            try:
                secrets.decrypt(value)
            except SecretKeyError:
                bad += 1
        return bad

    def reloadSecrets(self) -> Deferred[bool]:
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._secrets.reloadBlocking
        )

    # -- OAuth2 apps ----------------------------------------------------------

    @_deferred
    async def getApp(self, appId: str) -> OAuth2App | None:
        h = await self._call("hgetall", self._key("app", appId))
        return R.appFrom(h, self._secrets) if h else None

    @_deferred
    async def listApps(self) -> list[OAuth2App]:
        reply = await self._eval(_LIST_APPS, [self._key("apps")], [self.address.prefix])
        return sorted((R.appFrom(_hash(h), self._secrets) for h in reply), key=lambda a: a.id)

    def putApp(self, app: OAuth2App) -> Deferred[None]:
        record = R.appRecord(app, self._secrets, time.time())
        keys = [self._key("app", app.id), self._key("apps")]
        d = self._eval(_PUT_APP, keys, [app.id, *_pairs(record)], durable=True)
        return d.addCallback(lambda _: None)

    @_deferred
    async def removeApp(self, appId: str) -> bool:
        keys = [self._key("app", appId), self._key("apps"), self._key("app-accounts", appId)]
        n = int(await self._eval(_REMOVE_APP, keys, [appId], durable=True))
        if n < 0:
            raise R.appInUse(-n)
        return n > 0

    # -- authorizations in progress -----------------------------------------

    @_deferred
    async def addPending(self, pending: PendingAuthorization) -> None:
        record = R.pendingRecord(pending, self._secrets)
        keys = [self._key("pending", pending.state), self._key("pendings")]
        now = str(math.floor(time.time() * 1000))
        args = [pending.state, _expireAt(pending.expires), now, *_pairs(record)]
        if not int(await self._eval(_ADD_PENDING, keys, args)):
            raise R.pendingExists()

    @_deferred
    async def takePending(self, state: str) -> PendingAuthorization | None:
        """Expired ones are gone (their TTL)."""
        keys = [self._key("pending", state), self._key("pendings")]
        h = _hash(await self._eval(_TAKE_PENDING, keys, [state]))
        return R.pendingFrom(h, self._secrets) if h else None

    # -- tokens -------------------------------------------------------------

    @_deferred
    async def addToken(self, token: Token) -> None:
        record = R.tokenRecord(token)
        keys = [self._key("token", token.id), self._key("tokens", "all")]
        if token.account is not None:
            keys.append(self._key("tokens", "account", token.account))
        expireAt = "" if token.expires is None else _expireAt(token.expires)
        args = [token.id, _text(token.created), expireAt, *_pairs(record)]
        if not int(await self._eval(_ADD_TOKEN, keys, args, durable=True)):
            raise R.tokenExists()

    @_deferred
    async def getToken(self, tokenId: str) -> Token | None:
        keys = [self._key("meta"), self._key("token", tokenId)]
        marker, h = await self._eval(_GET_TOKEN, keys, [])
        self._marker.check(marker)
        return R.tokenFrom(_hash(h)) if h else None

    @_deferred
    async def listTokens(self, account: str | None = None) -> list[Token]:
        """Expired tokens' index entries are dropped."""
        if account is None:
            index = self._key("tokens", "all")
        else:
            index = self._key("tokens", "account", account)
        reply = await self._eval(_LIST_TOKENS, [index], [self.address.prefix])
        return sorted((R.tokenFrom(_hash(h)) for h in reply), key=R.tokenOrder)

    def removeToken(self, tokenId: str) -> Deferred[bool]:
        keys = [self._key("token", tokenId), self._key("tokens", "all")]
        d = self._eval(_REMOVE_TOKEN, keys, [self.address.prefix, tokenId], durable=True)
        return d.addCallback(lambda n: int(n) > 0)

    def touchToken(self, tokenId: str, when: float, address: str) -> Deferred[None]:
        return self._update(
            self._key("token", tokenId), {"last_use_time": when, "last_use_address": address}
        )
