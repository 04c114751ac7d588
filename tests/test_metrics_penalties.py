"""
The auth-penalty gauge (``imapproxy_login_penalty_addresses``): read through
``LoginPenalties.remembered`` by ``Metrics.refresh``, cached like the
accounts by state, and absent (never raised) while the backend does not
answer. Against Redis, the count is every instance's: see
test_integration_metrics_redis.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.metrics import ACCOUNTS_CACHE, STORE_DEADLINE, Metrics
from proxy.penalties import LoginPenalties, MemoryPenalties, PenaltyPolicy

from .test_metrics import scrape, value

GAUGE = "imapproxy_login_penalty_addresses"


class Silent:
    """A penalty backend whose count never answers (a hung Redis)."""

    def count(self, since: float) -> Deferred[int]:
        return Deferred()


class PenaltyGaugeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.backend = MemoryPenalties(self.clock)
        self.penalties = LoginPenalties(self.backend, self.clock, PenaltyPolicy(forget=600))
        self.metrics = Metrics(self.clock, process=False)
        self.metrics.watch(penalties=self.penalties)

    def refresh(self) -> None:
        self.successResultOf(ensureDeferred(self.metrics.refresh()))

    def failFrom(self, address: str) -> None:
        self.successResultOf(ensureDeferred(self.penalties.failed(address)))

    def test_counted(self):
        """Each address with a remembered failure counts once."""
        self.failFrom("192.0.2.1")
        self.failFrom("192.0.2.1")
        self.failFrom("192.0.2.2")
        self.refresh()
        self.assertEqual(value(scrape(self.metrics), GAUGE), 2)

    def test_cachedThenReadAgain(self):
        """Read at most every ACCOUNTS_CACHE seconds, like the accounts."""
        self.failFrom("192.0.2.1")
        self.refresh()
        self.failFrom("192.0.2.2")
        self.clock.advance(ACCOUNTS_CACHE - 1)
        self.refresh()
        self.assertEqual(value(scrape(self.metrics), GAUGE), 1)
        self.clock.advance(1)
        self.refresh()
        self.assertEqual(value(scrape(self.metrics), GAUGE), 2)

    def test_forgottenNotCounted(self):
        """An address quiet for the forget period no longer counts."""
        self.failFrom("192.0.2.1")
        self.clock.advance(601)
        self.failFrom("192.0.2.2")
        self.refresh()
        self.assertEqual(value(scrape(self.metrics), GAUGE), 1)

    def test_silentBackend(self):
        """A backend that does not answer leaves the gauge out, within the deadline."""
        metrics = Metrics(self.clock, process=False)
        metrics.watch(penalties=LoginPenalties(Silent(), self.clock))  # type: ignore[arg-type]
        d = ensureDeferred(metrics.refresh())
        self.assertNoResult(d)
        self.clock.advance(STORE_DEADLINE)
        self.successResultOf(d)
        self.assertIsNone(value(scrape(metrics), GAUGE))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sizedStillWorks(self):
        """Anything with a length (the older wiring) is read live."""
        metrics = Metrics(self.clock, process=False)
        metrics.watch(penalties=[1, 2, 3])
        self.assertEqual(value(scrape(metrics), GAUGE), 3)
