"""
Delivering events to one webhook receiver, from the reactor.

One request at a time per receiver, in the order the events happened (a
receiver sees ``account.reauth-required`` before ``account.recovered``).
A request that does not end in ``REQUEST_TIMEOUT`` seconds, a connection
error, a 3xx, a 5xx, a 408 or a 429 is tried again after an exponential
backoff (``FIRST_DELAY`` doubling up to ``MAX_DELAY``) until ``GIVE_UP``
seconds after the event; any other 4xx is given up at once (the receiver
refuses it, and will again). The queue is bounded: past ``MAX_QUEUE``
events the oldest is dropped, and counted. Nothing here is awaited by a
login or an API request.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
from treq import collect
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from .. import auditlog
from ._event import Event, headers

log = Logger(namespace="proxy.alerts")

REQUEST_TIMEOUT = 10.0
FIRST_DELAY = 5.0
MAX_DELAY = 600.0
GIVE_UP = 3600.0
MAX_QUEUE = 1000
# Results of a delivery, the metric's label values.
RESULTS = ("delivered", "given-up", "expired", "dropped")
# Outcomes of one request (one attempt).
OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "timeout", "error")


def _timedOut(result: Any, timeout: float) -> Any:
    """A request cut at its deadline ends as a timeout (an Agent says otherwise)."""
    raise TimeoutError(f"no answer within {timeout}s")


def retryable(code: int) -> bool:
    """2xx is delivered; a 4xx but 408 and 429 says "never"; the rest "later"."""
    return not (400 <= code < 500) or code in (408, 429)


@attrs.frozen
class Counters:
    """The webhook metrics (``Metrics.webhookCounters``), by what they count."""

    events: Any
    deliveries: Any
    attempts: Any

    def event(self, kind: str) -> None:
        self.events.labels(kind).inc()

    def delivery(self, result: str) -> None:
        self.deliveries.labels(result).inc()

    def attempt(self, outcome: str) -> None:
        self.attempts.labels(outcome).inc()


@attrs.define(eq=False)
class _Pending:
    event: Event
    body: bytes
    attempts: int = 0


class Receiver:
    """
    :param url: where events are POSTed (``str``; only http and https).
    :param secret: the HMAC key.
    :param http: a treq ``HTTPClient`` (or ``StubTreq`` in tests).
    :param clock: ``IReactorTime``.
    :param counters: ``Counters`` (the metrics) or None.
    :param label: how the log names the receiver (scheme, host and port:
        a URL's path or query may hold a receiver's own token).
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        http: Any,
        clock: Any,
        counters: Any = None,
        label: str = "",
        maxQueue: int = MAX_QUEUE,
    ):
        self.url = url
        self._secret = secret
        self._http = http
        self._clock = clock
        self._counters = counters
        self.label = label or url
        self._max = maxQueue
        self.queue: collections.deque[_Pending] = collections.deque()
        self._busy = False
        self._timer: Any = None
        self._stopped = False
        self._idle: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self.queue)

    def whenIdle(self) -> Deferred[None]:
        """Fires once every queued event's delivery has ended (the admin command waits)."""
        if not self.queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def add(self, event: Event) -> None:
        """Queue ``event``; never waits, never raises."""
        if self._stopped:
            return
        if len(self.queue) >= self._max:
            # The head may be in flight: the oldest waiting one goes.
            dropped = self.queue[1] if self._busy and len(self.queue) > 1 else self.queue[0]
            self.queue.remove(dropped)
            self._done(dropped, "dropped", "queue full")
        self.queue.append(_Pending(event, event.body()))
        self._next()

    def stop(self) -> None:
        """At shutdown: no new attempt, no timer left behind (the queue is lost)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _next(self) -> None:
        if self._busy or self._stopped or not self.queue or self._timer is not None:
            return
        self._busy = True
        d = ensureDeferred(self._attempt(self.queue[0]))
        d.addErrback(lambda f: log.failure("webhook delivery to {url}", f, url=self.label))
        d.addBoth(self._finished)

    def _finished(self, _: Any) -> None:
        self._busy = False
        self._next()

    async def _attempt(self, pending: _Pending) -> None:
        pending.attempts += 1
        now = self._clock.seconds()
        outcome, code = await self._post(pending, now)
        if self._counters is not None:
            self._counters.attempt(outcome)
        if pending not in self.queue:
            return  # dropped while in flight
        if outcome == "2xx":
            self._done(pending, "delivered", str(code))
        elif code is not None and not retryable(code):
            self._done(pending, "given-up", f"HTTP {code}")
        else:
            delay = min(FIRST_DELAY * 2 ** (pending.attempts - 1), MAX_DELAY)
            if self._clock.seconds() + delay > pending.event.time + GIVE_UP:
                self._done(pending, "expired", outcome if code is None else f"HTTP {code}")
            else:
                log.info(
                    "webhook {url}: {outcome} for event {id}, again in {delay:.0f}s",
                    url=self.label,
                    outcome=outcome if code is None else f"HTTP {code}",
                    id=pending.event.id,
                    delay=delay,
                )
                self._timer = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self._next()

    async def _post(self, pending: _Pending, now: float) -> tuple[str, int | None]:
        """One request: its outcome class and HTTP status (None without one)."""
        try:
            d = self._http.request(
                "POST",
                self.url,
                data=pending.body,
                headers=headers(pending.event, self._secret, pending.body, now),
            )
            response = await d.addTimeout(REQUEST_TIMEOUT, self._clock, _timedOut)
            # The answer's body is read and thrown away (it frees the
            # connection), within the same deadline.
            body = collect(response, lambda _: None)
            await body.addTimeout(REQUEST_TIMEOUT, self._clock, _timedOut)
        except Exception as e:
            if isinstance(e, TimeoutError):
                return "timeout", None
            # The error's type only: its text may quote the URL.
            log.info("webhook {url}: {error}", url=self.label, error=type(e).__name__)
            return "error", None
        code = int(response.code)
        return f"{code // 100}xx" if 200 <= code < 600 else "error", code

    def _done(self, pending: _Pending, result: str, detail: str) -> None:
        if pending in self.queue:
            self.queue.remove(pending)
        if not self.queue:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)
        if self._counters is not None:
            self._counters.delivery(result)
        auditlog.webhookDelivery(
            pending.event.id, pending.event.type, self.label, result, pending.attempts, detail
        )
