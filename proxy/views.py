"""
Records as operators and API clients see them (the admin command's listings,
the API's JSON): secrets only as set/unset, times as ISO 8601 UTC.
"""

from __future__ import annotations

import datetime
from typing import Any

from .model import Account, OAuth2App, Token, Upstream
from .restrictions import tokenRestrictionsView


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _serverView(u: Upstream) -> dict[str, Any]:
    view = {"host": u.host, "port": u.port, "tls": u.tls, "caFile": u.caFile}
    return {**view, "maxConnections": u.maxConnections}


def accountView(a: Account) -> dict[str, Any]:
    """An account as shown to operators and API clients: secrets only as set/unset."""
    return {
        "account": a.id,
        "email": a.email,
        "imap": _serverView(a.upstream),
        "smtp": None if a.smtp is None else _serverView(a.smtp),
        "oauth2": {
            "app": a.oauth2.app,
            "tokenUrl": a.oauth2.tokenURL,
            "clientId": a.oauth2.clientId,
            "clientSecretSet": bool(a.oauth2.clientSecret),
            "refreshTokenSet": bool(a.oauth2.refreshToken),
            "scopes": list(a.oauth2.scopes),
        },
        "state": a.state,
        "stateReason": a.stateReason,
        "created": _iso(a.created),
        "updated": _iso(a.updated),
    }


def appView(a: OAuth2App) -> dict[str, Any]:
    """An OAuth2 app as shown: the client secret only as set/unset."""
    return {
        "app": a.id,
        "provider": a.provider,
        "tenant": a.tenant,
        "clientId": a.clientId,
        "clientSecretSet": bool(a.clientSecret),
        "redirectUrl": a.redirectURL,
        "authorizationUrl": a.authorizationURL,
        "tokenUrl": a.tokenURL,
        "deviceAuthorizationUrl": a.deviceURL,
        "scopes": list(a.scopes),
        "created": _iso(a.created),
        "updated": _iso(a.updated),
    }


def tokenView(t: Token) -> dict[str, Any]:
    """A token's record (never the token)."""
    return {
        "id": t.id,
        "account": t.account,
        "description": t.description,
        "scopes": list(t.scopes),
        "restrictions": tokenRestrictionsView(t),
        "created": _iso(t.created),
        "expires": _iso(t.expires),
        "lastUse": {"time": _iso(t.lastUseTime), "address": t.lastUseAddress}
        if t.lastUseTime
        else None,
    }
