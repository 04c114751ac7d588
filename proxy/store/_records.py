"""
The records every store keeps, and the rules they share: how an account, an
OAuth2 app, a token, a consent in progress and a saved access token become a
flat record (column name to value, secrets encrypted) and back, and how an
account of a shared app takes its client side from the app. SQLite keeps a
record as a row, Redis as a hash, the in-memory store as a dict: adding a
field means changing this module and the stores' column lists, nothing else.

Records read back may hold text where numbers were written (Redis keeps
text): the readers convert. A column that is None is absent from a Redis hash.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from ..encryption import Secrets
from ..model import Account, OAuth2App, OAuth2Grant, PendingAuthorization, Token, Upstream
from ..restrictions import decodeRestrictions, encodeRestrictions
from ._errors import StoreError

Record = dict[str, Any]

ACCOUNT_COLUMNS = (
    "id",
    "email",
    "imap_host",
    "imap_port",
    "imap_tls",
    "imap_ca_file",
    "token_url",
    "client_id",
    "client_secret_enc",
    "refresh_token_enc",
    "oauth_scopes",
    "state",
    "state_reason",
    "created",
    "updated",
    "oauth2_app",
    "smtp_host",
    "smtp_port",
    "smtp_tls",
    "smtp_ca_file",
    # Connection caps (None: the preset's or the global default).
    "imap_max_connections",
    "smtp_max_connections",
)
ACCESS_COLUMNS = ("access_token_enc", "access_token_expires", "access_token_lifetime")
APP_COLUMNS = (
    "id",
    "provider",
    "client_id",
    "client_secret_enc",
    "redirect_url",
    "authorization_url",
    "token_url",
    "device_url",
    "scopes",
    "tenant",
    "created",
    "updated",
)
TOKEN_COLUMNS = (
    "id",
    "account",
    "scopes",
    "description",
    "addresses",
    "created",
    "expires",
    "last_use_time",
    "last_use_address",
    "restrictions",
)
PENDING_COLUMNS = ("state", "account", "app", "verifier_enc", "email", "expires", "imap", "smtp")

# The encrypted columns of each kind of record (key rotation walks these).
ENCRYPTED = {
    "accounts": ("client_secret_enc", "refresh_token_enc", "access_token_enc"),
    "apps": ("client_secret_enc",),
    "pending": ("verifier_enc",),
}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def newMarker() -> str:
    """A new store's identity, written once when it is created."""
    return uuid.uuid4().hex


# -- accounts ---------------------------------------------------------------------


def accountRecord(account: Account, secrets: Secrets, now: float) -> Record:
    """
    An account as a record. An account of a shared app keeps only its own
    refresh token: the client side is read from the app, so a change of the
    app applies to every account that uses it. ``created`` is the account's
    or ``now``; a store replacing an account keeps the stored one.
    """
    grant = account.oauth2
    shared = grant.app is not None
    smtp = account.smtp
    return {
        "id": account.id,
        "email": account.email,
        "imap_host": account.upstream.host,
        "imap_port": int(account.upstream.port),
        "imap_tls": account.upstream.tls,
        "imap_ca_file": account.upstream.caFile,
        "token_url": "" if shared else grant.tokenURL,
        "client_id": "" if shared else grant.clientId,
        "client_secret_enc": secrets.encrypt("" if shared else grant.clientSecret),
        "refresh_token_enc": secrets.encrypt(grant.refreshToken),
        "oauth_scopes": json.dumps([] if shared else list(grant.scopes)),
        "state": account.state,
        "state_reason": account.stateReason,
        "created": account.created or now,
        "updated": now,
        "oauth2_app": grant.app,
        # An account without SMTP settings has none of these (all NULL).
        "smtp_host": None if smtp is None else smtp.host,
        "smtp_port": None if smtp is None else int(smtp.port),
        "smtp_tls": None if smtp is None else smtp.tls,
        "smtp_ca_file": None if smtp is None else smtp.caFile,
        "imap_max_connections": account.upstream.maxConnections,
        "smtp_max_connections": None if smtp is None else smtp.maxConnections,
    }


def accountFrom(record: Mapping[str, Any], app: OAuth2App | None, secrets: Secrets) -> Account:
    """
    A record as an account, secrets decrypted.

    :param app: the shared app the record names (``oauth2_app``), or None;
        an account naming an app that is gone falls back to its own fields.
    """
    appId = record.get("oauth2_app")
    refresh = secrets.decrypt(record["refresh_token_enc"])
    if appId is not None and app is not None:
        grant = OAuth2Grant(
            tokenURL=app.tokenURL,
            clientId=app.clientId,
            clientSecret=app.clientSecret,
            refreshToken=refresh,
            scopes=tuple(app.scopes),
            app=appId,
        )
    else:
        grant = OAuth2Grant(
            tokenURL=record["token_url"],
            clientId=record["client_id"],
            clientSecret=secrets.decrypt(record["client_secret_enc"]),
            refreshToken=refresh,
            scopes=tuple(json.loads(record["oauth_scopes"])),
        )
    return Account(
        id=record["id"],
        email=record["email"],
        upstream=Upstream(
            host=record["imap_host"],
            port=int(record["imap_port"]),
            tls=record["imap_tls"],
            caFile=record.get("imap_ca_file"),
            maxConnections=_int(record.get("imap_max_connections")),
        ),
        oauth2=grant,
        state=record["state"],
        stateReason=record.get("state_reason"),
        created=float(record["created"]),
        updated=float(record["updated"]),
        smtp=_smtpFrom(record),
    )


def _smtpFrom(record: Mapping[str, Any]) -> Upstream | None:
    """The SMTP server of an account record; None when it has none (or predates them)."""
    host = record.get("smtp_host")
    if host is None:
        return None
    return Upstream(
        host=host,
        port=int(record["smtp_port"]),
        tls=record["smtp_tls"],
        caFile=record.get("smtp_ca_file"),
        maxConnections=_int(record.get("smtp_max_connections")),
    )


def refreshTokenUpdate(refreshToken: str, secrets: Secrets, now: float) -> Record:
    """The columns ``setRefreshToken`` changes."""
    return {"refresh_token_enc": secrets.encrypt(refreshToken), "updated": now}


def stateUpdate(state: str, reason: str | None, now: float) -> Record:
    """The columns ``setAccountState`` changes (a None reason clears it)."""
    return {"state": state, "state_reason": reason, "updated": now}


def accessRecord(
    token: str | None, expires: float | None, lifetime: float | None, secrets: Secrets
) -> Record:
    """A saved provider access token's columns (all None to drop it)."""
    return {
        "access_token_enc": None if token is None else secrets.encrypt(token),
        "access_token_expires": None if token is None else expires,
        "access_token_lifetime": None if token is None else lifetime,
    }


def accessFrom(
    record: Mapping[str, Any], secrets: Secrets
) -> tuple[str, float | None, float | None] | None:
    """``(token, expires, lifetime)`` from those columns, or None when none is saved."""
    enc = record.get("access_token_enc")
    if enc is None:
        return None
    return (
        secrets.decrypt(enc),
        _float(record.get("access_token_expires")),
        _float(record.get("access_token_lifetime")),
    )


# -- OAuth2 apps ------------------------------------------------------------------


def appRecord(app: OAuth2App, secrets: Secrets, now: float) -> Record:
    """An app as a record; putting an app replaces all of it, its creation time too."""
    return {
        "id": app.id,
        "provider": app.provider,
        "client_id": app.clientId,
        "client_secret_enc": secrets.encrypt(app.clientSecret),
        "redirect_url": app.redirectURL,
        "authorization_url": app.authorizationURL,
        "token_url": app.tokenURL,
        "device_url": app.deviceURL,
        "scopes": json.dumps(list(app.scopes)),
        "tenant": app.tenant,
        "created": app.created or now,
        "updated": now,
    }


def appFrom(record: Mapping[str, Any], secrets: Secrets) -> OAuth2App:
    return OAuth2App(
        id=record["id"],
        provider=record["provider"],
        clientId=record["client_id"],
        clientSecret=secrets.decrypt(record["client_secret_enc"]),
        redirectURL=record.get("redirect_url"),
        authorizationURL=record.get("authorization_url"),
        tokenURL=record["token_url"],
        deviceURL=record.get("device_url"),
        scopes=tuple(json.loads(record["scopes"])),
        tenant=record["tenant"],
        created=float(record["created"]),
        updated=float(record["updated"]),
    )


def appInUse(count: int) -> StoreError:
    """The refusal to remove an app that accounts still use."""
    return StoreError(f"{count} account(s) use this app")


# -- tokens -----------------------------------------------------------------------


def tokenRecord(token: Token) -> Record:
    """A new token as a record (its last use not recorded yet)."""
    return {
        "id": token.id,
        "account": token.account,
        "scopes": json.dumps(list(token.scopes)),
        "description": token.description,
        "addresses": json.dumps(list(token.addresses)),
        "created": token.created,
        "expires": token.expires,
        "last_use_time": None,
        "last_use_address": None,
        "restrictions": encodeRestrictions(token.restrictions),
    }


def tokenFrom(record: Mapping[str, Any]) -> Token:
    return Token(
        id=record["id"],
        account=record.get("account"),
        scopes=tuple(json.loads(record["scopes"])),
        description=record["description"],
        addresses=tuple(json.loads(record["addresses"])),
        created=float(record["created"]),
        expires=_float(record.get("expires")),
        lastUseTime=_float(record.get("last_use_time")),
        lastUseAddress=record.get("last_use_address"),
        restrictions=decodeRestrictions(record.get("restrictions")),
    )


def tokenOrder(token: Token) -> tuple[float, str]:
    """How tokens are listed: newest first, ties by id."""
    return (-token.created, token.id)


def tokenExists() -> StoreError:
    return StoreError("a token with this id exists")


# -- authorizations in progress ------------------------------------------------------


def pendingRecord(pending: PendingAuthorization, secrets: Secrets) -> Record:
    return {
        "state": pending.state,
        "account": pending.account,
        "app": pending.app,
        "verifier_enc": secrets.encrypt(pending.verifier),
        "email": pending.email,
        "expires": pending.expires,
        "imap": pending.imap,
        "smtp": pending.smtp,
    }


def pendingFrom(record: Mapping[str, Any], secrets: Secrets) -> PendingAuthorization:
    return PendingAuthorization(
        state=record["state"],
        account=record["account"],
        app=record["app"],
        verifier=secrets.decrypt(record["verifier_enc"]),
        email=record.get("email"),
        expires=float(record["expires"]),
        imap=record.get("imap"),
        smtp=record.get("smtp"),
    )


def pendingExists() -> StoreError:
    return StoreError("an authorization with this state is already in progress")
