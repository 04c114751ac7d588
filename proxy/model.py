"""
The data the proxy keeps: accounts (a mailbox and its OAuth2 grant) and access
tokens (what clients log in with). Plain attrs classes, no I/O.
"""

from __future__ import annotations

import re

import attrs

TLS_MODES = ("implicit", "starttls", "plain")
SCOPES = ("imap-proxy", "smtp", "api", "metrics", "*")
ACCOUNT_STATES = ("ok", "reauth-required", "disabled")
# An SMTP server's port when none is given, by its TLS mode: submissions
# (RFC 8314) for implicit TLS, submission (RFC 6409) otherwise.
SMTP_PORTS = {"implicit": 465, "starttls": 587, "plain": 587}

_ACCOUNT_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\Z")


def validAccountId(value: str) -> bool:
    """
    Account ids are IMAP atoms and URL path segments, so they keep to a small
    alphabet: letters, digits and ``. _ @ + -``, at most 128 characters.
    """
    return bool(_ACCOUNT_ID.match(value))


@attrs.frozen
class Upstream:
    """
    A provider's server: where an account's mailbox lives (IMAP) or where
    it submits mail (SMTP). The defaults are IMAP's; ``SMTP_PORTS`` gives
    SMTP's.
    """

    host: str
    port: int = 993
    tls: str = attrs.field(default="implicit", validator=attrs.validators.in_(TLS_MODES))
    caFile: str | None = None
    # The most connections this proxy (every instance sharing its store,
    # spares included) holds to this server for one account; None: the
    # preset's or the global default.
    maxConnections: int | None = None


@attrs.frozen
class OAuth2Grant:
    """
    An account's OAuth2 grant. ``clientSecret`` and ``refreshToken`` are the
    decrypted values; they live only in memory, never in a log line or repr.
    With ``app`` set, the client fields come from that shared OAuth2 app.
    """

    tokenURL: str
    clientId: str
    clientSecret: str = attrs.field(repr=False)
    refreshToken: str = attrs.field(repr=False)
    scopes: tuple[str, ...] = ()
    app: str | None = None


@attrs.frozen
class OAuth2App:
    """
    An OAuth2 client registered once with a provider and shared by the
    accounts that consented through it.

    :ivar provider: ``gmail``, ``outlook`` or ``generic``.
    :ivar redirectURL: where the provider sends the mailbox owner back
        (this proxy's ``/oauth2/callback``).
    """

    id: str
    provider: str
    clientId: str
    clientSecret: str = attrs.field(repr=False)
    redirectURL: str | None
    authorizationURL: str | None
    tokenURL: str
    deviceURL: str | None
    scopes: tuple[str, ...]
    tenant: str = "common"
    created: float = 0.0
    updated: float = 0.0


@attrs.frozen
class PendingAuthorization:
    """A consent in progress: single use, short-lived, keyed by its state."""

    state: str
    account: str
    app: str
    verifier: str = attrs.field(repr=False)
    email: str | None
    expires: float
    imap: str | None = None  # JSON of the account's imap settings, for new accounts
    smtp: str | None = None  # JSON of its smtp settings ("null": none), as given


@attrs.frozen
class Account:
    """
    A mailbox: ``upstream`` is its IMAP server, ``smtp`` the server it
    submits mail through (None: the account cannot send).
    """

    id: str
    email: str
    upstream: Upstream
    oauth2: OAuth2Grant
    state: str = "ok"
    stateReason: str | None = None
    created: float = 0.0
    updated: float = 0.0
    smtp: Upstream | None = None


@attrs.frozen
class Restrictions:
    """
    What an IMAP session of a token may do, enforced by the proxy on the
    wire: ``readOnly`` passes only commands that cannot change a mailbox;
    ``mailboxes`` (empty: all) are the patterns (IMAP LIST wildcards ``*``
    and ``%``, names as the client sees them) of the mailboxes it may see.
    """

    readOnly: bool = False
    mailboxes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.readOnly or bool(self.mailboxes)


@attrs.frozen
class Token:
    """
    A stored access token: never the token itself, only its SHA-256 (``id``).
    ``account`` is None for a root token.
    """

    id: str
    account: str | None
    scopes: tuple[str, ...]
    description: str
    addresses: tuple[str, ...] = ()
    created: float = 0.0
    expires: float | None = None
    lastUseTime: float | None = None
    lastUseAddress: str | None = None
    # None or empty: unrestricted (today's byte splice).
    restrictions: Restrictions | None = None
