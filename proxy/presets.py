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
    # Connections per account this proxy holds at most, by protocol, where
    # the account's own ``maxConnections`` is None (docs/limits.md says
    # where each number comes from).
    maxConnections: dict[str, int] = attrs.field(factory=dict)


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
        # IMAP: Google's help ("Too many simultaneous connections"): 15.
        # SMTP: Google documents no concurrent limit for submission; 10 is
        # our choice, above any one user's clients and far from a flood.
        maxConnections={"imap": 15, "smtp": 10},
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
        # SMTP: Microsoft documents 3 concurrent submissions per mailbox
        # ("432 4.3.2 ... sender thread limit exceeded"); IMAP: 20, as users
        # report it (Microsoft publishes no figure).
        maxConnections={"imap": 20, "smtp": 3},
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


def presetMaxConnections(protocol: str, host: str) -> int | None:
    """
    The cap a provider preset sets for an account whose ``protocol``
    (``imap`` or ``smtp``) server is ``host``, or None when ``host`` is no
    preset's: found by the server, so that accounts made before caps
    existed (or without ``provider``) get their provider's number too.
    """
    host = host.lower().rstrip(".")
    for provider in PROVIDERS.values():
        server = provider.imap if protocol == "imap" else provider.smtp
        if server is not None and server.get("host") == host:
            return provider.maxConnections.get(protocol)
    return None
