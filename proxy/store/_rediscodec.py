"""
How the Redis store (``proxy.store.redis``) keeps values in hashes: field
values as text (floats that read back exactly, absent fields for None), TTLs,
and hashes read back as the model's records (``RedisStore``'s mixin).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred

from ..encryption import Secrets
from ..model import Account, OAuth2App, OAuth2Grant, Token, Upstream

T = TypeVar("T")

# A record written already expired (by the wall clock) is kept this long: the
# proxy decides expiry with its own clock, which tests replace.
MIN_TTL = 60.0


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


class _RedisRecords:
    """Hashes read back as records, secrets decrypted (``RedisStore``'s mixin)."""

    _secrets: Secrets

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
