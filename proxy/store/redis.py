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
import socket
import time
from collections.abc import Callable, Coroutine, Generator
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import (
    Deferred,
    ensureDeferred,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ..encryption import SecretKeyError, Secrets
from ..model import Account, OAuth2App, OAuth2Grant, PendingAuthorization, Token, Upstream
from ._interfaces import IAccountStore, ITokenStore
from .sqlite import _KEY_CHECK, StoreError

__all__ = ["RedisAddress", "RedisStore", "StoreUnavailable", "parseRedisURL"]

T = TypeVar("T")

DEFAULT_PREFIX = "imapproxy:"
SCHEMA = "1"
# A record written already expired (by the wall clock) is kept this long: the
# proxy decides expiry with its own clock, which tests replace.
MIN_TTL = 60.0
# Optimistic rotation attempts before giving up on a store that keeps changing.
ROTATE_ATTEMPTS = 10


class StoreUnavailable(StoreError):
    """Redis cannot be reached or does not answer in time: worth retrying."""


# -- addresses ----------------------------------------------------------------


@attrs.frozen
class RedisAddress:
    """Where the store lives; ``path`` (a Unix socket) or ``host``/``port``."""

    host: str | None = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX

    def describe(self) -> str:
        """The URL without its credentials: safe for messages and logs."""
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """
    ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix:///path/to/socket[?db=N]``; both take ``?prefix=`` (the key
    prefix), and a Unix socket ``?password=`` (and ``?username=``).

    :raises StoreError: for anything else.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "unix"):
        raise StoreError(
            f"not a Redis store URL: scheme {parts.scheme!r} (use redis:// or unix://)"
        )
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("db", "prefix", "password", "username") or name in query:
            raise StoreError(f"the Redis store URL has an unknown or repeated parameter {name!r}")
        query[name] = value
    dbText = query.get("db")
    if parts.scheme == "redis":
        if "password" in query or "username" in query:
            raise StoreError("give the Redis password as redis://:password@host/")
        try:
            port = parts.port or 6379
        except ValueError:
            raise StoreError("the Redis store URL has a bad port") from None
        path = parts.path.strip("/")
        if path:
            if dbText is not None:
                raise StoreError("the Redis store URL gives the database twice")
            dbText = path
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        address = RedisAddress(
            host=parts.hostname or "localhost", port=port, username=username, password=password
        )
    else:
        if parts.netloc:
            raise StoreError("a unix:// store URL names a socket path: unix:///path/to/socket")
        if not parts.path:
            raise StoreError("the unix:// store URL names no socket")
        address = RedisAddress(
            host=None,
            path=unquote(parts.path),
            username=query.get("username") or None,
            password=query.get("password") or None,
        )
    db = 0
    if dbText is not None:
        if not dbText.isdigit() or not dbText.isascii():
            raise StoreError(f"the Redis database must be a number, not {dbText!r}")
        db = int(dbText)
    return attrs.evolve(address, db=db, prefix=query.get("prefix", DEFAULT_PREFIX))


# -- Lua scripts ----------------------------------------------------------------
# Keys are built from the prefix inside some scripts: fine for one Redis (and a
# prefix with a {hash tag} keeps them in one cluster slot).

_OPEN = """
redis.call('HSETNX', KEYS[1], 'key_check', ARGV[1])
redis.call('HSETNX', KEYS[1], 'schema', ARGV[2])
return redis.call('HMGET', KEYS[1], 'key_check', 'schema')
"""

# Set fields (and drop others) of a hash that exists; never creates one.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + 2 * n)) end
if #ARGV > 1 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 2 + 2 * n)) end
return 1
"""

_PUT_ACCOUNT = """
local p, id = ARGV[1], ARGV[2]
local old = redis.call('HMGET', KEYS[1], 'created', 'oauth2_app')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'created', old[1] or ARGV[3], unpack(ARGV, 4))
local app = redis.call('HGET', KEYS[1], 'oauth2_app')
if old[2] and old[2] ~= app then redis.call('SREM', p .. 'app-accounts:' .. old[2], id) end
if app then redis.call('SADD', p .. 'app-accounts:' .. app, id) end
redis.call('SADD', KEYS[2], id)
return 1
"""

# Pairs of (account hash, its app's hash or {}): one id, or every account.
_GET_ACCOUNTS = """
local p = ARGV[1]
local ids = {ARGV[3]}
if ARGV[2] == 'all' then ids = redis.call('SMEMBERS', p .. 'accounts') end
local out = {}
for _, id in ipairs(ids) do
  local a = redis.call('HGETALL', p .. 'account:' .. id)
  if #a > 0 then
    local app = redis.call('HGET', p .. 'account:' .. id, 'oauth2_app')
    out[#out + 1] = a
    out[#out + 1] = app and redis.call('HGETALL', p .. 'app:' .. app) or {}
  end
end
return out
"""

_REMOVE_ACCOUNT = """
local p, id = ARGV[1], ARGV[2]
local zkey = p .. 'tokens:account:' .. id
for _, t in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  redis.call('DEL', p .. 'token:' .. t)
  redis.call('ZREM', p .. 'tokens:all', t)
end
redis.call('DEL', zkey)
local app = redis.call('HGET', KEYS[1], 'oauth2_app')
if app then redis.call('SREM', p .. 'app-accounts:' .. app, id) end
redis.call('SREM', KEYS[2], id)
return redis.call('DEL', KEYS[1])
"""

_PUT_APP = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_LIST_APPS = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local a = redis.call('HGETALL', ARGV[1] .. 'app:' .. id)
  if #a > 0 then out[#out + 1] = a end
end
return out
"""

_REMOVE_APP = """
local used = redis.call('SCARD', KEYS[3])
if used > 0 then return -used end
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

_ADD_PENDING = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

_TAKE_PENDING = """
local h = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return h
"""

_ADD_TOKEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[3] then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
return 1
"""

_LIST_TOKENS = """
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. 'token:' .. id)
  if #h == 0 then redis.call('ZREM', KEYS[1], id) else out[#out + 1] = h end
end
return out
"""

_REMOVE_TOKEN = """
local account = redis.call('HGET', KEYS[1], 'account')
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if account then redis.call('ZREM', ARGV[1] .. 'tokens:account:' .. account, ARGV[2]) end
return n
"""

# Every encrypted value, as (key, field, ciphertext) triples.
_COLLECT_FUNCTION = """
local function collect(p)
  local out = {}
  local function add(key, field)
    local v = redis.call('HGET', key, field)
    if v then out[#out + 1] = key; out[#out + 1] = field; out[#out + 1] = v end
  end
  add(p .. 'meta', 'key_check')
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'accounts')) do
    local k = p .. 'account:' .. id
    add(k, 'client_secret_enc'); add(k, 'refresh_token_enc'); add(k, 'access_token_enc')
  end
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'apps')) do
    add(p .. 'app:' .. id, 'client_secret_enc')
  end
  for _, s in ipairs(redis.call('ZRANGE', p .. 'pendings', 0, -1)) do
    add(p .. 'pending:' .. s, 'verifier_enc')
  end
  return out
end
"""

_COLLECT = _COLLECT_FUNCTION + "return collect(ARGV[1])\n"

# Compare-and-set of every encrypted value: ARGV[1] the prefix, then
# (key, field, old, new) quadruples. Applies all only if the ciphertexts are
# exactly those that were read (none changed, none added); else -1.
_ROTATE = (
    _COLLECT_FUNCTION
    + """
local current = collect(ARGV[1])
if #current / 3 ~= (#ARGV - 1) / 4 then return -1 end
local seen = {}
for i = 1, #current, 3 do seen[current[i] .. '\\0' .. current[i + 1]] = current[i + 2] end
for i = 2, #ARGV, 4 do
  if seen[ARGV[i] .. '\\0' .. ARGV[i + 1]] ~= ARGV[i + 2] then return -1 end
end
for i = 2, #ARGV, 4 do redis.call('HSET', ARGV[i], ARGV[i + 1], ARGV[i + 3]) end
return (#ARGV - 1) / 4
"""
)


# -- helpers ------------------------------------------------------------------------


def _deferred(f: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Deferred[T]]:
    """Run an ``async def`` method as a Deferred-returning one."""

    @wraps(f)
    def method(*args: Any, **kwargs: Any) -> Deferred[T]:
        return ensureDeferred(f(*args, **kwargs))

    return method


def _hash(pairs: list[Any]) -> dict[str, str]:
    """A flat HGETALL reply as a dict."""
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs to set; None fields are left out (absent means NULL)."""
    out: list[str] = []
    for name, value in fields.items():
        if value is not None:
            out += [name, value]
    return out


def _num(value: float | None) -> str | None:
    return None if value is None else _text(value)


def _text(value: float) -> str:
    """A float as text that reads back exactly (txredisapi would round it)."""
    return repr(float(value))


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _expireAt(expires: float) -> str:
    """The PEXPIREAT time (ms) for a record that expires at ``expires``."""
    return str(math.ceil(max(expires, time.time() + MIN_TTL) * 1000))


_UNAVAILABLE = (
    defer.CancelledError,
    defer.TimeoutError,
    txredisapi.ConnectionError,
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
)
# Redis error replies that mean "not now" rather than "never".
_TRANSIENT = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "NOAUTH")


# -- the store --------------------------------------------------------------------------


@implementer(IAccountStore, ITokenStore)
class RedisStore(Service):
    """
    :param url: ``redis://…`` or ``unix://…``, see ``parseRedisURL``.
    :param secrets: encrypts provider secrets on the way in, decrypts on the
        way out, as in the SQLite store.
    :param timeout: seconds to connect, and to wait for a connection and for
        each reply; then the operation fails with ``StoreUnavailable``.
    :param poolSize: connections kept open to Redis.
    """

    log = Logger()
    # Reconnection back-off after an outage, in seconds.
    retryInitialDelay = 0.2
    retryMaxDelay = 2.0

    def __init__(
        self,
        url: str,
        secrets: Secrets,
        reactor: Any = None,
        *,
        timeout: float = 2.0,
        poolSize: int = 3,
    ):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.address = parseRedisURL(url)
        # Where the store is, without credentials: SQLiteStore.path's counterpart.
        self.path = self.address.describe()
        self._secrets = secrets
        self._reactor = reactor
        self.timeout = timeout
        self.poolSize = poolSize
        self._redis: Any = None
        self._open = False
        self._closed = False
        self._available = True
        self._lastConnectError: str | None = None
        self._pending: set[Deferred[Any]] = set()

    @property
    def secrets(self) -> Secrets:
        return self._secrets

    def _key(self, *parts: str) -> str:
        return self.address.prefix + ":".join(parts)

    # -- life cycle -----------------------------------------------------------

    def open(self) -> Deferred[None]:
        """
        Connect, and check the key against the store (creating the check on
        first use).

        :return: Deferred firing when the store is usable; errback
            ``StoreError`` when Redis cannot be reached or the key is wrong.
        """
        if self._closed:
            return fail(StoreError("the store is closed"))
        self._open = True
        return ensureDeferred(self._openAsync())

    async def _openAsync(self) -> None:
        check = self._secrets.encrypt(_KEY_CHECK)
        try:
            try:
                stored = await self._eval(_OPEN, [self._key("meta")], [check, SCHEMA])
            except StoreUnavailable:
                why = f": {self._lastConnectError}" if self._lastConnectError else ""
                raise StoreUnavailable(
                    f"the Redis store {self.address.describe()} is unavailable{why}"
                ) from None
            self._checkKey(stored)
        except BaseException:
            self._open = False
            redis, self._redis = self._redis, None
            if redis is not None:
                await redis.disconnect()
            raise

    def openBlocking(self) -> None:
        """
        Check the connection and the key in the calling thread, over a plain
        socket: only before the reactor runs (``twistd`` and the CLI check a
        store before they start). The store is then open; its connections
        are made when it is first used, from the reactor.
        """
        if self._closed:
            raise StoreError("the store is closed")
        check = self._secrets.encrypt(_KEY_CHECK)
        command = ["EVAL", _OPEN, "1", self._key("meta"), check, SCHEMA]
        self._checkKey(_blockingCommand(self.address, self.timeout, command))
        self._open = True

    def _closeBlocking(self) -> None:
        """Undo ``openBlocking`` (no connection is open yet), to open again."""
        if self._redis is None:
            self._open = False

    def _checkKey(self, stored: list[Any]) -> None:
        value, schema = stored
        if schema != SCHEMA:
            raise StoreError(
                f"the Redis store {self.address.describe()} has data layout {schema!r}; "
                f"this version of imapproxy knows {SCHEMA!r}"
            )
        try:
            ok = self._secrets.decrypt(value) == _KEY_CHECK
        except SecretKeyError:
            ok = False
        if not ok:
            raise StoreError(
                f"the secret key does not match the store {self.address.describe()}: "
                "refusing to start (give the key the store's secrets were last "
                "encrypted with: the newest one after 'imapproxy secrets rotate')"
            )

    def close(self) -> Deferred[None]:
        """Close the connections; operations still waiting fail with StoreError."""
        if self._closed:
            return succeed(None)
        self._closed = True
        self._open = False
        for d in list(self._pending):
            d.cancel()
        redis, self._redis = self._redis, None
        if redis is None:
            return succeed(None)
        return gatherResults([redis.disconnect()], consumeErrors=True).addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        if not self._open:
            self.open().addErrback(self._openFailed)

    def _openFailed(self, failure: Any) -> None:
        self.log.failure("the store could not be opened", failure)
        self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

    # -- talking to Redis ---------------------------------------------------------

    def _client(self) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        if not self._open:
            raise StoreError("the store is not open")
        if self._redis is None:
            self._redis = self._connect()
        return self._redis

    def _connect(self) -> Any:
        a = self.address
        factory = txredisapi.RedisFactory(
            a.describe(),
            a.db or None,
            self.poolSize,
            isLazy=True,
            password=a.password,
            username=a.username,
            replyTimeout=self.timeout,
            # Values are text: "007" must not come back as 7.
            convertNumbers=False,
        )
        factory.protocol = _RedisProtocol
        factory.initialDelay = self.retryInitialDelay
        factory.maxDelay = self.retryMaxDelay
        # Fires only when a connection is refused for good (bad password or
        # database); txredisapi then stops trying, and says why here.
        factory.deferred.addErrback(self._connectFailed)
        if a.path is not None:
            endpoint: Any = UNIXClientEndpoint(self._reactor, a.path, timeout=self.timeout)
        else:
            endpoint = HostnameEndpoint(
                self._reactor, a.host or "localhost", a.port, timeout=self.timeout
            )
        factory.startConnecting(endpoint)
        return factory.handler

    def _connectFailed(self, failure: Any) -> None:
        self._lastConnectError = failure.getErrorMessage()
        self.log.error(
            "the Redis store {where} refused the connection: {why}",
            where=self.address.describe(),
            why=self._lastConnectError,
        )
        # Nothing will connect now: fail what waits for a connection.
        for d in list(self._pending):
            d.cancel()

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        """One command (or script) with a deadline; Redis errors as StoreError."""
        try:
            client = self._client()
        except StoreError as e:
            return fail(e)
        d = getattr(client, method)(*args)
        # A little longer than the reply timeout, which also drops a hung
        # connection; this one bounds the wait for a connection too.
        d.addTimeout(self.timeout + 0.5, self._reactor)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d.addCallbacks(self._succeeded, self._failed)

    def _eval(self, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        # txredisapi runs EVALSHA once a connection has seen the script.
        return self._call("eval", script, keys, args)

    def _succeeded(self, result: Any) -> Any:
        if not self._available:
            self._available = True
            self.log.info("the Redis store {where} is available", where=self.address.describe())
        return result

    def _failed(self, failure: Any) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        unavailable = failure.check(*_UNAVAILABLE) is not None
        if failure.check(txredisapi.ResponseError):
            message = str(failure.value).strip()
            if message.split(" ", 1)[0] not in _TRANSIENT:
                raise StoreError(f"the Redis store refused a command: {message[:200]}")
            unavailable = True
        if failure.check(txredisapi.InvalidData):
            raise StoreError("a value cannot be stored: it is not valid text")
        if not unavailable and failure.check(txredisapi.RedisError):
            raise StoreError("the Redis store gave an unexpected reply")
        if not unavailable:
            return failure
        if self._available:
            self._available = False
            self.log.warn(
                "the Redis store {where} is unavailable: {why}",
                where=self.address.describe(),
                why=failure.getErrorMessage() or failure.type.__name__,
            )
        raise StoreUnavailable("the Redis store is unavailable")

    # -- accounts -----------------------------------------------------------

    def _account(self, h: dict[str, str], appHash: dict[str, str]) -> Account:
        decrypt = self._secrets.decrypt
        appId = h.get("oauth2_app")
        if appId is not None and appHash:
            # The client side of the grant is the shared app's.
            app = self._app(appHash)
            grant = OAuth2Grant(
                tokenURL=app.tokenURL,
                clientId=app.clientId,
                clientSecret=app.clientSecret,
                refreshToken=decrypt(h["refresh_token_enc"]),
                scopes=tuple(app.scopes),
                app=appId,
            )
        else:
            grant = OAuth2Grant(
                tokenURL=h["token_url"],
                clientId=h["client_id"],
                clientSecret=decrypt(h["client_secret_enc"]),
                refreshToken=decrypt(h["refresh_token_enc"]),
                scopes=tuple(json.loads(h["oauth_scopes"])),
            )
        return Account(
            id=h["id"],
            email=h["email"],
            upstream=Upstream(
                host=h["imap_host"],
                port=int(h["imap_port"]),
                tls=h["imap_tls"],
                caFile=h.get("imap_ca_file"),
            ),
            oauth2=grant,
            state=h["state"],
            stateReason=h.get("state_reason"),
            created=float(h["created"]),
            updated=float(h["updated"]),
        )

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

    def _app(self, h: dict[str, str]) -> OAuth2App:
        return OAuth2App(
            id=h["id"],
            provider=h["provider"],
            clientId=h["client_id"],
            clientSecret=self._secrets.decrypt(h["client_secret_enc"]),
            redirectURL=h.get("redirect_url"),
            authorizationURL=h.get("authorization_url"),
            tokenURL=h["token_url"],
            deviceURL=h.get("device_url"),
            scopes=tuple(json.loads(h["scopes"])),
            tenant=h["tenant"],
            created=float(h["created"]),
            updated=float(h["updated"]),
        )

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

    @staticmethod
    def _token(h: dict[str, str]) -> Token:
        return Token(
            id=h["id"],
            account=h.get("account"),
            scopes=tuple(json.loads(h["scopes"])),
            description=h["description"],
            addresses=tuple(json.loads(h["addresses"])),
            created=float(h["created"]),
            expires=_float(h.get("expires")),
            lastUseTime=_float(h.get("last_use_time")),
            lastUseAddress=h.get("last_use_address"),
        )

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


class _RedisProtocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol, except that a login or SELECT that gets no answer
    (Redis hung, or the connection lost) is retried by reconnecting, where
    txredisapi would stop reconnecting for good. A refusal (wrong password, no
    such database) still stops it.
    """

    _waiting_for_connect: list[Deferred[Any]]

    @inlineCallbacks
    def connectionMade(self) -> Generator[Deferred[Any], Any, None]:
        try:
            if self.password is not None:
                yield self.auth(self.password, self.username)
            if self.dbid is not None:
                yield self.select(self.dbid)
        except txredisapi.ResponseError as e:
            if str(e).split(" ", 1)[0] not in _TRANSIENT:
                self.factory.stopTrying()
                self.transport.loseConnection()
                self.factory.connectionError(f"could not log in or select the database: {e}")
                return
            self.transport.abortConnection()
            return
        except Exception:
            self.transport.abortConnection()
            return
        self.connected = 1
        self._ready = True
        waiting, self._waiting_for_connect = self._waiting_for_connect, []
        for d in waiting:
            d.callback(self)


# -- a blocking client, for openBlocking only -------------------------------------------


def _blockingCommand(address: RedisAddress, timeout: float, command: list[str]) -> Any:
    """
    Run one command over a fresh socket (after AUTH and SELECT), blocking.

    :raises StoreError: when Redis cannot be reached or answers with an error.
    """
    where = address.describe()
    commands: list[list[str]] = []
    if address.password is not None:
        auth = [address.username] if address.username else []
        commands.append(["AUTH", *auth, address.password])
    commands += [["SELECT", str(address.db)], command]
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address.path)
        else:
            sock = socket.create_connection((address.host, address.port), timeout)
        with sock, sock.makefile("rb") as replies:
            sock.sendall(b"".join(_encode(c) for c in commands))
            results = [_readReply(replies) for _ in commands]
    except (OSError, ValueError) as e:
        raise StoreUnavailable(f"the Redis store {where} is unavailable: {e}") from None
    for result in results:
        if isinstance(result, _ErrorReply):
            raise StoreError(f"the Redis store {where} refused: {str(result)[:200]}")
    return results[-1]


class _ErrorReply(str):
    pass


def _encode(args: list[str]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _readReply(f: Any) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ValueError("the connection was closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode("utf-8")
    if kind == b"-":
        return _ErrorReply(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        if len(data) != n + 2:
            raise ValueError("the connection was closed")
        return data[:-2].decode("utf-8")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_readReply(f) for _ in range(n)]
    raise ValueError(f"not a Redis reply: {line[:20]!r}")
