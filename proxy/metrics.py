"""
The proxy's Prometheus metrics: one ``CollectorRegistry`` per service (not
the library's global one: the tests build several services in one process),
its metric objects, and the collectors that read live state at scrape time.

What costs a lookup (accounts by state, from a store that may be Redis) is
read asynchronously by ``Metrics.refresh`` before a scrape is rendered, with
a short cache; the collectors themselves only read memory. Nothing on the
relay path is added: the bytes of live sessions are the counters the
protocols already keep, read when scraped, and those of ended sessions are
added once, when a session ends.

Labels are bounded: protocols, fixed reason codes, fixed states and
directions, preset names. No token, address or account id, except in the
per-account series an operator turns on (``--metrics-per-account``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet.defer import ensureDeferred, gatherResults, maybeDeferred
from twisted.logger import Logger

from .model import ACCOUNT_STATES
from .presets import PROVIDERS
from .realm import ISubmissionSession
from .restrictions import commandLabel

log = Logger(namespace="proxy.metrics")

PREFIX = "imapproxy"
PROTOCOLS = ("imap", "smtp")
# Seconds: a login takes milliseconds on a spare connection, seconds with
# a refresh and a slow provider.
LOGIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds the accounts read from the store is reused for, and the most a
# scrape waits for that read (Prometheus' own scrape timeout is 10 s).
ACCOUNTS_CACHE = 15.0
STORE_DEADLINE = 5.0
# Distinct reason codes kept at most; past it, "other" (they are constants
# of the code, never input, but a bound is a bound).
MAX_REASONS = 64
_REASON = re.compile(r"\A[a-z0-9][a-z0-9-]{0,39}\Z")


def providerOf(tokenURL: str | None) -> str:
    """The preset an account's token URL belongs to (``gmail``, …), else ``generic``."""
    host = urlsplit(tokenURL or "").hostname
    for name, provider in PROVIDERS.items():
        if host and provider.tokenURL and urlsplit(provider.tokenURL).hostname == host:
            return name
    return "generic"


class Metrics:
    """
    :param clock: ``IReactorTime``, for durations and the accounts cache.
    :param perAccount: per-account series (sessions open, account state).
    :param process: add the process collector (CPU, memory, open files).
    """

    def __init__(self, clock: Any, perAccount: bool = False, process: bool = True):
        self.clock = clock
        self.perAccount = perAccount
        self.registry = CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.logins = Counter(
            f"{p}_logins", "Logins by protocol and result (ok or a reason code)",
            ["protocol", "result"], registry=r,
        )  # fmt: skip
        self.loginSeconds = Histogram(
            f"{p}_login_seconds", "Whole logins, from the credentials to the answer",
            ["protocol"], buckets=LOGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenCheckSeconds = Histogram(
            f"{p}_login_token_check_seconds",
            "The token check of a login (a penalised address's wait included)",
            ["protocol"], buckets=LOGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.accessTokenSeconds = Histogram(
            f"{p}_login_access_token_seconds",
            "Getting the provider access token (cache, or a refresh)",
            ["protocol"], buckets=LOGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstreamSeconds = Histogram(
            f"{p}_login_upstream_seconds",
            "Connecting and logging in to the provider (spare connections included)",
            ["protocol"], buckets=LOGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.refreshes = Counter(
            f"{p}_token_refreshes", "Requests to a token endpoint by result and provider",
            ["provider", "result"], registry=r,
        )  # fmt: skip
        self.refreshSeconds = Histogram(
            f"{p}_token_refresh_seconds", "Requests to a token endpoint",
            ["provider"], buckets=LOGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.storeErrors = Counter(
            f"{p}_store_errors", "Operations the store could not do, by who asked",
            ["operation"], registry=r,
        )  # fmt: skip
        self.storeUp = Gauge(
            f"{p}_store_up", "1 when the store answered the last scrape's read, else 0",
            registry=r,
        )  # fmt: skip
        self._reasons: set[str] = set()
        # Labelled series by (metric, label values): prometheus_client's
        # labels() validates and locks at each call; the label values are
        # bounded sets (protocols, reason codes, providers).
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._ended: dict[tuple[str, str], int] = {}
        self._sessions: Any = None
        self._spares: Any = None
        self._penalties: Any = None
        self._store: Any = None
        self._accounts: list[tuple[str, str]] | None = None
        self._accountsRead = -ACCOUNTS_CACHE
        self._refreshing: Any = None
        self._penaltyCount: int | None = None
        self._penaltiesRead = -ACCOUNTS_CACHE
        r.register(_Live(self))
        if process:
            ProcessCollector(namespace=p, registry=r)

    # -- what the collectors read ----------------------------------------

    def watch(
        self, sessions: Any = None, spares: Any = None, penalties: Any = None, store: Any = None
    ) -> None:
        """
        :param sessions: the ``SessionRegistry`` (iterable of ``(session,
            splice)``); its ``ended`` is set to ``sessionEnded``.
        :param spares: ``WarmUpstreams``.
        :param penalties: ``LoginPenalties`` (its count read by ``refresh``,
            shared on Redis), or anything with ``len``.
        :param store: the store, for accounts by state and its availability.
        """
        self._sessions = sessions
        if sessions is not None:
            sessions.ended = self.sessionEnded
            sessions.refused = self.commandRefused
        self._spares = spares
        self._penalties = penalties
        self._store = store

    # -- events ----------------------------------------------------------

    def reason(self, reason: str | None) -> str:
        """A reason code as a label value: a known, bounded set."""
        if reason in self._reasons:
            return reason  # type: ignore[return-value]
        if not reason or not _REASON.match(reason) or len(self._reasons) >= MAX_REASONS:
            return "other"
        self._reasons.add(reason)
        return reason

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept (for the labels of the login path)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def login(self, protocol: str, result: str, seconds: float) -> None:
        protocol = protocol if protocol in PROTOCOLS else "other"
        self.child(self.logins, protocol, self.reason(result)).inc()
        self.child(self.loginSeconds, protocol).observe(seconds)

    def refreshed(self, provider: str, result: str, seconds: float) -> None:
        self.refreshes.labels(provider, self.reason(result)).inc()
        self.refreshSeconds.labels(provider).observe(seconds)

    def storeFailed(self, operation: str) -> None:
        self.storeErrors.labels(operation).inc()

    def sessionEnded(self, session: Any, splice: Any) -> None:
        """Keep the bytes of a session that ended (its live counters go with it)."""
        protocol = protocolOf(session)
        for direction, count in _directions(splice):
            key = (protocol, direction)
            self._ended[key] = self._ended.get(key, 0) + count

    # -- per-account connection caps ---------------------------------------

    def watchSlots(self, keeper: Any) -> None:
        """
        Slots in use, logins waiting and refused at the cap, by protocol
        (and account with ``perAccount``): ``proxy.slotmetrics``.
        """
        from .slotmetrics import SlotCollector

        self.registry.register(SlotCollector(keeper, self.perAccount))

    # -- webhooks (proxy.alerts) -----------------------------------------

    def webhookCounters(self, depth: Callable[[], float]) -> tuple[Counter, Counter, Counter]:
        """
        The webhook series, made when webhooks are configured (their label
        values are fixed in ``proxy.alerts``).

        :param depth: events waiting for delivery, read at scrape time.
        :return: the counters of events, deliveries and attempts.
        """
        r, p = self.registry, PREFIX
        counters = (
            Counter(f"{p}_webhook_events", "Webhook events by type, each once per cluster",
                    ["type"], registry=r),
            Counter(f"{p}_webhook_deliveries", "Webhook deliveries (one event to one receiver) "
                    "by result: delivered, given-up, expired, dropped", ["result"], registry=r),
            Counter(f"{p}_webhook_attempts", "Webhook requests by outcome: 2xx, 3xx, 4xx, "
                    "5xx, timeout, error", ["outcome"], registry=r),
        )  # fmt: skip
        Gauge(
            f"{p}_webhook_queue_depth", "Webhook deliveries waiting, receivers together",
            registry=r,
        ).set_function(depth)  # fmt: skip
        return counters

    # -- restricted tokens: commands the policy relay refused ---------------

    @functools.cached_property
    def commandsRefused(self) -> Counter:
        """Made at the first refusal: most proxies never refuse one."""
        return Counter(
            f"{PREFIX}_commands_refused",
            "Commands of restricted tokens' sessions the proxy refused, by command name",
            ["command"],
            registry=self.registry,
        )

    def commandRefused(self, command: str) -> None:
        """:param command: the command's name only (never its arguments)."""
        self.commandsRefused.labels(commandLabel(command)).inc()

    # -- provider throttling (throttle): made once, by ``proxy.throttle`` --

    def throttleMetrics(self) -> tuple[Counter, Counter]:
        if getattr(self, "_throttleCounters", None) is None:
            r, p = self.registry, PREFIX
            self._throttleCounters = (
                Counter(
                    f"{p}_account_throttled", "Logins a provider answered with throttling",
                    ["protocol", "reason"], registry=r,
                ),
                Counter(
                    f"{p}_account_throttled_refused",
                    "Logins answered during a throttling back-off, without asking the provider",
                    ["protocol", "reason"], registry=r,
                ),
            )  # fmt: skip
        return self._throttleCounters

    def throttled(self, protocol: str, reason: str) -> None:
        protocol = protocol if protocol in PROTOCOLS else "other"
        self.throttleMetrics()[0].labels(protocol, self.reason(reason)).inc()

    def throttleRefused(self, protocol: str, reason: str) -> None:
        protocol = protocol if protocol in PROTOCOLS else "other"
        self.throttleMetrics()[1].labels(protocol, self.reason(reason)).inc()

    # -- scrape ----------------------------------------------------------

    async def refresh(self) -> None:
        """
        Read what the collectors need from the store (accounts by state)
        and the penalty backend (addresses penalised, shared on Redis), each
        at most every ``ACCOUNTS_CACHE`` seconds, at the same time. One that
        does not answer (within ``STORE_DEADLINE``) is reported (``store_up``
        0, no series), never raised.
        """
        now = self.clock.seconds()
        await gatherResults(
            [ensureDeferred(self._readAccounts(now)), ensureDeferred(self._readPenalties(now))]
        )

    async def _readAccounts(self, now: float) -> None:
        if self._store is None or now - self._accountsRead < ACCOUNTS_CACHE:
            return
        try:
            read = maybeDeferred(self._store.listAccounts)
            accounts = await read.addTimeout(STORE_DEADLINE, self.clock)
        except Exception as e:
            log.warn("metrics: the store does not answer: {error}", error=type(e).__name__)
            self.storeUp.set(0)
            self.storeFailed("metrics")
            self._accounts = None
            return
        self.storeUp.set(1)
        self._accountsRead = now
        self._accounts = [(a.id, a.state) for a in accounts]

    async def _readPenalties(self, now: float) -> None:
        remembered = getattr(self._penalties, "remembered", None)
        if remembered is None or now - self._penaltiesRead < ACCOUNTS_CACHE:
            return
        try:
            count = await maybeDeferred(remembered).addTimeout(STORE_DEADLINE, self.clock)
        except Exception as e:
            log.warn("metrics: the penalties do not answer: {error}", error=type(e).__name__)
            self._penaltyCount = None
            return
        self._penaltiesRead = now
        self._penaltyCount = int(count)

    def collectLive(self) -> Iterator[Any]:
        """The metric families read from memory at scrape time."""
        p = PREFIX
        live = list(self._sessions) if self._sessions is not None else []
        open_ = GaugeMetricFamily(f"{p}_sessions", "Sessions open (spliced)", labels=["protocol"])
        counts = dict.fromkeys(PROTOCOLS, 0)
        relayed = dict(self._ended)
        perAccount: dict[str, int] = {}
        for session, splice in live:
            protocol = protocolOf(session)
            counts[protocol] = counts.get(protocol, 0) + 1
            for direction, count in _directions(splice):
                key = (protocol, direction)
                relayed[key] = relayed.get(key, 0) + count
            if self.perAccount:
                account = str(getattr(session, "account", ""))
                perAccount[account] = perAccount.get(account, 0) + 1
        for protocol, n in sorted(counts.items()):
            open_.add_metric([protocol], n)
        yield open_
        relayedFamily = CounterMetricFamily(
            f"{p}_relayed_bytes",
            "Bytes relayed after login, by protocol and direction",
            labels=["protocol", "direction"],
        )
        for protocol in PROTOCOLS:
            for direction in DIRECTIONS:
                relayedFamily.add_metric(
                    [protocol, direction], relayed.get((protocol, direction), 0)
                )
        yield relayedFamily
        if self.perAccount:
            accountFamily = GaugeMetricFamily(
                f"{p}_account_sessions", "Sessions open by account", labels=["account"]
            )
            for account, n in sorted(perAccount.items()):
                accountFamily.add_metric([account], n)
            yield accountFamily
        yield from self._collectSpares()
        penalised = self._penaltyCount
        if penalised is None and hasattr(self._penalties, "__len__"):
            penalised = len(self._penalties)
        if penalised is not None:
            yield GaugeMetricFamily(
                f"{p}_login_penalty_addresses",
                "Addresses whose failed logins are remembered (penalised on their next try)",
                value=penalised,
            )
        yield from self._collectAccounts()

    def _collectSpares(self) -> Iterator[Any]:
        spares = self._spares
        if spares is None:
            return
        p = PREFIX
        yield GaugeMetricFamily(
            f"{p}_spare_connections", "Spare provider connections waiting", value=len(spares)
        )
        yield CounterMetricFamily(
            f"{p}_spare_connections_handed_out",
            "Spare provider connections handed to a login",
            value=getattr(spares, "handedOut", 0),
        )
        yield CounterMetricFamily(
            f"{p}_spare_connections_discarded",
            "Spare provider connections logged out unused",
            value=getattr(spares, "discarded", 0),
        )

    def _collectAccounts(self) -> Iterator[Any]:
        if self._accounts is None:
            return
        p = PREFIX
        byState = GaugeMetricFamily(f"{p}_accounts", "Accounts by state", labels=["state"])
        counts = dict.fromkeys(ACCOUNT_STATES, 0)
        for _id, state in self._accounts:
            if state in counts:
                counts[state] += 1
        for state, n in counts.items():
            byState.add_metric([state], n)
        yield byState
        if self.perAccount:
            each = GaugeMetricFamily(
                f"{p}_account_state",
                "1 for each account's state",
                labels=["account", "state"],
            )
            for accountId, state in self._accounts:
                each.add_metric([accountId, state], 1)
            yield each


DIRECTIONS = ("to_provider", "to_client")


def _directions(splice: Any) -> Iterable[tuple[str, int]]:
    """The bytes a splice relayed each way: counters its two sides already keep."""
    return (
        ("to_provider", int(getattr(splice.client, "bytesReceived", 0))),
        ("to_client", int(getattr(splice.upstream, "bytesReceived", 0))),
    )


def protocolOf(session: Any) -> str:
    """``imap`` or ``smtp``, by the avatar's interface."""
    return "smtp" if ISubmissionSession.providedBy(session) else "imap"


class _Live(Collector):
    """The collector over ``Metrics.collectLive``."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        return list(self._metrics.collectLive())
