"""A fake OAuth2 provider for tests (Twisted + Klein).

Run it as ``python -m tests.upstream.provider --tls-cert C --tls-key K
--ports-file F`` from the repository root.  It listens on 127.0.0.1 on two
ephemeral ports and, once both listen, atomically writes
``{"https": N, "http": M}`` to the ports file.

HTTPS port
    ``POST /token``: the OAuth2 token endpoint (``grant_type=refresh_token``
    only; client authentication in the form body or with HTTP Basic).

HTTP port
    ``POST /introspect``: RFC 7662 token introspection for Dovecot (its client
    is ``test-client``/``test-secret``).

    ``/control/...``: JSON endpoints that tests use to register grants,
    revoke them, expire access tokens, inject failures and latency, and read
    call counters (see :class:`ControlApp`).

All state lives in one :class:`ProviderState` whose clock is injectable, so it
can be unit-tested with :class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import secrets
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

import attrs
from klein import Klein
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request, Site

__all__ = [
    "INTROSPECTION_CLIENT_ID",
    "INTROSPECTION_CLIENT_SECRET",
    "ControlApp",
    "Grant",
    "IssuedToken",
    "OAuthError",
    "ProviderState",
    "TokenApp",
    "main",
]

INTROSPECTION_CLIENT_ID = "test-client"
INTROSPECTION_CLIENT_SECRET = "test-secret"
DEFAULT_SCOPE = "https://mail.google.com/"


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


@attrs.define
class Grant:
    """A refresh token registered through ``/control/grant``."""

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


class ProviderState:
    """Everything the fake provider knows; ``clock`` supplies ``seconds()``."""

    def __init__(
        self,
        clock: IReactorTime,
        make_token: Callable[[], str] = lambda: secrets.token_urlsafe(32),
    ) -> None:
        self.clock = clock
        self._make_token = make_token
        self.grants: dict[str, Grant] = {}
        self.clients: dict[str, str] = {}
        self.access_tokens: dict[str, IssuedToken] = {}
        self.fail_status = 503
        self.fail_count = 0  # >0: that many more failures; -1: forever
        self.delay = 0.0
        self.reset_stats()

    # -- statistics ---------------------------------------------------------

    def reset_stats(self) -> None:
        self.token_calls = 0
        self.introspect_calls = 0
        self.token_calls_by_username: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return {
            "token_calls": self.token_calls,
            "introspect_calls": self.introspect_calls,
            "token_calls_by_username": dict(self.token_calls_by_username),
        }

    # -- control ------------------------------------------------------------

    def add_grant(self, grant: Grant) -> None:
        known = self.clients.get(grant.client_id)
        if known is not None and known != grant.client_secret:
            raise ValueError(
                f"client {grant.client_id!r} is already registered with another secret"
            )
        self.clients[grant.client_id] = grant.client_secret
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

    # -- token endpoint -----------------------------------------------------

    def _take_failure(self) -> int | None:
        if self.fail_count == 0:
            return None
        if self.fail_count > 0:
            self.fail_count -= 1
        return self.fail_status

    def token(
        self,
        form: dict[str, str],
        basic: tuple[str, str] | None,
    ) -> dict[str, Any]:
        """Answer one token request; raise :class:`OAuthError` on refusal."""
        self.token_calls += 1
        grant = self.grants.get(form.get("refresh_token", ""))
        if grant is not None:
            self.token_calls_by_username[grant.username] += 1
        status = self._take_failure()
        if status is not None:
            raise OAuthError(status, "temporarily_unavailable", "injected failure")

        if basic is not None:
            if "client_secret" in form:
                raise OAuthError(400, "invalid_request", "more than one client authentication")
            client_id, client_secret = basic
        else:
            client_id = form.get("client_id", "")
            client_secret = form.get("client_secret", "")
        expected = self.clients.get(client_id)
        if expected is None or not secrets.compare_digest(
            expected.encode(), client_secret.encode()
        ):
            raise OAuthError(401, "invalid_client", "client authentication failed")

        grant_type = form.get("grant_type")
        if grant_type != "refresh_token":
            raise OAuthError(400, "unsupported_grant_type", f"unsupported: {grant_type!r}")
        if not form.get("refresh_token"):
            raise OAuthError(400, "invalid_request", "missing refresh_token")
        if grant is None:
            raise OAuthError(400, "invalid_grant", "refresh token is invalid or revoked")
        if grant.client_id != client_id:
            raise OAuthError(400, "invalid_grant", "refresh token was issued to another client")

        access_token = self._make_token()
        self.access_tokens[access_token] = IssuedToken(
            username=grant.username,
            client_id=client_id,
            expires_at=self.clock.seconds() + grant.expires_in,
        )
        answer: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": grant.expires_in,
            "scope": grant.scope,
        }
        if grant.rotate:
            del self.grants[grant.refresh_token]
            grant.refresh_token = self._make_token()
            self.grants[grant.refresh_token] = grant
            answer["refresh_token"] = grant.refresh_token
        return answer

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


class TokenApp:
    """The HTTPS side: the token endpoint."""

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


class ControlApp:
    """The plain-HTTP side: introspection for Dovecot and test controls.

    ``POST /control/grant`` ``{"refresh_token", "username", "client_id",
    "client_secret", "expires_in"?, "rotate"?, "scope"?}``;
    ``POST /control/revoke-grant`` ``{"refresh_token", "revoke_access"?}``;
    ``POST /control/expire-access`` ``{"username"?}``;
    ``POST /control/fail`` ``{"status", "count"}`` (count -1: forever, 0: off);
    ``POST /control/delay`` ``{"seconds"}``;
    ``GET /control/stats``; ``POST /control/reset-stats``.
    """

    app = Klein()

    def __init__(self, state: ProviderState) -> None:
        self.state = state

    @app.route("/introspect", methods=["POST"])
    def introspect(self, request: Request) -> bytes:
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
        return _json(request, 200, self.state.introspect(form.get("token", "")))

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
    _write_atomically(args.ports_file, json.dumps(ports).encode())
    reactor.run()


if __name__ == "__main__":
    main()
