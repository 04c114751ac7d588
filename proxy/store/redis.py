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

A TTL only collects garbage: the proxy judges expiry by its own clock, so a
record written already expired is kept a minute (``MIN_TTL``). Index entries
whose record has expired are dropped when they are next listed.
"""

from __future__ import annotations

import json
import math
import time

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from ..encryption import SecretKeyError, Secrets
from ..model import Account, OAuth2App, PendingAuthorization, Token
from ._interfaces import IAccountStore, ITokenStore
from ._redisbase import SCHEMA, _RedisStoreBase
from ._rediscodec import (
    MIN_TTL,
    _deferred,
    _expireAt,
    _float,
    _hash,
    _num,
    _pairs,
    _RedisRecords,
    _text,
)
from ._redisconn import DEFAULT_PREFIX, RedisAddress, StoreUnavailable, parseRedisURL
from ._redislua import (
    _ADD_PENDING,
    _ADD_TOKEN,
    _COLLECT,
    _GET_ACCOUNTS,
    _LIST_APPS,
    _LIST_TOKENS,
    _PUT_ACCOUNT,
    _PUT_APP,
    _REMOVE_ACCOUNT,
    _REMOVE_APP,
    _REMOVE_TOKEN,
    _ROTATE,
    _TAKE_PENDING,
    _UPDATE,
)
from .sqlite import StoreError

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


@implementer(IAccountStore, ITokenStore)
class RedisStore(_RedisRecords, _RedisStoreBase):
    """
    :param url: ``redis://…`` or ``unix://…``, see ``parseRedisURL``.
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
            self._account(_hash(a), _hash(app))
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
        s = self._secrets
        now = time.time()
        grant = account.oauth2
        # An account of a shared app keeps only its own refresh token; the
        # client side is read from the app, so an app change applies to all.
        # Replacing drops the saved access token: a changed account may point
        # at another mailbox or server.
        shared = grant.app is not None
        fields = {
            "id": account.id,
            "email": account.email,
            "imap_host": account.upstream.host,
            "imap_port": str(int(account.upstream.port)),
            "imap_tls": account.upstream.tls,
            "imap_ca_file": account.upstream.caFile,
            "token_url": "" if shared else grant.tokenURL,
            "client_id": "" if shared else grant.clientId,
            "client_secret_enc": s.encrypt("" if shared else grant.clientSecret),
            "refresh_token_enc": s.encrypt(grant.refreshToken),
            "oauth_scopes": json.dumps([] if shared else list(grant.scopes)),
            "state": account.state,
            "state_reason": account.stateReason,
            "updated": _num(now),
            "oauth2_app": grant.app,
        }
        keys = [self._key("account", account.id), self._key("accounts")]
        args = [self.address.prefix, account.id, _text(account.created or now), *_pairs(fields)]
        return self._eval(_PUT_ACCOUNT, keys, args).addCallback(lambda _: None)

    def removeAccount(self, accountId: str) -> Deferred[bool]:
        keys = [self._key("account", accountId), self._key("accounts")]
        d = self._eval(_REMOVE_ACCOUNT, keys, [self.address.prefix, accountId])
        return d.addCallback(lambda n: int(n) > 0)

    def _update(self, key: str, fields: dict[str, str | None]) -> Deferred[None]:
        """Set (or, for None, drop) fields of a record that exists; else nothing."""
        values = _pairs(fields)
        drop = [name for name, value in fields.items() if value is None]
        args = [str(len(values) // 2), *values, *drop]
        return self._eval(_UPDATE, [key], args).addCallback(lambda _: None)

    def setRefreshToken(self, accountId: str, refreshToken: str) -> Deferred[None]:
        return self._update(
            self._key("account", accountId),
            {
                "refresh_token_enc": self._secrets.encrypt(refreshToken),
                "updated": _num(time.time()),
            },
        )

    def setAccountState(self, accountId: str, state: str, reason: str | None) -> Deferred[None]:
        return self._update(
            self._key("account", accountId),
            {"state": state, "state_reason": reason, "updated": _num(time.time())},
        )

    @_deferred
    async def getAccessToken(self, accountId: str) -> tuple[str, float | None, float | None] | None:
        """
        :return: Deferred firing with ``(token, expires, lifetime)`` as saved
            by ``saveAccessToken``, or None.
        """
        enc, expires, lifetime = await self._call(
            "hmget",
            self._key("account", accountId),
            ["access_token_enc", "access_token_expires", "access_token_lifetime"],
        )
        if enc is None:
            return None
        return self._secrets.decrypt(enc), _float(expires), _float(lifetime)

    def saveAccessToken(
        self, accountId: str, token: str | None, expires: float | None, lifetime: float | None
    ) -> Deferred[None]:
        """Save (encrypted) or, with None, drop an account's provider access token."""
        return self._update(
            self._key("account", accountId),
            {
                "access_token_enc": None if token is None else self._secrets.encrypt(token),
                "access_token_expires": _num(expires),
                "access_token_lifetime": _num(lifetime),
            },
        )

    # -- secret keys ----------------------------------------------------------

    @_deferred
    async def rotateSecrets(self) -> int:
        """
        Re-encrypt every stored secret under the newest key, atomically: a
        compare-and-set of every ciphertext, retried if any changed meanwhile.
        :return: Deferred firing with how many values.
        """
        prefix = self.address.prefix
        for _ in range(ROTATE_ATTEMPTS):
            found = await self._collect()
            args = [prefix]
            for i in range(0, len(found), 3):
                key, field, value = found[i : i + 3]
                args += [key, field, value, self._secrets.rotate(value)]
            n = int(await self._eval(_ROTATE, [], args))
            if n >= 0:
                return n
        raise StoreError("the store kept changing while its secrets were rotated: try again")

    def _collect(self) -> Deferred[list[str]]:
        return self._eval(_COLLECT, [], [self.address.prefix])

    @_deferred
    async def undecryptable(self, secrets: Secrets) -> int:
        """
        :return: Deferred firing with how many stored secrets ``secrets``
            cannot decrypt (0 means older keys may be retired).
        """
        found = await self._collect()
        bad = 0
        for value in found[2::3]:
            try:
                secrets.decrypt(value)
            except SecretKeyError:
                bad += 1
        return bad

    def reloadSecrets(self) -> Deferred[bool]:
        """Re-read the key file in a thread; Deferred(True) if it changed."""
        return deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._secrets.reloadBlocking
        )

    # -- OAuth2 apps ----------------------------------------------------------

    @_deferred
    async def getApp(self, appId: str) -> OAuth2App | None:
        h = await self._call("hgetall", self._key("app", appId))
        return self._app(h) if h else None

    @_deferred
    async def listApps(self) -> list[OAuth2App]:
        reply = await self._eval(_LIST_APPS, [self._key("apps")], [self.address.prefix])
        return sorted((self._app(_hash(h)) for h in reply), key=lambda a: a.id)

    def putApp(self, app: OAuth2App) -> Deferred[None]:
        """Create or replace an app (all of it, its creation time too)."""
        now = time.time()
        fields = {
            "id": app.id,
            "provider": app.provider,
            "client_id": app.clientId,
            "client_secret_enc": self._secrets.encrypt(app.clientSecret),
            "redirect_url": app.redirectURL,
            "authorization_url": app.authorizationURL,
            "token_url": app.tokenURL,
            "device_url": app.deviceURL,
            "scopes": json.dumps(list(app.scopes)),
            "tenant": app.tenant,
            "created": _num(app.created or now),
            "updated": _num(now),
        }
        keys = [self._key("app", app.id), self._key("apps")]
        return self._eval(_PUT_APP, keys, [app.id, *_pairs(fields)]).addCallback(lambda _: None)

    @_deferred
    async def removeApp(self, appId: str) -> bool:
        """:return: Deferred(True) when removed; ``StoreError`` while accounts use it."""
        keys = [self._key("app", appId), self._key("apps"), self._key("app-accounts", appId)]
        n = int(await self._eval(_REMOVE_APP, keys, [appId]))
        if n < 0:
            raise StoreError(f"{-n} account(s) use this app")
        return n > 0

    # -- authorizations in progress -----------------------------------------

    @_deferred
    async def addPending(self, pending: PendingAuthorization) -> None:
        fields = {
            "state": pending.state,
            "account": pending.account,
            "app": pending.app,
            "verifier_enc": self._secrets.encrypt(pending.verifier),
            "email": pending.email,
            "expires": _num(pending.expires),
            "imap": pending.imap,
        }
        keys = [self._key("pending", pending.state), self._key("pendings")]
        now = str(math.floor(time.time() * 1000))
        args = [pending.state, _expireAt(pending.expires), now, *_pairs(fields)]
        if not int(await self._eval(_ADD_PENDING, keys, args)):
            raise StoreError("an authorization with this state is already in progress")

    @_deferred
    async def takePending(self, state: str) -> PendingAuthorization | None:
        """
        Remove and return the authorization with this state (single use), or
        None when there is none (or it has expired).
        """
        keys = [self._key("pending", state), self._key("pendings")]
        h = _hash(await self._eval(_TAKE_PENDING, keys, [state]))
        if not h:
            return None
        return PendingAuthorization(
            state=h["state"],
            account=h["account"],
            app=h["app"],
            verifier=self._secrets.decrypt(h["verifier_enc"]),
            email=h.get("email"),
            expires=float(h["expires"]),
            imap=h.get("imap"),
        )

    # -- tokens -------------------------------------------------------------

    @_deferred
    async def addToken(self, token: Token) -> None:
        fields = {
            "id": token.id,
            "account": token.account,
            "scopes": json.dumps(list(token.scopes)),
            "description": token.description,
            "addresses": json.dumps(list(token.addresses)),
            "created": _num(token.created),
            "expires": _num(token.expires),
        }
        keys = [self._key("token", token.id), self._key("tokens", "all")]
        if token.account is not None:
            keys.append(self._key("tokens", "account", token.account))
        expireAt = "" if token.expires is None else _expireAt(token.expires)
        args = [token.id, _text(token.created), expireAt, *_pairs(fields)]
        if not int(await self._eval(_ADD_TOKEN, keys, args)):
            raise StoreError("a token with this id exists")

    @_deferred
    async def getToken(self, tokenId: str) -> Token | None:
        h = await self._call("hgetall", self._key("token", tokenId))
        return self._token(h) if h else None

    @_deferred
    async def listTokens(self, account: str | None = None) -> list[Token]:
        """Newest first (ties by id); expired tokens' index entries are dropped."""
        if account is None:
            index = self._key("tokens", "all")
        else:
            index = self._key("tokens", "account", account)
        reply = await self._eval(_LIST_TOKENS, [index], [self.address.prefix])
        return sorted((self._token(_hash(h)) for h in reply), key=lambda t: (-t.created, t.id))

    def removeToken(self, tokenId: str) -> Deferred[bool]:
        keys = [self._key("token", tokenId), self._key("tokens", "all")]
        d = self._eval(_REMOVE_TOKEN, keys, [self.address.prefix, tokenId])
        return d.addCallback(lambda n: int(n) > 0)

    def touchToken(self, tokenId: str, when: float, address: str) -> Deferred[None]:
        return self._update(
            self._key("token", tokenId), {"last_use_time": _num(when), "last_use_address": address}
        )
