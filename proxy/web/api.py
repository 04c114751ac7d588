"""
The HTTP API (Klein, in the proxy's reactor): tokens and accounts as JSON,
behind Bearer tokens with the ``api`` scope. Every answer, errors included,
is JSON; no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import os
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web import resource
from werkzeug.exceptions import HTTPException

from ..admin import Admin, AdminError, NotFound, accountView, appView, tokenView
from ..cred import API_SCOPE, TokenChecker, TokenCredentials
from ..errors import AccessDenied
from ..metrics import Metrics
from ..model import Token
from ..oauth.onboarding import Onboarding
from ..penalties import PenaltyInForce
from ..store import StoreDataLost, StoreUnavailable
from ..throttle import accountViews
from ..tokens import mayRevoke
from ._http import (
    MAX_BODY,
    REQUEST_DEADLINE,
    DeadlineSite,
    LimitedRequest,
    page,
    redactingLogFormatter,
)
from ._sessions import addRoutes
from .metrics import METRICS_SCOPE, MetricsPage

log = Logger(namespace="proxy.api")


OPENAPI_PATH = os.path.join(os.path.dirname(__file__), "openapi.json")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _JSONRoot(resource.Resource):
    """Klein answers a URL that is not UTF-8 in plain text: answer it in JSON."""

    isLeaf = True

    def __init__(self, klein: resource.Resource):
        super().__init__()
        self._klein = klein

    def render(self, request: Any) -> Any:
        request.setHeader(b"server", b"imapproxy")  # not TwistedWeb/<version>
        try:
            b"/".join(request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, 400, "the URL is not valid UTF-8")
        return self._klein.render(request)


def _send(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


def _error(request: Any, status: int, message: str) -> bytes:
    return _send(request, status, {"error": message, "statusCode": status})


def _flag(request: Any, name: bytes) -> bool:
    values = request.args.get(name, [])
    if not values:
        return False
    value = values[-1].lower()
    if value in (b"true", b"1", b"yes"):
        return True
    if value in (b"false", b"0", b"no"):
        return False
    raise ApiError(400, f"{name.decode()} must be true or false")


class TokenAPI:
    """
    :param admin: the shared operations (with this process's live sessions).
    :param clock: ``IReactorTime``.
    :param checker: the ``TokenChecker`` for bearer tokens (scope ``api``,
        refusing with 429 while an address is penalised); by default one
        over the admin's store without penalties.
    """

    app = Klein()

    def __init__(
        self,
        admin: Admin,
        clock: Any,
        onboarding: Onboarding | None = None,
        checker: TokenChecker | None = None,
        metricsPage: MetricsPage | None = None,
    ):
        self.admin = admin
        self.store = admin.store
        self.onboarding = onboarding
        self._clock = clock
        self.checker = checker or TokenChecker(self.store, clock, scope=API_SCOPE, refuse=True)
        self.metricsPage = metricsPage or MetricsPage(
            Metrics(clock, process=False),
            TokenChecker(self.store, clock, scope=METRICS_SCOPE, refuse=True),
        )
        with open(OPENAPI_PATH, "rb") as f:
            self._openapi = f.read()

    def site(self, deadline: float = REQUEST_DEADLINE) -> DeadlineSite:
        """
        :param deadline: seconds a client has to send a whole request.
        """
        site = DeadlineSite(
            _JSONRoot(self.app.resource()),
            logFormatter=redactingLogFormatter,
            reactor=self._clock,
        )
        site.deadline = deadline
        site.requestFactory = LimitedRequest
        site.displayTracebacks = False
        site.noisy = False
        return site

    # -- plumbing -----------------------------------------------------------

    async def _caller(self, request: Any) -> Token:
        """
        The API token presenting this request, checked by the same
        ``TokenChecker`` as IMAP logins (scope ``api``), penalties included.
        """
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not value.strip():
            raise ApiError(401, "missing Bearer token")
        # Not ASCII is simply not a token: let the checker refuse (and count) it.
        presented = value.strip().decode("ascii", "surrogateescape")
        address = getattr(request.getClientAddress(), "host", "")
        creds = TokenCredentials(account=None, token=presented, address=address, protocol="api")
        try:
            return await self.checker.check(creds)
        except PenaltyInForce as e:
            request.setHeader(b"Retry-After", str(e.retryAfter).encode("ascii"))
            raise ApiError(429, "too many failed logins from this address, retry later") from None
        except AccessDenied as e:
            if e.reason in ("unknown-token", "expired"):
                raise ApiError(401, e.message) from None
            raise ApiError(403, e.message) from None

    @staticmethod
    def _mayUse(caller: Token, account: str | None) -> None:
        """Root tokens act on every account; account tokens on their own only."""
        if caller.account is not None and caller.account != account:
            raise ApiError(403, "this token may not act on that account")

    @staticmethod
    def _body(request: Any) -> Any:
        if getattr(request, "tooLarge", False):
            raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
        raw = request.content.read()
        if not raw.strip():
            raise ApiError(400, "a JSON body is required")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply") from None

    # -- errors -------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _apiError(self, request: Any, failure: Any) -> bytes:
        return _error(request, failure.value.status, failure.value.message)

    @app.handle_errors(AdminError)
    def _adminError(self, request: Any, failure: Any) -> bytes:
        return _error(request, failure.value.status, failure.value.message)

    @app.handle_errors(StoreUnavailable)
    def _storeDown(self, request: Any, failure: Any) -> bytes:
        log.warn("API request failed: the store is unavailable")
        self.metricsPage.metrics.storeFailed("api")
        return _error(request, 503, "the store is unavailable, try again later")

    @app.handle_errors(HTTPException)
    def _httpError(self, request: Any, failure: Any) -> bytes:
        e = failure.value
        return _error(request, e.code or 500, e.name)

    @app.handle_errors(Exception)
    def _unexpected(self, request: Any, failure: Any) -> bytes:
        log.failure("API request failed", failure)
        return _error(request, 500, "internal error")

    # -- tokens -------------------------------------------------------------

    @app.route("/v1/token", methods=["POST"])
    @app.route("/v1/tokens", methods=["POST"])
    async def createToken(self, request: Any) -> bytes:
        caller = await self._caller(request)
        data = self._body(request)
        account = data.get("account") if isinstance(data, dict) else None
        self._mayUse(caller, account)
        token, record = await self.admin.issueToken(data, caller)
        log.info(
            "token {id} issued for {account} by token {caller}",
            id=record.id[:12],
            account=record.account or "(root)",
            caller=caller.id[:12],
        )
        return _send(request, 200, {"token": token, "id": record.id})

    @app.route("/v1/tokens", methods=["GET"])
    async def listTokens(self, request: Any) -> bytes:
        caller = await self._caller(request)
        accounts = request.args.get(b"account")
        account = accounts[-1].decode("utf-8", "replace") if accounts else caller.account
        self._mayUse(caller, account)
        tokens = await self.admin.listTokens(account)
        return _send(request, 200, {"tokens": [tokenView(t) for t in tokens]})

    @app.route("/v1/tokens/account/<string:account>", methods=["GET"])
    async def listAccountTokens(self, request: Any, account: str) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, account)
        tokens = await self.admin.listTokens(account)
        return _send(request, 200, {"tokens": [tokenView(t) for t in tokens]})

    @app.route("/v1/token/<string:token>", methods=["DELETE"])
    @app.route("/v1/tokens/<string:token>", methods=["DELETE"])
    async def deleteToken(self, request: Any, token: str) -> bytes:
        caller = await self._caller(request)
        disconnect = _flag(request, b"disconnect")
        record = await self.admin.findToken(token)
        if caller.account is not None and record.account != caller.account:
            raise NotFound("no such token")
        if record.id != caller.id and not mayRevoke(caller, record):
            # Least privilege: a leaked narrow token must not lock out the
            # operator by revoking the wider tokens above it.
            raise ApiError(403, "this token cannot revoke a token with more power than its own")
        closed = await self.admin.revokeToken(record.id, disconnect=disconnect, actor=caller.id)
        log.info(
            "token {id} revoked by token {caller}, {n} sessions closed",
            id=record.id[:12],
            caller=caller.id[:12],
            n=closed,
        )
        body: dict[str, Any] = {"deleted": True}
        if disconnect:
            body["disconnected"] = closed
        return _send(request, 200, body)

    # -- accounts -----------------------------------------------------------

    @app.route("/v1/account", methods=["POST"])
    @app.route("/v1/accounts", methods=["POST"])
    async def createAccount(self, request: Any) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, None)
        account = await self.admin.createAccount(self._body(request), actor=caller.id)
        log.info(
            "account {account} created by token {caller}", account=account.id, caller=caller.id[:12]
        )
        return _send(request, 200, accountView(account))

    @app.route("/v1/accounts", methods=["GET"])
    async def listAccounts(self, request: Any) -> bytes:
        caller = await self._caller(request)
        if caller.account is not None:
            accounts = [await self.admin.getAccount(caller.account)]
        else:
            accounts = await self.admin.listAccounts()
        return _send(request, 200, {"accounts": await accountViews(self.admin, accounts)})

    @app.route("/v1/account/<string:account>", methods=["GET"])
    async def getAccount(self, request: Any, account: str) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, account)
        return _send(request, 200, (await accountViews(self.admin, [account]))[0])

    @app.route("/v1/account/<string:account>", methods=["PUT"])
    async def updateAccount(self, request: Any, account: str) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, account)
        data = self._body(request)
        if caller.account is not None:
            # An account's own token may hand in a new grant, nothing more:
            # where its mailbox lives, its OAuth2 client and its state are
            # the operator's (they decide where tokens and secrets are sent).
            oauth = data.get("oauth2") if isinstance(data, dict) else None
            if not (
                isinstance(data, dict)
                and set(data) <= {"oauth2"}
                and isinstance(oauth, dict)
                and set(oauth) <= {"refreshToken"}
            ):
                raise ApiError(403, "an account token may only change oauth2.refreshToken")
        updated = await self.admin.updateAccount(account, data, actor=caller.id)
        log.info(
            "account {account} updated by token {caller}", account=account, caller=caller.id[:12]
        )
        return _send(request, 200, accountView(updated))

    @app.route("/v1/account/<string:account>", methods=["DELETE"])
    async def deleteAccount(self, request: Any, account: str) -> bytes:
        caller = await self._caller(request)
        if caller.account is not None:
            # What an account holds is the operator's to end, not its own token's.
            raise ApiError(403, "an account token may not delete its account")
        closed = await self.admin.removeAccount(account, actor=caller.id)
        log.info(
            "account {account} deleted by token {caller}, {n} sessions closed",
            account=account,
            caller=caller.id[:12],
            n=closed,
        )
        return _send(request, 200, {"deleted": True, "disconnected": closed})

    # -- OAuth2 apps and onboarding ------------------------------------------

    @app.route("/v1/oauth2", methods=["POST"])
    async def createApp(self, request: Any) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, None)
        created = await self.admin.createApp(self._body(request), actor=caller.id)
        log.info(
            "OAuth2 app {app} created by token {caller}", app=created.id, caller=caller.id[:12]
        )
        return _send(request, 200, appView(created))

    @app.route("/v1/oauth2", methods=["GET"])
    async def listApps(self, request: Any) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, None)
        return _send(request, 200, {"apps": [appView(a) for a in await self.admin.listApps()]})

    @app.route("/v1/oauth2/<string:appId>", methods=["GET"])
    async def getApp(self, request: Any, appId: str) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, None)
        return _send(request, 200, appView(await self.admin.getApp(appId)))

    @app.route("/v1/oauth2/<string:appId>", methods=["DELETE"])
    async def deleteApp(self, request: Any, appId: str) -> bytes:
        caller = await self._caller(request)
        self._mayUse(caller, None)
        await self.admin.removeApp(appId, actor=caller.id)
        log.info("OAuth2 app {app} deleted by token {caller}", app=appId, caller=caller.id[:12])
        return _send(request, 200, {"deleted": True})

    @app.route("/v1/oauth2/authorize", methods=["POST"])
    async def authorize(self, request: Any) -> bytes:
        """Start a consent; the answer's ``url`` goes to the mailbox owner."""
        caller = await self._caller(request)
        data = self._body(request)
        self._mayUse(caller, data.get("account") if isinstance(data, dict) else None)
        if caller.account is not None:
            # Re-authorizing its own, existing account only, as it is, through
            # the app it already uses (the client is the operator's choice).
            own = await self.admin.getAccount(caller.account)
            if isinstance(data, dict) and ("imap" in data or "smtp" in data):
                raise ApiError(403, "an account token may not set imap or smtp")
            if not isinstance(data, dict) or data.get("app") != own.oauth2.app:
                raise ApiError(403, "an account token may only re-authorize through its app")
        if self.onboarding is None:
            raise ApiError(503, "onboarding is not available")
        return _send(request, 200, await self.onboarding.start(data))

    @app.route("/oauth2/callback", methods=["GET"])
    async def callback(self, request: Any) -> bytes:
        """Where the provider sends the mailbox owner back: a plain page, no token needed."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        args = {
            k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace")
            for k, v in request.args.items()
            if v
        }
        if self.onboarding is None:
            request.setResponseCode(503)
            return page("Not available", "Onboarding is not available on this server.")
        try:
            account = await self.onboarding.finish(args)
        except AdminError as e:
            request.setResponseCode(400)
            return page("Authorization failed", e.message)
        return page(
            "Mailbox connected",
            f"The mailbox {account.email} is now connected as account "
            f"{account.id}. You can close this page.",
        )

    # -- service ------------------------------------------------------------

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self._openapi

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request: Any) -> bytes:
        """Prometheus' text format: ``proxy.web.metrics``."""
        return await self.metricsPage.render(request)

    @app.route("/health", methods=["GET"])
    async def health(self, request: Any) -> bytes:
        """
        The store must answer and still hold its data: a token read checks
        the marker the store wrote when it was created, so a Redis restarted
        empty is reported (with the reason; the store logs it once), not
        taken for a healthy store that refuses every login.
        """
        if getattr(self.admin.sessions, "draining", None) is not None:  # stopping: drain.py
            return _send(request, 503, {"status": "draining", "statusCode": 503})
        try:
            await self.store.getToken("0" * 64)
        except StoreDataLost as e:
            body = {"status": "unavailable", "store": str(e), "statusCode": 503}
            return _send(request, 503, body)
        except Exception as e:
            log.warn("health check: the store does not answer: {error}", error=type(e).__name__)
            return _send(request, 503, {"status": "unavailable", "statusCode": 503})
        return _send(request, 200, {"status": "ok"})


addRoutes(TokenAPI.app)
