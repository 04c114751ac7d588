"""
Webhooks (``proxy.alerts``) without sockets: the signature, the payloads,
delivery to a receiver served by ``StubTreq`` with a ``task.Clock`` for the
backoff and the timeouts, the queue's bound, the once-per-cluster rules,
the hooks in the API's ``Admin``, the start-up checks, and that no secret
reaches a log event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from proxy.alerts import (
    Alerts,
    Receiver,
    signature,
    verify,
)
from proxy.alerts._deliver import FIRST_DELAY, GIVE_UP, MAX_DELAY, REQUEST_TIMEOUT
from proxy.alerts._event import accountEvent, tokenEvent
from proxy.alerts._setup import _counters, receiverLabel
from proxy.metrics import Metrics
from tests.test_admin import NOW

SECRET = b"webhook-test-key-0123456789"
URL = "https://hooks.example.org/in/very-private-path?key=receiver-own-key"


class Hook(Resource):
    """A receiver: answers ``answers`` in turn (then 200), or holds requests."""

    isLeaf = True

    def __init__(self, answers: list[int] | None = None, hold: bool = False):
        super().__init__()
        self.answers = list(answers or [])
        self.hold = hold
        self.requests: list[tuple[dict[str, str], bytes]] = []

    def render_POST(self, request: Any) -> Any:
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((headers, request.content.read()))
        if self.hold:
            return NOT_DONE_YET
        request.setResponseCode(self.answers.pop(0) if self.answers else 200)
        return b""


def series(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sample.labels.values())] = sample.value
    return found


class EventTests(SynchronousTestCase):
    def test_signatureIsHmacOfTimestampDotBody(self):
        """The signature is what the docs tell receivers to compute."""
        body = b'{"type":"token.revoked"}'
        expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
        self.assertEqual(signature(SECRET, "1700000000", body), "sha256=" + expected)
        self.assertTrue(verify(SECRET, "1700000000", body, "sha256=" + expected))
        self.assertFalse(verify(SECRET, "1700000001", body, "sha256=" + expected))
        self.assertFalse(verify(SECRET, "1700000000", body + b" ", "sha256=" + expected))
        self.assertFalse(verify(b"another-key-0123456", "1700000000", body, "sha256=" + expected))

    def test_accountEventPayload(self):
        """A state change: type from the new state, both states, a fixed reason code."""
        event = accountEvent("alice", "ok", "reauth-required", "invalid-grant", NOW)
        assert event is not None
        self.assertEqual(
            json.loads(event.body()),
            {
                "type": "account.reauth-required",
                "id": event.id,
                "time": "2025-06-15T15:06:40Z",
                "account": "alice",
                "oldState": "ok",
                "newState": "reauth-required",
                "reason": "invalid-grant",
            },
        )
        self.assertIsNone(accountEvent("alice", "ok", "ok", "operator", NOW))
        recovered = accountEvent("alice", "disabled", "ok", "operator", NOW)
        assert recovered is not None
        self.assertEqual(recovered.type, "account.recovered")

    def test_revocationIdIsTheTokens(self):
        """Two instances revoking one token make one event id (the claim drops the second)."""
        one = tokenEvent("tid1", "alice", "revoked", "root", NOW)
        self.assertEqual(one.id, tokenEvent("tid1", "alice", "revoked", "cli", NOW + 5).id)
        self.assertNotEqual(one.id, tokenEvent("tid2", "alice", "revoked", "root", NOW).id)
        self.assertEqual(json.loads(one.body())["tokenId"], "tid1")  # the id, never the token


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.metrics = Metrics(self.clock, process=False)
        self.alerts = Alerts(clock=self.clock)
        self.alerts.counters = _counters(self.metrics, self.alerts)

    def receiver(self, hook: Hook, **kw: Any) -> tuple[Receiver, StubTreq]:
        http = StubTreq(hook)
        r = Receiver(URL, SECRET, http, self.clock, self.alerts.counters, receiverLabel(URL), **kw)
        self.alerts.receivers.append(r)
        return r, http

    def event(self, n: int = 1) -> Any:
        return tokenEvent(f"tid{n}", "alice", "revoked", "root", self.clock.seconds())

    def deliveries(self) -> dict[tuple[str, ...], float]:
        return {
            k: v for k, v in series(self.metrics, "imapproxy_webhook_deliveries_total").items() if v
        }

    def test_deliveredSigned(self):
        """A 2xx delivers: one POST of the body, signed over the timestamp and body."""
        hook = Hook()
        r, http = self.receiver(hook)
        event = self.event()
        r.add(event)
        http.flush()
        [(headers, body)] = hook.requests
        self.assertEqual(body, event.body())
        self.assertEqual(headers["x-imapproxy-timestamp"], str(int(NOW)))
        self.assertTrue(
            verify(SECRET, headers["x-imapproxy-timestamp"], body, headers["x-imapproxy-signature"])
        )
        self.assertEqual(headers["x-imapproxy-event-id"], event.id)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(self.deliveries(), {("delivered",): 1.0})
        self.assertEqual(len(r), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retriedWithBackoff(self):
        """5xx, 408 and 429: tried again after FIRST_DELAY, then twice that, each signed afresh."""
        hook = Hook([500, 429, 408, 204])
        r, http = self.receiver(hook)
        r.add(self.event())
        http.flush()
        for n, delay in enumerate([FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY], start=1):
            self.assertEqual(len(hook.requests), n)
            self.clock.advance(delay - 0.5)
            http.flush()
            self.assertEqual(len(hook.requests), n, "too early")
            self.clock.advance(0.5)
            http.flush()
        self.assertEqual(len(hook.requests), 4)
        stamps = [h["x-imapproxy-timestamp"] for h, _ in hook.requests]
        self.assertEqual(stamps[-1], str(int(NOW + 7 * FIRST_DELAY)))
        self.assertTrue(
            all(
                verify(SECRET, h["x-imapproxy-timestamp"], b, h["x-imapproxy-signature"])
                for h, b in hook.requests
            )
        )
        self.assertEqual(self.deliveries(), {("delivered",): 1.0})
        attempts = series(self.metrics, "imapproxy_webhook_attempts_total")
        self.assertEqual((attempts[("5xx",)], attempts[("4xx",)], attempts[("2xx",)]), (1, 2, 1))

    def test_4xxGivenUp(self):
        """A 4xx other than 408/429: the receiver refuses it, so it is not tried again."""
        hook = Hook([403])
        r, http = self.receiver(hook)
        r.add(self.event())
        http.flush()
        self.assertEqual(self.deliveries(), {("given-up",): 1.0})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(r), 0)

    def test_expiresAfterGiveUp(self):
        """A receiver that keeps failing is tried for GIVE_UP seconds, the delays capped."""
        hook = Hook([503] * 1000)
        r, http = self.receiver(hook)
        r.add(self.event())
        http.flush()
        while self.clock.getDelayedCalls():
            [call] = self.clock.getDelayedCalls()
            self.assertLessEqual(call.getTime() - self.clock.seconds(), MAX_DELAY)
            self.clock.advance(call.getTime() - self.clock.seconds())
            http.flush()
        self.assertLessEqual(self.clock.seconds(), NOW + GIVE_UP)
        self.assertEqual(self.deliveries(), {("expired",): 1.0})
        self.assertLess(len(hook.requests), 20)
        self.assertEqual(len(r), 0)

    def test_timeoutRetried(self):
        """A receiver that does not answer in REQUEST_TIMEOUT: a timeout, tried again later."""
        hook = Hook(hold=True)
        r, http = self.receiver(hook)
        r.add(self.event())
        http.flush()
        self.clock.advance(REQUEST_TIMEOUT)
        http.flush()
        attempts = series(self.metrics, "imapproxy_webhook_attempts_total")
        self.assertEqual(attempts[("timeout",)], 1.0)
        self.assertEqual(len(r), 1)
        hook.hold = False
        self.clock.advance(FIRST_DELAY)
        http.flush()
        self.assertEqual(self.deliveries(), {("delivered",): 1.0})

    def test_queueBoundDropsOldestWaiting(self):
        """Past maxQueue, the oldest waiting event is dropped (the one in flight stays), counted."""
        hook = Hook(hold=True)
        r, http = self.receiver(hook, maxQueue=3)
        events = [self.event(n) for n in range(6)]
        for e in events:
            r.add(e)
        http.flush()
        self.assertEqual([p.event.id for p in r.queue], [events[0].id, events[4].id, events[5].id])
        self.assertEqual(self.deliveries(), {("dropped",): 3.0})
        depth = series(self.metrics, "imapproxy_webhook_queue_depth")
        self.assertEqual(depth, {(): 3.0})
        r.stop()
        self.clock.advance(REQUEST_TIMEOUT)
        http.flush()

    def test_stopLeavesNoTimer(self):
        """At shutdown the backoff timer goes and nothing more is sent."""
        hook = Hook([500, 200])
        r, http = self.receiver(hook)
        r.add(self.event())
        http.flush()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.alerts.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        r.add(self.event(2))
        self.assertEqual(len(hook.requests), 1)

    def test_noSecretInLogs(self):
        """Failures and retries are logged without the key, the signature or the URL's path."""
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        hook = Hook([500, 400])
        r, http = self.receiver(hook)
        r.add(self.event())
        http.flush()
        self.clock.advance(FIRST_DELAY)
        http.flush()
        signatures = [h["x-imapproxy-signature"] for h, _ in hook.requests]
        self.assertTrue(any(e.get("event") == "webhook-delivery" for e in seen))
        text = "\n".join(formatEvent(e) + repr(sorted(map(str, e.values()))) for e in seen)
        for secret in [SECRET.decode(), "very-private-path", "receiver-own-key", *signatures]:
            self.assertNotIn(secret, text)
        self.assertIn("https://hooks.example.org", text)
        warned = [e for e in seen if e.get("event") == "webhook-delivery"]
        self.assertEqual([e["log_level"] for e in warned], [LogLevel.warn])
