"""
Tests for ``proxy.web.metrics``: who may read /metrics (a token of scope
``metrics`` or ``*``, else loopback clients only), on the API and on a
``--metrics-port`` listener of its own.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from proxy.cred import TokenChecker
from proxy.model import Token
from proxy.tokens import withinLimits
from proxy.web import METRICS_SCOPE, MetricsPage, MetricsSite
from proxy.web.metrics import anonymousAllowed
from tests.test_api import APITestCase


class AccessTests(APITestCase):
    def scrape(self, token: str | None) -> dict[str, object]:
        reply = self.call("GET", "/metrics", token=token)
        self.assertEqual(reply.status, 200, reply.text)
        [kind] = reply.headers.getRawHeaders(b"content-type")
        self.assertTrue(kind.startswith(b"text/plain"), kind)
        return {f.name: f for f in text_string_to_metric_families(reply.text)}

    def test_loopbackWithoutToken(self):
        """A loopback client (StubTreq's) reads the metrics without a token."""
        families = self.scrape(None)
        self.assertIn("imapproxy_logins", families)
        self.assertIn("imapproxy_store_up", families)

    def test_metricsOrStarScope(self):
        """A token of scope metrics, or *, reads the metrics."""
        self.scrape(self.addToken(None, (METRICS_SCOPE,)))
        self.scrape(self.root)

    def test_refused(self):
        """Without the scope 403, an unknown token 401: a token given is always checked."""
        self.assertError(self.call("GET", "/metrics", token=self.addToken(None, ("api",))), 403)
        self.assertError(self.call("GET", "/metrics", token="0" * 64), 401)
        self.assertError(self.call("GET", "/metrics", headers={"Authorization": "Basic x"}), 401)

    def test_notLoopback(self):
        """Elsewhere than loopback: 401 without a token, the metrics with one of scope metrics."""
        page = self.api.metricsPage

        def render(token: str | None) -> DummyRequest:
            request = DummyRequest([b"metrics"])
            request.client = IPv4Address("TCP", "192.0.2.5", 4000)
            if token is not None:
                request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + token.encode())
            request.body = self.successResultOf(page.render(request))
            return request

        refused = render(None)
        self.assertEqual(refused.responseCode, 401)
        self.assertEqual(refused.responseHeaders.getRawHeaders(b"www-authenticate"), [b"Bearer"])
        allowed = render(self.addToken(None, (METRICS_SCOPE,)))
        self.assertIsNone(allowed.responseCode)  # 200
        self.assertIn(b"imapproxy_logins", allowed.body)

    def test_ownListener(self):
        """A --metrics-port listener serves /metrics and answers 404 for the rest."""
        page = MetricsPage(
            self.api.metricsPage.metrics, TokenChecker(self.store, self.clock, METRICS_SCOPE)
        )
        stub = StubTreq(MetricsSite(page, self.clock).app.resource())
        for method, path, status in (
            ("GET", "/metrics", 200),
            ("GET", "/v1/accounts", 404),
            ("GET", "/", 404),
            ("POST", "/metrics", 405),
        ):
            d = stub.request(method, "http://metrics.example" + path)
            stub.flush()
            self.assertEqual(self.successResultOf(d).code, status, path)
        self.assertEqual(self.flushLoggedErrors(), [])


class DecisionTests(APITestCase):
    def test_anonymousAllowed(self):
        """Only loopback addresses (IPv4, IPv6, IPv4-mapped) read without a token."""
        for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(anonymousAllowed(address), address)
        for address in ("10.0.0.1", "192.0.2.5", "::ffff:10.0.0.1", "2001:db8::1", "", "x"):
            self.assertFalse(anonymousAllowed(address), address)

    def test_apiTokensMintMetricsTokens(self):
        """An api token may issue a metrics token; a metrics token may issue nothing."""
        api = Token(id="a", account=None, scopes=("api",), description="")
        metrics = Token(id="m", account=None, scopes=(METRICS_SCOPE,), description="")
        self.assertIsNone(withinLimits(api, metrics))
        self.assertIsNotNone(withinLimits(metrics, metrics))
