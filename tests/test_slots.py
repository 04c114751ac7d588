"""
Tests for ``proxy.upstream.slots``: an account's cap by protocol (its own,
its provider's, the global default), slots taken up to the cap, a fair and
bounded wait beyond it, a spare given up first, and a slot given back on
every way a connection ends (closed, failed, given up while waiting).
"""

from __future__ import annotations

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import TooManyConnections, Unavailable
from proxy.metrics import Metrics
from proxy.model import Upstream
from proxy.upstream.slots import LAST_POLL, LocalSlots, SlotKeeper, withSlot
from tests.test_metrics import scrape
from tests.test_oauth import account

CAPPED = Upstream(host="imap.example.com", maxConnections=2)


class SharedLocalSlots(LocalSlots):
    """Counted here, but freed "elsewhere" too (another instance): polled."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.refreshed: list[list[tuple[str, str]]] = []
        self.wants: dict[str, float] = {}

    def refresh(self, held, now):
        self.refreshed.append(held)
        return succeed(None)

    def want(self, key, seconds):
        self.wants[key] = seconds
        return succeed(None)

    def wanted(self, keys):
        return succeed([k for k in keys if k in self.wants])


@attrs.define
class FakeConnection:
    """What ``withSlot`` needs of a connected protocol."""

    closed: Deferred = attrs.field(factory=Deferred)
    slot: object = None

    def notifyClosed(self) -> Deferred:
        return self.closed


class KeeperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.counter = LocalSlots()
        self.keeper = SlotKeeper(self.counter, self.clock, wait=5.0, maxWaiting=3, default=0)
        self.refusals: list[tuple[str, str, float]] = []
        self.keeper.onRefused = lambda *a: self.refusals.append(a)
        self.account = account("alice")

    def acquire(self, upstream=CAPPED, protocol="imap", wait=True) -> Deferred:
        return ensureDeferred(self.keeper.acquire(self.account, protocol, upstream, wait))

    def count(self, protocol="imap") -> int:
        return self.successResultOf(self.counter.count(f"alice/{protocol}", 0))

    def test_capOwnPresetDefault(self):
        """The account's own cap wins, then its provider's (by host), then the default."""
        k = self.keeper
        self.assertEqual(k.capFor(CAPPED, "imap"), 2)
        self.assertEqual(k.capFor(Upstream(host="imap.gmail.com"), "imap"), 15)
        self.assertEqual(k.capFor(Upstream(host="outlook.office365.com"), "imap"), 20)
        self.assertEqual(k.capFor(Upstream(host="smtp.office365.com", port=587), "smtp"), 3)
        self.assertEqual(k.capFor(Upstream(host="smtp.gmail.com", port=465), "smtp"), 10)
        self.assertEqual(k.capFor(Upstream(host="mail.example.org"), "imap"), 0)
        k.default = 7
        self.assertEqual(k.capFor(Upstream(host="mail.example.org"), "imap"), 7)
        self.assertEqual(k.capFor(Upstream(host="imap.gmail.com", maxConnections=0), "imap"), 0)

    def test_noCapCountsNothing(self):
        """Without a cap a login takes no slot and never waits."""
        self.assertIsNone(self.successResultOf(self.acquire(Upstream(host="mail.example.org"))))
        self.assertEqual(self.count(), 0)

    def test_upToTheCapAtOnce(self):
        """Slots up to the cap are given at once, each counted, per protocol."""
        a = self.successResultOf(self.acquire())
        b = self.successResultOf(self.acquire())
        smtp = self.successResultOf(self.acquire(protocol="smtp"))
        self.assertEqual((self.count(), self.count("smtp")), (2, 1))
        self.assertNoResult(self.acquire())
        self.assertEqual(self.keeper.inUse(), {("alice", "imap"): 2, ("alice", "smtp"): 1})
        a.release()
        a.release()  # idempotent
        b.release()
        smtp.release()

    def test_fairQueue(self):
        """Waiting logins get freed slots first come, first served."""
        held = [self.successResultOf(self.acquire()) for _ in range(2)]
        waiting = [self.acquire() for _ in range(3)]
        self.assertEqual(self.keeper.waiting(), {("alice", "imap"): 3})
        self.clock.advance(1.0)
        held[0].release()
        first = self.successResultOf(waiting[0])
        self.assertEqual(first.waited, 1.0)
        self.assertNoResult(waiting[1])
        held[1].release()
        second = self.successResultOf(waiting[1])
        self.assertNoResult(waiting[2])
        # A new login does not overtake the one still waiting.
        late = self.acquire()
        first.release()
        self.successResultOf(waiting[2])
        self.assertNoResult(late)
        second.release()
        self.successResultOf(late)
        self.assertEqual(self.count(), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_boundedWait(self):
        """Past the wait a login is refused with NO [LIMIT] and its own fixed text."""
        for _ in range(2):
            self.successResultOf(self.acquire())
        waiting = self.acquire()
        self.clock.advance(4.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.1)
        error = self.failureResultOf(waiting, TooManyConnections).value
        self.assertEqual(
            error.imapResponse(),
            b"NO [LIMIT] Too many connections for this account, close another client",
        )
        self.assertEqual(
            error.smtpResponse(),
            b"421 4.7.0 Too many connections for this account, close another client",
        )
        self.assertEqual(self.refusals, [("alice", "imap", 5.0)])
        self.assertEqual(self.keeper.refused["imap"], 1)
        self.assertEqual(self.keeper.waiting(), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.count(), 2)

    def test_boundedQueue(self):
        """A full queue refuses at once: reconnecting clients cannot grow it."""
        for _ in range(2):
            self.successResultOf(self.acquire())
        queued = [self.acquire() for _ in range(3)]
        self.failureResultOf(self.acquire(), TooManyConnections)
        self.assertEqual(len(self.refusals), 1)
        for d in queued:
            self.assertNoResult(d)
        self.clock.advance(5.0)
        for d in queued:
            self.failureResultOf(d, TooManyConnections)

    def test_spareGivenUpFirst(self):
        """At the IMAP cap the account's spare is given up; SMTP has none."""
        given: list[str] = []
        self.keeper.giveUpSpare = given.append
        spare = self.successResultOf(self.acquire())
        self.successResultOf(self.acquire())
        waiting = self.acquire()
        self.assertEqual(given, ["alice"])
        spare.release()  # the spare's connection closed
        self.successResultOf(waiting)
        for _ in range(2):
            self.successResultOf(self.acquire(protocol="smtp"))
        self.assertNoResult(self.acquire(protocol="smtp"))
        self.assertEqual(given, ["alice"])

    def test_spareNeverWaits(self):
        """A spare (wait False) at the cap gets no slot, waits not, gives nothing up."""
        given: list[str] = []
        self.keeper.giveUpSpare = given.append
        for _ in range(2):
            self.successResultOf(self.acquire())
        self.assertIsNone(self.successResultOf(self.acquire(wait=False)))
        self.assertEqual((given, self.keeper.waiting()), ([], {}))

    def test_cancelledWaitLeavesQueue(self):
        """A login given up while waiting leaves the queue; the next one gets the slot."""
        held = self.successResultOf(self.acquire())
        self.successResultOf(self.acquire())
        gone = self.acquire()
        after = self.acquire()
        gone.cancel()
        self.failureResultOf(gone)
        held.release()
        self.successResultOf(after)
        self.assertEqual(self.count(), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopRefusesWaiting(self):
        """Stopping refuses the logins that wait, leaving no timer."""
        for _ in range(2):
            self.successResultOf(self.acquire())
        waiting = self.acquire()
        self.keeper.stop()
        self.failureResultOf(waiting, TooManyConnections)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SharedKeeperTests(SynchronousTestCase):
    """Slots freed out of sight (another instance, an expiry) are polled for."""

    def setUp(self):
        self.clock = task.Clock()
        self.counter = SharedLocalSlots()
        self.keeper = SlotKeeper(self.counter, self.clock, wait=5.0)
        self.account = account("alice")

    def acquire(self) -> Deferred:
        return ensureDeferred(self.keeper.acquire(self.account, "imap", CAPPED))

    def test_freedElsewhereIsPolled(self):
        """A slot freed by another instance reaches a waiter within the poll's bound."""
        self.counter.tryAcquire("alice/imap", 2, "other:1", 0)
        self.counter.tryAcquire("alice/imap", 2, "other:2", 0)
        waiting = self.acquire()
        self.clock.advance(1.0)
        self.assertNoResult(waiting)
        self.counter.release("alice/imap", "other:1")
        self.clock.advance(LAST_POLL)
        slot = self.successResultOf(waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.keeper.heartbeat()
        self.assertEqual(self.counter.refreshed, [[("alice/imap", slot.holder)]])

    def test_spareElsewhereGivenUp(self):
        """A login waiting here asks for spares; the instance holding one gives it up."""
        given: list[str] = []
        self.keeper.giveUpSpare = given.append
        self.counter.tryAcquire("alice/imap", 2, "other:1", 0)
        self.counter.tryAcquire("alice/imap", 2, "other:spare", 0)
        waiting = self.acquire()
        self.assertEqual(self.counter.wants, {"alice/imap": 5.0})
        # The other instance, sharing the counter, holds spares of alice and bob.
        other = SlotKeeper(self.counter, self.clock)
        other.spareAccounts = lambda: ["bob", "alice"]
        other.giveUpSpare = lambda a: (
            given.append(a),
            self.counter.release(f"{a}/imap", "other:spare"),
        )
        self.successResultOf(other.checkSpares())
        self.assertEqual(given, ["alice", "alice"])
        self.clock.advance(LAST_POLL)
        self.successResultOf(waiting)

    def test_counterDownRefuses(self):
        """A counter that cannot answer (the store down) refuses the login as unavailable."""
        self.counter.tryAcquire = lambda *a: fail(Unavailable("store-unavailable"))
        waiting = self.acquire()
        self.failureResultOf(waiting, Unavailable)


class WithSlotTests(SynchronousTestCase):
    """A connection holds its slot until it closes; a failed one gives it back at once."""

    def setUp(self):
        self.clock = task.Clock()
        self.counter = LocalSlots()
        self.keeper = SlotKeeper(self.counter, self.clock)
        self.account = account("alice")

    def count(self) -> int:
        return self.successResultOf(self.counter.count("alice/imap", 0))

    def connectWith(self, connect, wait=True) -> Deferred:
        return ensureDeferred(withSlot(self.keeper, self.account, "imap", CAPPED, connect, wait))

    def test_heldUntilClosed(self):
        """The slot is given back when the connection closes, not before."""
        conn = FakeConnection()
        got = self.successResultOf(self.connectWith(lambda: succeed(conn)))
        self.assertIs(got, conn)
        self.assertEqual(self.count(), 1)
        conn.closed.callback(None)
        self.assertEqual(self.count(), 0)

    def test_failedConnectGivesBack(self):
        """A connection that fails gives its slot back at once."""
        self.failureResultOf(self.connectWith(lambda: fail(Unavailable())), Unavailable)
        self.assertEqual(self.count(), 0)

    def test_cancelledConnectGivesBack(self):
        """A login given up while connecting gives its slot back."""
        pending: Deferred = Deferred()
        d = self.connectWith(lambda: pending)
        self.assertEqual(self.count(), 1)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.count(), 0)

    def test_spareAtCapConnectsNot(self):
        """A spare at the cap makes no connection at all."""
        for _ in range(2):
            self.successResultOf(self.connectWith(lambda: succeed(FakeConnection())))
        called: list[int] = []
        spare = self.connectWith(lambda: called.append(1) or succeed(FakeConnection()), False)
        self.assertIsNone(self.successResultOf(spare))
        self.assertEqual(called, [])


class SlotMetricsTests(SynchronousTestCase):
    """/metrics shows slots in use, logins waiting and refused, per account only when asked."""

    def setUp(self):
        self.clock = task.Clock()
        self.keeper = SlotKeeper(LocalSlots(), self.clock, wait=1.0)
        self.account = account("alice")

    def acquire(self, protocol="imap") -> Deferred:
        return ensureDeferred(self.keeper.acquire(self.account, protocol, CAPPED))

    def test_figures(self):
        """Each figure by protocol; per account with metrics-per-account only."""
        for _ in range(2):
            self.successResultOf(self.acquire())
        waiting = self.acquire()
        self.successResultOf(self.acquire("smtp"))
        metrics = Metrics(self.clock, process=False)
        metrics.watchSlots(self.keeper)
        s = scrape(metrics)
        self.assertEqual(s[("imapproxy_account_connections", (("protocol", "imap"),))], 2)
        self.assertEqual(s[("imapproxy_account_connections", (("protocol", "smtp"),))], 1)
        self.assertEqual(s[("imapproxy_account_connections_waiting", (("protocol", "imap"),))], 1)
        self.clock.advance(1.0)
        self.failureResultOf(waiting, TooManyConnections)
        s = scrape(metrics)
        refused = ("imapproxy_account_connections_refused_total", (("protocol", "imap"),))
        self.assertEqual(s[refused], 1)
        self.assertFalse([k for k in s if "by_account" in k[0]])
        perAccount = Metrics(self.clock, perAccount=True, process=False)
        perAccount.watchSlots(self.keeper)
        s = scrape(perAccount)
        labels = (("account", "alice"), ("protocol", "imap"))
        self.assertEqual(s[("imapproxy_account_connections_by_account", labels)], 2)
        self.assertEqual(s[("imapproxy_account_connections_refused_by_account_total", labels)], 1)
