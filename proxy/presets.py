"""
The big providers, in one table: where their IMAP and SMTP submission
servers and OAuth2 endpoints are and which scopes reach mail (reading and
sending: one grant serves both). An account preset (``provider``
in an account) and an app preset (``provider`` in a shared OAuth2 app) are
two views of the same entry, so a provider's URL is written once.
``{tenant}`` in a URL is filled from the tenant given (default ``common``).
"""

from __future__ import annotations

from typing import Any

import attrs

# What an app adds to the mail scopes: the mailbox owner's identity, so that
# a consent can say which mailbox it granted.
IDENTITY_SCOPES = ("openid", "email")


@attrs.frozen
class Provider:
    """
    :ivar imap: the IMAP server's ``host``, ``port`` and ``tls``.
    :ivar smtp: the SMTP submission server's, in the same shape.
    :ivar scopes: the scopes that give IMAP and SMTP access (with a
        refresh token).
    :ivar deviceURL: the device authorization endpoint, None where the
        provider offers no device flow for mail (Google).
    """

    imap: dict[str, Any] | None = None
    smtp: dict[str, Any] | None = None
    authorizationURL: str | None = None
    tokenURL: str | None = None
    deviceURL: str | None = None
    scopes: tuple[str, ...] = ()


_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"

# The SMTP servers are those the providers document for OAuth2 clients:
# Google's "IMAP, POP, and SMTP" page (developers.google.com/gmail/imap/
# imap-smtp: smtp.gmail.com, 465 with TLS from the start; the one mail scope
# covers sending), Microsoft's "How to set up a multifunction device or
# application to send email using Microsoft 365" (SMTP AUTH client
# submission: smtp.office365.com, 587, STARTTLS) and "Authenticate an IMAP,
# POP or SMTP connection using OAuth" (scope SMTP.Send beside IMAP's).
PROVIDERS: dict[str, Provider] = {
    "gmail": Provider(
        imap={"host": "imap.gmail.com", "port": 993, "tls": "implicit"},
        smtp={"host": "smtp.gmail.com", "port": 465, "tls": "implicit"},
        authorizationURL="https://accounts.google.com/o/oauth2/v2/auth",
        tokenURL="https://oauth2.googleapis.com/token",
        scopes=("https://mail.google.com/",),
    ),
    "outlook": Provider(
        imap={"host": "outlook.office365.com", "port": 993, "tls": "implicit"},
        smtp={"host": "smtp.office365.com", "port": 587, "tls": "starttls"},
        authorizationURL=_MICROSOFT + "/authorize",
        tokenURL=_MICROSOFT + "/token",
        deviceURL=_MICROSOFT + "/devicecode",
        scopes=(
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access",
        ),
    ),
    # No preset: everything is given.
    "generic": Provider(),
}


def _accountPreset(p: Provider) -> dict[str, Any]:
    if p.tokenURL is None:
        return {}
    return {
        "imap": dict(p.imap or {}),
        "smtp": dict(p.smtp or {}),
        "tokenUrl": p.tokenURL,
        "scopes": list(p.scopes),
    }


def _appPreset(p: Provider) -> dict[str, Any]:
    if p.tokenURL is None:
        return {}
    return {
        "authorizationUrl": p.authorizationURL,
        "tokenUrl": p.tokenURL,
        "deviceAuthorizationUrl": p.deviceURL,
        "scopes": [*p.scopes, *IDENTITY_SCOPES],
    }


# The views in the API's JSON shape: what an account of each provider needs
# besides its own address and grant, and what an app of each talks to.
PRESETS: dict[str, dict[str, Any]] = {n: _accountPreset(p) for n, p in PROVIDERS.items()}
APP_PRESETS: dict[str, dict[str, Any]] = {n: _appPreset(p) for n, p in PROVIDERS.items()}
