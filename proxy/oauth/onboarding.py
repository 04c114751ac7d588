"""
Onboarding a mailbox without copying refresh tokens by hand: the OAuth2
authorization code flow (with PKCE) through the API and a browser, and the
device authorization grant (RFC 8628) for the admin command on machines
without a browser. The provider calls (``_onboardhttp``) block, so they run
in a thread (``run``), never on the reactor thread; each of their failures is
an ``OnboardingError`` with a one-line message that is safe to show.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import attrs
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .. import auditlog
from ..admin import (
    IMAP_FIELDS,
    PRESETS,
    SMTP_FIELDS,
    Admin,
    AdminError,
    InvalidInput,
    _object,
    buildAccount,
)
from ..alerts import stateChanged
from ..model import Account, OAuth2App, PendingAuthorization, validAccountId
from ..views import _iso
from ._onboardhttp import (
    DevicePending,
    DeviceSlowDown,
    OnboardingError,
    ProviderCertificateRejected,
    ProviderError,
    devicePollBlocking,
    deviceStartBlocking,
    exchangeCodeBlocking,
)
from .refresher import _printable

__all__ = [
    "DevicePending",
    "DeviceSlowDown",
    "Onboarding",
    "OnboardingError",
    "ProviderCertificateRejected",
    "ProviderError",
    "devicePollBlocking",
    "deviceStartBlocking",
    "emailFromIdToken",
    "exchangeCodeBlocking",
    "pkcePair",
]

log = Logger(namespace="proxy.oauth")

STATE_LIFETIME = 600.0


def pkcePair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def emailFromIdToken(idToken: Any) -> str | None:
    """
    The address in an OpenID Connect ID token. It came straight from the
    token endpoint over verified TLS, so its signature need not be checked
    (OpenID Connect Core, 3.1.3.7).
    """
    if not isinstance(idToken, str) or idToken.count(".") < 2:
        return None
    payload = idToken.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None
    if not isinstance(claims, dict):
        return None
    for name in ("email", "preferred_username", "upn"):
        value = claims.get(name)
        if isinstance(value, str) and "@" in value:
            return value
    return None


# -- the flows ----------------------------------------------------------------


class Onboarding:
    """
    :param admin: the shared operations (and through it the store).
    :param secrets: signs the ``state``.
    :param run: ``(f, *args) -> Deferred``: runs a blocking call in a thread.
    :param clock: ``IReactorTime``.
    """

    def __init__(
        self, admin: Admin, secrets: Any, run: Callable[..., Any], clock: Any, timeout: float = 10.0
    ):
        self.admin = admin
        self._secrets = secrets
        self._run = run
        self._clock = clock
        self._timeout = timeout

    async def start(self, data: Any) -> dict[str, Any]:
        """
        Begin a consent: ``{"app", "account", "email"?, "imap"?, "smtp"?}``
        → ``{"url", "expires"}``, the URL to open in the mailbox owner's
        browser. ``imap`` is needed for a new account of a generic app;
        ``smtp`` gives (or changes) the account's SMTP server, which a new
        account of a preset app otherwise takes from the preset.
        """
        data = _object(data, "authorization", {"app", "account", "email", "imap", "smtp"})
        if not isinstance(data.get("app"), str):
            raise InvalidInput("app is required (the OAuth2 app's id)")
        app = await self.admin.getApp(data["app"])
        if not app.authorizationURL or not app.redirectURL:
            raise InvalidInput(f"OAuth2 app {app.id} has no authorizationUrl or redirectUrl")
        accountId = data.get("account")
        if not isinstance(accountId, str) or not validAccountId(accountId):
            raise InvalidInput("account: letters, digits and . _ @ + - only")
        imap = data.get("imap")
        if imap is not None:
            _object(imap, "imap", IMAP_FIELDS)
        smtp = data.get("smtp")
        if "smtp" in data:
            _object(smtp, "smtp", SMTP_FIELDS)
        email = data.get("email")
        if email is not None and (not isinstance(email, str) or "@" not in email):
            raise InvalidInput("email is not a mail address")
        if imap is not None or smtp is not None:
            # Check the settings now, as the account will be built after
            # consent: a mistake must not waste the owner's consent.
            try:
                current = await self.admin.getAccount(accountId)
            except AdminError:
                current = None
            servers = {k: v for k, v in (("imap", imap), ("smtp", smtp)) if v is not None}
            buildAccount(
                {
                    "email": email or (current.email if current else "check@invalid"),
                    **servers,
                    "oauth2": {"app": app.id, "refreshToken": "check"},
                },
                current,
                accountId,
                app=app,
            )
        if imap is None and PRESETS.get(app.provider, {}).get("imap") is None:
            # Say so now, not after the owner has consented.
            try:
                await self.admin.getAccount(accountId)
            except AdminError:
                raise InvalidInput(
                    "imap (at least host) is required for a new account of a generic app"
                ) from None
        stateId = secrets.token_urlsafe(32)
        verifier, challenge = pkcePair()
        expires = self._clock.seconds() + STATE_LIFETIME
        await self.admin.store.addPending(
            PendingAuthorization(
                state=stateId,
                account=accountId,
                app=app.id,
                verifier=verifier,
                email=email,
                expires=expires,
                imap=json.dumps(imap) if imap is not None else None,
                smtp=json.dumps(smtp) if smtp is not None else None,
            )
        )
        query = {
            "response_type": "code",
            "client_id": app.clientId,
            "redirect_uri": app.redirectURL,
            "scope": " ".join(app.scopes),
            "state": stateId + "." + self._secrets.sign(stateId),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "prompt": "consent",
        }
        if app.provider == "gmail":
            query["access_type"] = "offline"  # Google's way to ask for a refresh token
        if email:
            query["login_hint"] = email
        log.info(
            "authorization of {account} through app {app} started", account=accountId, app=app.id
        )
        sep = "&" if "?" in app.authorizationURL else "?"
        return {"url": app.authorizationURL + sep + urlencode(query), "expires": _iso(expires)}

    async def finish(self, args: dict[str, str]) -> Account:
        """
        The redirect back from the provider: check the state (signed, single
        use, not expired), exchange the code, and save the account.
        """
        state = args.get("state", "")
        stateId, _, signature = state.partition(".")
        if not stateId or not self._secrets.verify(stateId, signature):
            raise OnboardingError("this link is not valid")
        pending = await self.admin.store.takePending(stateId)
        if pending is None or pending.expires < self._clock.seconds():
            raise OnboardingError("this link has expired or was already used; start again")
        if args.get("error"):
            log.info(
                "authorization of {account} declined at the provider: {error}",
                account=pending.account,
                error=_printable(args["error"], 64),
            )
            raise OnboardingError("the authorization was declined at the provider")
        code = args.get("code")
        if not code:
            raise OnboardingError("the provider sent no authorization code")
        app = await self.admin.getApp(pending.app)
        try:
            token = await self._run(
                exchangeCodeBlocking, app, code, pending.verifier, self._timeout
            )
        except OnboardingError as e:
            log.warn(
                "code exchange for {account} failed: {error}",
                account=pending.account,
                error=e.message,
            )
            raise
        except Exception as e:
            # Not expected from exchangeCodeBlocking; its text may hold anything.
            log.warn(
                "code exchange for {account} failed: {error}",
                account=pending.account,
                error=type(e).__name__,
            )
            raise OnboardingError("the code exchange with the provider failed") from None
        imap = json.loads(pending.imap) if pending.imap else None
        smtp = json.loads(pending.smtp) if pending.smtp else None
        return await self.complete(pending.account, app, token, pending.email, imap, smtp)

    async def authorizeDevice(
        self,
        app: OAuth2App,
        accountId: str,
        email: str | None,
        imap: dict | None,
        show: Callable[[str, str], object],
        smtp: dict | None = None,
    ) -> Account:
        """
        The device grant (RFC 8628) from start to saved account: ask for a
        code, ``show(verificationURI, userCode)`` to the operator, then poll
        at the provider's interval (5 s longer after each ``slow_down``, 3.5)
        until the owner decides or the code expires.

        :raises OnboardingError: declined, expired, or the provider failed.
        """
        grant = await self._run(deviceStartBlocking, app, self._timeout)
        show(grant["verification_uri"], grant["user_code"])
        interval = grant["interval"]
        deadline = self._clock.seconds() + grant["expires_in"]
        while True:
            await deferLater(self._clock, interval)
            if self._clock.seconds() > deadline:
                raise OnboardingError("the code expired before it was used; start again")
            try:
                token = await self._run(
                    devicePollBlocking, app, grant["device_code"], self._timeout
                )
            except DeviceSlowDown:
                interval = min(interval + 5.0, 60.0)
            except DevicePending:
                pass
            else:
                return await self.complete(accountId, app, token, email, imap, smtp, "device")

    async def complete(
        self,
        accountId: str,
        app: OAuth2App,
        token: dict,
        email: str | None,
        imap: dict | None,
        smtp: dict | None = None,
        flow: str = "consent",
    ) -> Account:
        """
        Create or update the account with a newly granted refresh token.

        :param imap: its IMAP settings, if given (needed for a new account
            of a generic app).
        :param smtp: its SMTP settings, if given; a new account of a preset
            app otherwise gets the preset's, one of a generic app none.
        :param flow: ``consent`` or ``device``, for the audit event.
        """
        refresh = token.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            raise OnboardingError("the provider granted no refresh token (offline access)")
        reported = emailFromIdToken(token.get("id_token"))
        try:
            existing = await self.admin.getAccount(accountId)
        except AdminError:
            existing = None
        expected = existing.email if existing is not None else email
        if existing is not None and not reported:
            # Replacing a working grant needs proof of which mailbox consented.
            raise OnboardingError(
                "the provider did not say which mailbox consented (ask for the openid "
                "and email scopes); the account was not changed"
            )
        if reported and expected and reported.lower() != expected.lower():
            # Whoever consented must be the mailbox the account is for:
            # a consent link must not rebind an account to another mailbox.
            log.warn(
                "authorization of {account} refused: consent came from another mailbox",
                account=accountId,
            )
            raise OnboardingError(
                f"the consent was given for {reported}, not for {expected}; "
                "sign in to the provider as the right mailbox and start again"
            )
        address = reported or expected
        if address is None:
            raise OnboardingError("the provider did not say which mailbox was authorized")
        data: dict[str, Any] = {
            "email": address,
            "oauth2": {"app": app.id, "refreshToken": refresh},
        }
        if imap is not None:
            data["imap"] = imap
        if smtp is not None:
            data["smtp"] = smtp
        if existing is None:
            if imap is None and PRESETS.get(app.provider, {}).get("imap") is None:
                raise OnboardingError("a new account of a generic app needs imap settings")
            account = buildAccount({"account": accountId, **data}, app=app)
        else:
            account = buildAccount(data, existing, accountId, app=app)
            if existing.state == "disabled":
                # A new grant re-authorizes; it does not re-enable.
                account = attrs.evolve(account, state="disabled", stateReason=existing.stateReason)
            else:
                account = attrs.evolve(account, state="ok", stateReason=None)
        await self.admin.store.putAccount(account)
        if existing is not None:
            stateChanged(self.admin, accountId, existing.state, account.state, "authorized")
        log.info(
            "account {account} authorized for {email} through app {app}",
            account=accountId,
            email=address,
            app=app.id,
        )
        auditlog.accountAuthorized(accountId, address, app.id, flow)
        old = existing.state if existing is not None else None
        auditlog.accountChanged(accountId, old, account.state, "reauthorized")
        return await self.admin.getAccount(accountId)
