"""
``/metrics`` (Prometheus' text format), on the API listener and on the
listeners of ``--metrics-port``, which serve nothing else.

Who may read it: a Bearer token with scope ``metrics`` (or ``*``), checked
like any API token (penalties included); without a token, loopback clients
only (the real client behind a PROXY header, as the listener reports it).
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException

from ..cred import TokenChecker, TokenCredentials
from ..errors import AccessDenied
from ..metrics import Metrics
from ..penalties import PenaltyInForce
from ..store import StoreUnavailable
from ..tokens import clientAddress
from ._http import REQUEST_DEADLINE, DeadlineSite, LimitedRequest, redactingLogFormatter

log = Logger(namespace="proxy.api")

METRICS_SCOPE = "metrics"


def anonymousAllowed(address: str) -> bool:
    """Whether a client presenting no token may read /metrics: loopback only."""
    ip = clientAddress(address)
    return ip is not None and ip.is_loopback


def _json(request: Any, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps({"error": message, "statusCode": status}).encode("utf-8")


class MetricsPage:
    """
    :param metrics: the service's ``Metrics``.
    :param checker: a ``TokenChecker`` with scope ``metrics`` and ``refuse``.
    """

    def __init__(self, metrics: Metrics, checker: TokenChecker):
        self.metrics = metrics
        self.checker = checker

    async def render(self, request: Any) -> bytes:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        # What needs the store is read here, asynchronously, before the
        # synchronous collectors run.
        await self.metrics.refresh()
        body = generate_latest(self.metrics.registry)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    async def _refusal(self, request: Any) -> bytes | None:
        """None when the request may read the metrics, else the answer."""
        address = getattr(request.getClientAddress(), "host", "")
        header = request.getHeader(b"authorization")
        if header is None:
            if anonymousAllowed(address):
                return None
            request.setHeader(b"WWW-Authenticate", b"Bearer")
            return _json(request, 401, "a Bearer token with scope metrics is required")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not value.strip():
            return _json(request, 401, "missing Bearer token")
        presented = value.strip().decode("ascii", "surrogateescape")
        creds = TokenCredentials(account=None, token=presented, address=address, protocol="api")
        try:
            await self.checker.check(creds)
        except PenaltyInForce as e:
            request.setHeader(b"Retry-After", str(e.retryAfter).encode("ascii"))
            return _json(request, 429, "too many failed logins from this address, retry later")
        except AccessDenied as e:
            return _json(
                request, 401 if e.reason in ("unknown-token", "expired") else 403, e.message
            )
        except StoreUnavailable:
            self.metrics.storeFailed("api")
            return _json(request, 503, "the store is unavailable, try again later")
        return None


class MetricsSite:
    """The Klein app of a ``--metrics-port`` listener: /metrics and nothing else."""

    app = Klein()

    def __init__(self, page: MetricsPage, clock: Any):
        self.page = page
        self._clock = clock

    def site(self, deadline: float = REQUEST_DEADLINE) -> DeadlineSite:
        site = DeadlineSite(
            self.app.resource(), logFormatter=redactingLogFormatter, reactor=self._clock
        )
        site.deadline = deadline
        site.requestFactory = LimitedRequest
        site.displayTracebacks = False
        site.noisy = False
        return site

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request: Any) -> bytes:
        return await self.page.render(request)

    @app.route("/", branch=True, methods=["GET", "HEAD"])
    def elsewhere(self, request: Any) -> bytes:
        return _json(request, 404, "not found (this listener serves /metrics only)")

    @app.handle_errors(HTTPException)
    def _httpError(self, request: Any, failure: Any) -> bytes:
        e = failure.value
        return _json(request, e.code or 500, e.name)

    @app.handle_errors(Exception)
    def _unexpected(self, request: Any, failure: Any) -> bytes:
        log.failure("metrics request failed", failure)
        return _json(request, 500, "internal error")
