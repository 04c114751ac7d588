"""A fake OAuth2 provider for tests (Twisted + Klein).

Run it as ``python -m tests.upstream.provider --tls-cert C --tls-key K
--ports-file F`` from the repository root.  It listens on 127.0.0.1 on two
ephemeral ports and, once both listen, atomically writes
``{"https": N, "http": M}`` to the ports file.

HTTPS port (issuer ``https://127.0.0.1:N``)
    ``GET /authorize``: the authorization endpoint (RFC 6749 4.1 with PKCE,
    RFC 7636).  There is no user: whoever ``/control/consent`` named consents
    (or declines) at once, and the answer is the redirect to the client.

    ``POST /token``: the token endpoint for the ``refresh_token``,
    ``authorization_code`` and ``urn:ietf:params:oauth:grant-type:device_code``
    grants; client authentication in the form body or with HTTP Basic.  The
    code and device grants hand out a new refresh token and an OpenID Connect
    ``id_token`` (HS256, keyed with the client secret).

    ``POST /device``: the device authorization endpoint (RFC 8628).
    ``GET /verify``: its (inert) verification page.

HTTP port
    ``POST /introspect``: RFC 7662 token introspection for Dovecot (its client
    is ``test-client``/``test-secret``).

    ``/control/...``: JSON endpoints that tests use to register clients and
    grants, revoke them, expire access tokens, consent, approve device codes,
    inject failures and latency, and read call counters (see
    :class:`ControlApp`).

All state lives in one :class:`ProviderState` whose clock is injectable, so it
can be unit-tested with :class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

import attrs
from klein import Klein
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request, Site

__all__ = [
    "AUTHORIZATION_CODE_GRANT",
    "DEVICE_CODE_GRANT",
    "INTROSPECTION_CLIENT_ID",
    "INTROSPECTION_CLIENT_SECRET",
    "AuthorizationCode",
    "AuthorizePageError",
    "Client",
    "ControlApp",
    "DeviceAuthorization",
    "Grant",
    "IssuedToken",
    "OAuthError",
    "ProviderState",
    "TokenApp",
    "main",
    "s256",
]

INTROSPECTION_CLIENT_ID = "test-client"
INTROSPECTION_CLIENT_SECRET = "test-secret"
DEFAULT_SCOPE = "https://mail.google.com/"
AUTHORIZATION_CODE_GRANT = "authorization_code"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CODE_LIFETIME = 60
DEVICE_CODE_LIFETIME = 600
DEFAULT_DEVICE_INTERVAL = 1
# Polls this much early still count as on time (client timers and latency).
DEVICE_POLL_SLACK = 0.05
ID_TOKEN_LIFETIME = 3600
# RFC 8628 6.1: no vowels (no words), no look-alike digits.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
# RFC 7636 4.1: the code verifier (and, for S256, the challenge) alphabet.
_PKCE_VALUE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def s256(verifier: str) -> str:
    """The S256 code challenge of *verifier*: base64url(sha256), no padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return _b64url(digest)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class OAuthError(Exception):
    """An error answer of the token endpoint (RFC 6749 section 5.2)."""

    def __init__(self, status: int, error: str, description: str | None = None):
        super().__init__(status, error, description)
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        out = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out


class AuthorizePageError(Exception):
    """An authorization request that must not redirect (RFC 6749 4.1.2.1)."""


@attrs.define
class Client:
    """A registered OAuth2 client; an empty secret makes it a public client."""

    client_id: str
    client_secret: str
    redirect_uris: list[str] = attrs.Factory(list)


@attrs.define
class Grant:
    """A refresh token: registered through ``/control/grant`` or issued."""

    refresh_token: str
    username: str
    client_id: str
    client_secret: str
    expires_in: int = 3600
    rotate: bool = False
    scope: str = DEFAULT_SCOPE


@attrs.define
class IssuedToken:
    """An access token handed out by the token endpoint."""

    username: str
    client_id: str
    expires_at: float
    valid: bool = True


@attrs.define
class AuthorizationCode:
    """A code handed out by ``/authorize``, waiting for its exchange."""

    code: str
    client_id: str
    redirect_uri: str
    username: str
    scope: str
    expires_at: float
    code_challenge: str | None = None
    nonce: str | None = None


@attrs.define
class DeviceAuthorization:
    """A device code; ``status`` is pending, approved, denied or used."""

    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    status: str = "pending"
    username: str | None = None
    last_poll: float | None = None


class ProviderState:
    """Everything the fake provider knows; ``clock`` supplies ``seconds()``."""

    def __init__(
        self,
        clock: IReactorTime,
        make_token: Callable[[], str] = lambda: secrets.token_urlsafe(32),
        issuer: str = "https://127.0.0.1",
    ) -> None:
        self.clock = clock
        self._make_token = make_token
        self.issuer = issuer
        self.grants: dict[str, Grant] = {}
        self.clients: dict[str, Client] = {}
        self.access_tokens: dict[str, IssuedToken] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.device_codes: dict[str, DeviceAuthorization] = {}
        self.device_interval = DEFAULT_DEVICE_INTERVAL
        self.consent_username: str | None = None
        self.consent_deny = False
        self.fail_status = 503
        self.fail_count = 0  # >0: that many more failures; -1: forever
        self.delay = 0.0
        # While set, introspection answers wait for it (tests hold a login
        # in Dovecot's passdb at a known point); None: answered at once.
        self.introspection_held: list[defer.Deferred[None]] | None = None
        self.reset_stats()

    # -- statistics ---------------------------------------------------------

    def reset_stats(self) -> None:
        self.token_calls = 0
        self.introspect_calls = 0
        self.authorize_calls = 0
        self.code_exchanges = 0
        self.device_authorizations = 0
        self.device_polls = 0
        self.token_calls_by_username: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return {
            "token_calls": self.token_calls,
            "introspect_calls": self.introspect_calls,
            "authorize_calls": self.authorize_calls,
            "code_exchanges": self.code_exchanges,
            "device_authorizations": self.device_authorizations,
            "device_polls": self.device_polls,
            "token_calls_by_username": dict(self.token_calls_by_username),
        }

    # -- control ------------------------------------------------------------

    def register_client(
        self, client_id: str, client_secret: str, redirect_uris: Iterable[str] = ()
    ) -> Client:
        """Register *client_id* or add redirect URIs to it (same secret only)."""
        client = self.clients.get(client_id)
        if client is None:
            client = self.clients[client_id] = Client(client_id, client_secret)
        elif client.client_secret != client_secret:
            raise ValueError(f"client {client_id!r} is already registered with another secret")
        for uri in redirect_uris:
            if uri not in client.redirect_uris:
                client.redirect_uris.append(uri)
        return client

    def add_grant(self, grant: Grant) -> None:
        self.register_client(grant.client_id, grant.client_secret)
        self.grants[grant.refresh_token] = grant

    def revoke_grant(self, refresh_token: str, revoke_access: bool = False) -> bool:
        grant = self.grants.pop(refresh_token, None)
        if grant is None:
            return False
        if revoke_access:
            self.expire_access(grant.username)
        return True

    def expire_access(self, username: str | None = None) -> int:
        """Invalidate every issued access token (of *username*); count them."""
        n = 0
        for issued in self.access_tokens.values():
            if issued.valid and (username is None or issued.username == username):
                issued.valid = False
                n += 1
        return n

    def set_failure(self, status: int, count: int) -> None:
        self.fail_status = status
        self.fail_count = count

    def set_consent(self, username: str | None, deny: bool = False) -> None:
        """Who answers the next ``/authorize`` calls, and whether they decline."""
        self.consent_username = username
        self.consent_deny = deny

    def _live_device(self, user_code: str) -> DeviceAuthorization:
        wanted = _normalize_user_code(user_code)
        now = self.clock.seconds()
        for device in self.device_codes.values():
            if device.user_code == wanted and device.status == "pending":
                if now < device.expires_at:
                    return device
        raise KeyError(f"no pending device authorization with user code {user_code!r}")

    def approve_device(self, user_code: str, username: str) -> None:
        device = self._live_device(user_code)
        device.status = "approved"
        device.username = username

    def deny_device(self, user_code: str) -> None:
        self._live_device(user_code).status = "denied"

    def pending_user_codes(self) -> list[str]:
        """User codes neither approved, denied nor expired, oldest first."""
        now = self.clock.seconds()
        return [
            d.user_code
            for d in self.device_codes.values()
            if d.status == "pending" and now < d.expires_at
        ]

    # -- authorization endpoint -----------------------------------------------

    def authorize(self, params: dict[str, str]) -> str:
        """The redirect location for an authorization request.

        Raise :class:`AuthorizePageError` when the client or redirect URI is
        wrong: then the provider must not redirect anywhere.
        """
        self.authorize_calls += 1
        client_id = params.get("client_id", "")
        client = self.clients.get(client_id)
        if client is None:
            raise AuthorizePageError(f"unknown client {client_id!r}")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            raise AuthorizePageError(f"redirect_uri {redirect_uri!r} is not registered")

        answer: dict[str, str] = {}
        try:
            answer["code"] = self._new_code(client, redirect_uri, params)
        except OAuthError as e:
            answer = e.body()
        if "state" in params:
            answer["state"] = params["state"]
        return _with_query(redirect_uri, answer)

    def _new_code(self, client: Client, redirect_uri: str, params: dict[str, str]) -> str:
        if params.get("response_type") != "code":
            raise OAuthError(400, "unsupported_response_type", "only response_type=code")
        scope = " ".join(params.get("scope", "").split())
        if not scope:
            raise OAuthError(400, "invalid_scope", "missing scope")
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        if challenge is None:
            if method is not None:
                raise OAuthError(400, "invalid_request", "code_challenge_method without challenge")
        elif method != "S256":
            raise OAuthError(400, "invalid_request", "code_challenge_method must be S256")
        elif not _PKCE_VALUE.fullmatch(challenge):
            raise OAuthError(400, "invalid_request", "malformed code_challenge")
        if self.consent_username is None:
            raise OAuthError(400, "access_denied", "nobody consents (POST /control/consent)")
        if self.consent_deny:
            raise OAuthError(400, "access_denied")
        code = self._make_token()
        self.codes[code] = AuthorizationCode(
            code=code,
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            username=self.consent_username,
            scope=scope,
            expires_at=self.clock.seconds() + CODE_LIFETIME,
            code_challenge=challenge,
            nonce=params.get("nonce"),
        )
        return code

    # -- device authorization endpoint ------------------------------------------

    def device_authorization(
        self, form: dict[str, str], basic: tuple[str, str] | None
    ) -> dict[str, Any]:
        """Start a device grant (RFC 8628 3.1); raise :class:`OAuthError`."""
        self.device_authorizations += 1
        client = self._authenticate(form, basic, secret_optional=True)
        scope = " ".join(form.get("scope", "").split())
        if not scope:
            raise OAuthError(400, "invalid_scope", "missing scope")
        live = set(self.pending_user_codes())
        while True:
            letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
            user_code = f"{letters[:4]}-{letters[4:]}"
            if user_code not in live:
                break
        device = DeviceAuthorization(
            device_code=self._make_token(),
            user_code=user_code,
            client_id=client.client_id,
            scope=scope,
            expires_at=self.clock.seconds() + DEVICE_CODE_LIFETIME,
        )
        self.device_codes[device.device_code] = device
        verification_uri = f"{self.issuer}/verify"
        return {
            "device_code": device.device_code,
            "user_code": user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": _with_query(verification_uri, {"user_code": user_code}),
            "expires_in": DEVICE_CODE_LIFETIME,
            "interval": self.device_interval,
        }

    # -- token endpoint -----------------------------------------------------

    def _take_failure(self) -> int | None:
        if self.fail_count == 0:
            return None
        if self.fail_count > 0:
            self.fail_count -= 1
        return self.fail_status

    def _authenticate(
        self,
        form: dict[str, str],
        basic: tuple[str, str] | None,
        secret_optional: bool = False,
    ) -> Client:
        """The client of a request; *secret_optional*: the secret may be left out."""
        if basic is not None:
            if "client_secret" in form:
                raise OAuthError(400, "invalid_request", "more than one client authentication")
            client_id, client_secret = basic
        else:
            client_id = form.get("client_id", "")
            client_secret = form.get("client_secret", "")
            if secret_optional and "client_secret" not in form:
                client_secret = None
        client = self.clients.get(client_id)
        if client is None or (
            client_secret is not None
            and not secrets.compare_digest(client.client_secret.encode(), client_secret.encode())
        ):
            raise OAuthError(401, "invalid_client", "client authentication failed")
        return client

    def _username_of(self, form: dict[str, str]) -> str | None:
        """Whose credential a token request presents, if it is known."""
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            grant = self.grants.get(form.get("refresh_token", ""))
            return grant.username if grant else None
        if grant_type == AUTHORIZATION_CODE_GRANT:
            code = self.codes.get(form.get("code", ""))
            return code.username if code else None
        if grant_type == DEVICE_CODE_GRANT:
            device = self.device_codes.get(form.get("device_code", ""))
            return device.username if device else None
        return None

    def token(
        self,
        form: dict[str, str],
        basic: tuple[str, str] | None,
    ) -> dict[str, Any]:
        """Answer one token request; raise :class:`OAuthError` on refusal."""
        self.token_calls += 1
        grant_type = form.get("grant_type")
        if grant_type == AUTHORIZATION_CODE_GRANT:
            self.code_exchanges += 1
        elif grant_type == DEVICE_CODE_GRANT:
            self.device_polls += 1
        username = self._username_of(form)
        if username is not None:
            self.token_calls_by_username[username] += 1
        status = self._take_failure()
        if status is not None:
            raise OAuthError(status, "temporarily_unavailable", "injected failure")

        client = self._authenticate(form, basic, secret_optional=grant_type == DEVICE_CODE_GRANT)
        if grant_type == "refresh_token":
            return self._refresh(form, client)
        if grant_type == AUTHORIZATION_CODE_GRANT:
            return self._exchange_code(form, client)
        if grant_type == DEVICE_CODE_GRANT:
            return self._poll_device(form, client)
        raise OAuthError(400, "unsupported_grant_type", f"unsupported: {grant_type!r}")

    def _refresh(self, form: dict[str, str], client: Client) -> dict[str, Any]:
        if not form.get("refresh_token"):
            raise OAuthError(400, "invalid_request", "missing refresh_token")
        grant = self.grants.get(form["refresh_token"])
        if grant is None:
            raise OAuthError(400, "invalid_grant", "refresh token is invalid or revoked")
        if grant.client_id != client.client_id:
            raise OAuthError(400, "invalid_grant", "refresh token was issued to another client")
        answer = self._issue_access(grant)
        if grant.rotate:
            del self.grants[grant.refresh_token]
            grant.refresh_token = self._make_token()
            self.grants[grant.refresh_token] = grant
            answer["refresh_token"] = grant.refresh_token
        return answer

    def _exchange_code(self, form: dict[str, str], client: Client) -> dict[str, Any]:
        if not form.get("code"):
            raise OAuthError(400, "invalid_request", "missing code")
        # Single use: whatever the outcome, a presented code is spent.
        code = self.codes.pop(form["code"], None)
        if code is None:
            raise OAuthError(400, "invalid_grant", "code is invalid or was already used")
        if self.clock.seconds() >= code.expires_at:
            raise OAuthError(400, "invalid_grant", "code expired")
        if code.client_id != client.client_id:
            raise OAuthError(400, "invalid_grant", "code was issued to another client")
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError(400, "invalid_grant", "redirect_uri does not match")
        verifier = form.get("code_verifier")
        if code.code_challenge is None:
            if verifier is not None:
                raise OAuthError(400, "invalid_grant", "code_verifier without code_challenge")
        elif verifier is None:
            raise OAuthError(400, "invalid_grant", "missing code_verifier")
        elif not _PKCE_VALUE.fullmatch(verifier) or not hmac.compare_digest(
            s256(verifier), code.code_challenge
        ):
            raise OAuthError(400, "invalid_grant", "code_verifier does not match")
        return self._issue_grant(client, code.username, code.scope, code.nonce)

    def _poll_device(self, form: dict[str, str], client: Client) -> dict[str, Any]:
        if not form.get("device_code"):
            raise OAuthError(400, "invalid_request", "missing device_code")
        device = self.device_codes.get(form["device_code"])
        if device is None or device.client_id != client.client_id:
            raise OAuthError(400, "invalid_grant", "unknown device_code")
        now = self.clock.seconds()
        if now >= device.expires_at:
            raise OAuthError(400, "expired_token", "the device code expired")
        if device.status == "used":
            raise OAuthError(400, "invalid_grant", "the device code was already used")
        if device.status == "denied":
            raise OAuthError(400, "access_denied", "the user declined")
        last, device.last_poll = device.last_poll, now
        if last is not None and now - last < self.device_interval - DEVICE_POLL_SLACK:
            raise OAuthError(400, "slow_down", f"poll at most every {self.device_interval}s")
        if device.status == "pending":
            raise OAuthError(400, "authorization_pending")
        assert device.username is not None
        device.status = "used"
        return self._issue_grant(client, device.username, device.scope)

    def _issue_access(self, grant: Grant) -> dict[str, Any]:
        access_token = self._make_token()
        self.access_tokens[access_token] = IssuedToken(
            username=grant.username,
            client_id=grant.client_id,
            expires_at=self.clock.seconds() + grant.expires_in,
        )
        return {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": grant.expires_in,
            "scope": grant.scope,
        }

    def _issue_grant(
        self, client: Client, username: str, scope: str, nonce: str | None = None
    ) -> dict[str, Any]:
        """A new refresh token for *username*, an access token and an id_token."""
        grant = Grant(
            refresh_token=self._make_token(),
            username=username,
            client_id=client.client_id,
            client_secret=client.client_secret,
            scope=scope,
        )
        self.grants[grant.refresh_token] = grant
        answer = self._issue_access(grant)
        answer["refresh_token"] = grant.refresh_token
        answer["id_token"] = self.id_token(client, username, nonce)
        return answer

    def id_token(self, client: Client, username: str, nonce: str | None = None) -> str:
        """An OpenID Connect ID token, HS256-signed with the client secret."""
        now = int(self.clock.seconds())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": client.client_id,
            "sub": str(int(hashlib.sha256(username.encode()).hexdigest(), 16))[:21],
            "email": username,
            "email_verified": True,
            "preferred_username": username,
            "iat": now,
            "exp": now + ID_TOKEN_LIFETIME,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode())
            for part in ({"alg": "HS256", "typ": "JWT"}, claims)
        )
        mac = hmac.new(client.client_secret.encode(), signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{_b64url(mac.digest())}"

    # -- introspection ------------------------------------------------------

    def introspect(self, token: str) -> dict[str, Any]:
        self.introspect_calls += 1
        issued = self.access_tokens.get(token)
        if issued is None or not issued.valid or self.clock.seconds() >= issued.expires_at:
            return {"active": False}
        return {
            "active": True,
            "username": issued.username,
            "client_id": issued.client_id,
            "token_type": "Bearer",
            "exp": int(issued.expires_at),
        }


# -- HTTP plumbing ----------------------------------------------------------


def _normalize_user_code(user_code: str) -> str:
    """``abcd efgh`` or ``ABCDEFGH`` as the canonical ``ABCD-EFGH``."""
    letters = "".join(c for c in user_code.upper() if c.isalnum())
    return f"{letters[:4]}-{letters[4:]}" if len(letters) == 8 else user_code


def _with_query(uri: str, params: dict[str, str]) -> str:
    """*uri* with *params* appended to its query (RFC 6749 3.1.2)."""
    parts = urlsplit(uri)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


def _form(request: Request) -> dict[str, str]:
    """The form-encoded body (first value of each field) as text."""
    return {
        k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
        for k, v in (request.args or {}).items()
        if v
    }


def _basic_auth(request: Request) -> tuple[str, str] | None:
    """Client credentials from an ``Authorization: Basic`` header.

    RFC 6749 section 2.3.1 has the client form-urlencode both parts first.
    """
    header = request.getHeader("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    user, _, password = decoded.partition(":")
    return unquote_plus(user), unquote_plus(password)


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader("content-type", "application/json")
    request.setHeader("cache-control", "no-store")
    request.setHeader("pragma", "no-cache")
    return json.dumps(body).encode()


def _json_body(request: Request) -> dict[str, Any]:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("JSON body must be an object")
    return body


def _page(request: Request, status: int, title: str, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader("content-type", "text/html; charset=utf-8")
    return (
        f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    ).encode()


class TokenApp:
    """The HTTPS side: authorization, token and device endpoints."""

    app = Klein()

    def __init__(self, state: ProviderState, clock: IReactorTime) -> None:
        self.state = state
        self.clock = clock

    @app.route("/token", methods=["POST"])
    def token(self, request: Request) -> Any:
        basic = _basic_auth(request)
        try:
            status, body = 200, self.state.token(_form(request), basic)
        except OAuthError as e:
            status, body = e.status, e.body()
            if e.status == 401 and basic is not None:
                request.setHeader("www-authenticate", 'Basic realm="token"')
        # The request is processed on arrival (a rotation takes effect even
        # if the client gives up); only the answer is delayed.
        if self.state.delay > 0:
            return task.deferLater(self.clock, self.state.delay, _json, request, status, body)
        return _json(request, status, body)

    @app.route("/authorize", methods=["GET"])
    def authorize(self, request: Request) -> bytes:
        try:
            location = self.state.authorize(_form(request))
        except AuthorizePageError as e:
            return _page(request, 400, "Error 400: invalid_request", str(e))
        request.setResponseCode(302)
        request.setHeader("location", location.encode())
        request.setHeader("cache-control", "no-store")
        return b""

    @app.route("/device", methods=["POST"])
    def device(self, request: Request) -> bytes:
        basic = _basic_auth(request)
        try:
            return _json(request, 200, self.state.device_authorization(_form(request), basic))
        except OAuthError as e:
            return _json(request, e.status, e.body())

    @app.route("/verify", methods=["GET"])
    def verify(self, request: Request) -> bytes:
        return _page(
            request,
            200,
            "Connect a device",
            "Nobody types codes here: tests approve them with /control/device/approve.",
        )


class ControlApp:
    """The plain-HTTP side: introspection for Dovecot and test controls.

    ``POST /control/grant`` ``{"refresh_token", "username", "client_id",
    "client_secret", "expires_in"?, "rotate"?, "scope"?}``;
    ``POST /control/revoke-grant`` ``{"refresh_token", "revoke_access"?}``;
    ``POST /control/expire-access`` ``{"username"?}``;
    ``POST /control/fail`` ``{"status", "count"}`` (count -1: forever, 0: off);
    ``POST /control/delay`` ``{"seconds"}``;
    ``POST /control/introspection-hold`` ``{"hold"}`` (true: introspection
    answers wait, false: they go out);
    ``POST /control/client`` ``{"client_id", "client_secret",
    "redirect_uris"?}`` (adds redirect URIs; 409 for another secret);
    ``POST /control/consent`` ``{"username", "deny"?}``;
    ``POST /control/device/approve`` ``{"user_code", "username"}``;
    ``POST /control/device/deny`` ``{"user_code"}`` (both 404 unless pending);
    ``POST /control/device/interval`` ``{"seconds"}``;
    ``GET /control/device/pending`` → ``{"user_codes"}``;
    ``GET /control/stats``; ``POST /control/reset-stats``.
    """

    app = Klein()

    def __init__(self, state: ProviderState) -> None:
        self.state = state

    @app.route("/introspect", methods=["POST"])
    def introspect(self, request: Request) -> Any:
        form = _form(request)
        client_id, client_secret = _basic_auth(request) or (
            form.get("client_id", ""),
            form.get("client_secret", ""),
        )
        if (client_id, client_secret) != (
            INTROSPECTION_CLIENT_ID,
            INTROSPECTION_CLIENT_SECRET,
        ):
            return _json(request, 401, {"error": "invalid_client"})
        # Counted and decided on arrival; only the answer waits for a hold.
        body = self.state.introspect(form.get("token", ""))
        if self.state.introspection_held is not None:
            waiting: defer.Deferred[None] = defer.Deferred()
            self.state.introspection_held.append(waiting)
            return waiting.addCallback(lambda _: _json(request, 200, body))
        return _json(request, 200, body)

    @app.handle_errors(KeyError, ValueError, TypeError)
    def bad_control_request(self, request: Request, failure: Any) -> bytes:
        return _json(request, 400, {"error": repr(failure.value)})

    @app.route("/control/grant", methods=["POST"])
    def grant(self, request: Request) -> bytes:
        body = _json_body(request)
        grant = Grant(
            refresh_token=str(body["refresh_token"]),
            username=str(body["username"]),
            client_id=str(body["client_id"]),
            client_secret=str(body["client_secret"]),
            expires_in=int(body.get("expires_in", 3600)),
            rotate=bool(body.get("rotate", False)),
            scope=str(body.get("scope", DEFAULT_SCOPE)),
        )
        try:
            self.state.add_grant(grant)
        except ValueError as e:
            return _json(request, 409, {"error": str(e)})
        return _json(request, 200, {"ok": True})

    @app.route("/control/revoke-grant", methods=["POST"])
    def revoke_grant(self, request: Request) -> bytes:
        body = _json_body(request)
        found = self.state.revoke_grant(
            str(body["refresh_token"]), bool(body.get("revoke_access", False))
        )
        return _json(request, 200, {"ok": True, "found": found})

    @app.route("/control/expire-access", methods=["POST"])
    def expire_access(self, request: Request) -> bytes:
        username = _json_body(request).get("username")
        n = self.state.expire_access(None if username is None else str(username))
        return _json(request, 200, {"ok": True, "expired": n})

    @app.route("/control/fail", methods=["POST"])
    def fail(self, request: Request) -> bytes:
        body = _json_body(request)
        self.state.set_failure(int(body.get("status", 503)), int(body["count"]))
        return _json(request, 200, {"ok": True})

    @app.route("/control/delay", methods=["POST"])
    def delay(self, request: Request) -> bytes:
        seconds = float(_json_body(request)["seconds"])
        if seconds < 0:
            raise ValueError("negative delay")
        self.state.delay = seconds
        return _json(request, 200, {"ok": True})

    @app.route("/control/introspection-hold", methods=["POST"])
    def introspection_hold(self, request: Request) -> bytes:
        if _json_body(request)["hold"]:
            if self.state.introspection_held is None:
                self.state.introspection_held = []
        else:
            held, self.state.introspection_held = self.state.introspection_held or [], None
            for waiting in held:
                waiting.callback(None)
        return _json(request, 200, {"ok": True})

    @app.route("/control/client", methods=["POST"])
    def client(self, request: Request) -> bytes:
        body = _json_body(request)
        uris = body.get("redirect_uris", [])
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise TypeError("redirect_uris must be a list of strings")
        try:
            client = self.state.register_client(
                str(body["client_id"]), str(body["client_secret"]), uris
            )
        except ValueError as e:
            return _json(request, 409, {"error": str(e)})
        return _json(request, 200, {"ok": True, "redirect_uris": client.redirect_uris})

    @app.route("/control/consent", methods=["POST"])
    def consent(self, request: Request) -> bytes:
        body = _json_body(request)
        username = body["username"]
        self.state.set_consent(
            None if username is None else str(username), bool(body.get("deny", False))
        )
        return _json(request, 200, {"ok": True})

    @app.route("/control/device/approve", methods=["POST"])
    def device_approve(self, request: Request) -> bytes:
        body = _json_body(request)
        user_code, username = str(body["user_code"]), str(body["username"])
        try:
            self.state.approve_device(user_code, username)
        except LookupError as e:
            return _json(request, 404, {"error": str(e.args[0])})
        return _json(request, 200, {"ok": True})

    @app.route("/control/device/deny", methods=["POST"])
    def device_deny(self, request: Request) -> bytes:
        user_code = str(_json_body(request)["user_code"])
        try:
            self.state.deny_device(user_code)
        except LookupError as e:
            return _json(request, 404, {"error": str(e.args[0])})
        return _json(request, 200, {"ok": True})

    @app.route("/control/device/interval", methods=["POST"])
    def device_interval(self, request: Request) -> bytes:
        seconds = int(_json_body(request)["seconds"])
        if seconds < 0:
            raise ValueError("negative interval")
        self.state.device_interval = seconds
        return _json(request, 200, {"ok": True})

    @app.route("/control/device/pending", methods=["GET"])
    def device_pending(self, request: Request) -> bytes:
        return _json(request, 200, {"user_codes": self.state.pending_user_codes()})

    @app.route("/control/stats", methods=["GET"])
    def stats(self, request: Request) -> bytes:
        return _json(request, 200, self.state.stats())

    @app.route("/control/reset-stats", methods=["POST"])
    def reset_stats(self, request: Request) -> bytes:
        self.state.reset_stats()
        return _json(request, 200, {"ok": True})


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls-cert", required=True)
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--ports-file", required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor, ssl
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    with open(args.tls_cert, "rb") as f:
        cert_pem = f.read()
    with open(args.tls_key, "rb") as f:
        key_pem = f.read()
    tls_options = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem).options()

    state = ProviderState(reactor)
    https = reactor.listenSSL(
        0,
        Site(TokenApp(state, reactor).app.resource()),
        tls_options,
        interface="127.0.0.1",
    )
    http = reactor.listenTCP(0, Site(ControlApp(state).app.resource()), interface="127.0.0.1")
    ports = {"https": https.getHost().port, "http": http.getHost().port}
    state.issuer = f"https://127.0.0.1:{ports['https']}"
    _write_atomically(args.ports_file, json.dumps(ports).encode())
    reactor.run()


if __name__ == "__main__":
    main()
