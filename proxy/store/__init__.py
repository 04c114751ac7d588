"""
Stores for accounts and tokens. ``makeStore`` turns a ``--store`` URL into a
store: ``sqlite://…`` (the default) or ``redis://…`` / ``unix://…`` /
``redis+sentinel://…`` (Redis).
Every store provides ``IStore``; ``MemoryStore`` is the in-memory one, for
tests.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from ..encryption import ENV_VAR, Secrets, loadSecrets
from ._errors import StoreDataLost, StoreError, StoreUnavailable
from ._interfaces import (
    IAccessTokenStore,
    IAccountStore,
    IAppStore,
    IPendingStore,
    IRedisAccess,
    ISecretStore,
    ISlotCounter,
    IStore,
    ITokenStore,
)
from ._rediscoord import RefreshLock, SessionBus
from ._redispenalty import RedisPenalties
from ._redissessions import SessionBoard
from ._redisslots import RedisSlots
from .memory import MemoryData, MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore

REDIS_SCHEMES = ("redis", "unix", "redis+sentinel")

__all__ = [
    "IAccessTokenStore",
    "IAccountStore",
    "IAppStore",
    "IPendingStore",
    "IRedisAccess",
    "ISecretStore",
    "ISlotCounter",
    "IStore",
    "ITokenStore",
    "MemoryData",
    "MemoryStore",
    "RedisPenalties",
    "RedisSlots",
    "RedisStore",
    "RefreshLock",
    "SessionBoard",
    "SessionBus",
    "SQLiteStore",
    "StoreDataLost",
    "StoreError",
    "StoreUnavailable",
    "defaultStateDir",
    "defaultStoreURL",
    "makeStore",
    "sqlitePath",
]


def defaultStateDir(environ=os.environ) -> str:
    """
    systemd's ``$STATE_DIRECTORY`` when set, ``/var/lib/imapproxy`` for root,
    else ``$XDG_STATE_HOME/imapproxy`` (``~/.local/state/imapproxy``).
    """
    if environ.get("STATE_DIRECTORY"):
        return environ["STATE_DIRECTORY"].split(":")[0]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/imapproxy"
    base = environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "imapproxy")


def defaultStoreURL(environ=os.environ) -> str:
    return "sqlite://" + os.path.join(defaultStateDir(environ), "imapproxy.sqlite3")


def sqlitePath(url: str) -> str:
    """
    ``sqlite:///abs/path`` (or ``sqlite:relative/path``) to a file path.

    :raises StoreError: for any other kind of URL, and for ``sqlite://var/…``
        (two slashes: ``var`` would be a host, and the file would silently be
        ``lib/…`` under the working directory).
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise StoreError(
            f"unsupported store URL {url!r} "
            "(use sqlite:///PATH, redis://HOST, unix:///PATH or redis+sentinel://HOSTS/SERVICE)"
        )
    if parts.netloc:
        raise StoreError(
            f"store URL {url!r} names a host ({parts.netloc!r}): an absolute path needs "
            f"three slashes, sqlite:///{parts.netloc}{parts.path}"
        )
    if parts.query or parts.fragment:
        raise StoreError(f"store URL {url!r}: an SQLite store takes no ?query or #fragment")
    path = unquote(parts.path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")  # sqlite:////abs: one root, as the log shows it
    if not path or path.endswith("/"):
        raise StoreError(f"store URL {url!r} names no file")
    return path


def makeStore(url: str, secretFile: str | None, reactor=None) -> SQLiteStore | RedisStore:
    """
    Build (not yet open) the store named by ``url`` with its secret key. With
    no key configured, an SQLite store's key lives in ``secret.key`` beside the
    database and is created on first use (mode 0600); a Redis store, shared by
    several proxies, needs the key given (``--secret-file`` or the environment).
    """
    if urlsplit(url).scheme in REDIS_SCHEMES:
        return RedisStore(url, loadSecrets(secretFile, None), reactor)
    path = sqlitePath(url)
    defaultKey = os.path.join(os.path.dirname(os.path.abspath(path)), "secret.key")
    if (
        secretFile is None
        and not os.environ.get(ENV_VAR)
        and os.path.exists(path)
        and not os.path.exists(defaultKey)
    ):
        # A new key would only be the wrong key: refuse, and say what is missing.
        raise StoreError(
            f"the store {path} exists but its key file {defaultKey} is missing: restore it "
            f"(or give --secret-file / ${ENV_VAR}); without it the stored secrets are lost"
        )
    secrets: Secrets = loadSecrets(secretFile, defaultKey)
    return SQLiteStore(path, secrets, reactor)
