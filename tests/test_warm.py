"""
Tests for ``proxy.warm`` (spare logged-in upstream connections) and the spare
state of ``UpstreamProtocol``: which accounts get a spare, that a spare only
goes to its own unchanged account, and that spares that die, expire or are
no longer wanted are logged out and forgotten.
"""

from __future__ import annotations

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import Unavailable
from proxy.imap import SessionRegistry
from proxy.upstream import WarmUpstreams
from tests.test_oauth import account
from tests.test_upstream import _Driver

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi"


class FakeUpstream:
    """What WarmUpstreams needs of an ``UpstreamProtocol``."""

    def __init__(self) -> None:
        self.state = "ready"
        self.onLost = None

    def keepAsSpare(self, onLost) -> None:
        self.state = "spare"
        self.onLost = onLost

    def claim(self) -> bool:
        if self.state != "spare":
            return False
        self.state = "claimed"
        return True

    def discard(self) -> None:
        self.state = "logged-out"

    def die(self) -> None:
        self.state = "dead"
        self.onLost()


class WarmUpstreamsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.made: list[tuple[str, Deferred]] = []
        self.warm = WarmUpstreams(self.connect, self.clock, keep=300.0, often=2, maxSpares=2)

    def connect(self, acct) -> Deferred:
        d: Deferred = Deferred()
        self.made.append((acct.id, d))
        return d

    def tearDown(self):
        self.warm.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def spare(self, acct) -> FakeUpstream:
        """Two logins of ``acct`` within the window: a spare is made for it."""
        self.warm.loggedIn(acct)
        self.clock.advance(10)
        self.warm.loggedIn(acct)
        self.clock.advance(0)  # connected in the next turn, after the login's answer
        self.assertEqual(self.made[-1][0], acct.id)
        proto = FakeUpstream()
        self.made[-1][1].callback(proto)
        self.assertEqual(proto.state, "spare")
        return proto

    def test_oneLoginMakesNoSpare(self):
        """An account that logged in once gets nothing: spares are for frequent logins."""
        self.warm.loggedIn(account())
        self.assertEqual(self.made, [])
        self.assertIsNone(self.warm.take(account()))

    def test_loginsFarApartMakeNoSpare(self):
        """Two logins further apart than the window make no spare either."""
        self.warm.loggedIn(account())
        self.clock.advance(301)
        self.warm.loggedIn(account())
        self.assertEqual(self.made, [])

    def test_theSecondLoginMakesOneTheThirdTakesIt(self):
        """A spare is made after the second login and handed to the third, claimed."""
        proto = self.spare(account())
        self.assertIs(self.warm.take(account()), proto)
        self.assertEqual(proto.state, "claimed")
        self.assertIsNone(self.warm.take(account()), "a spare is handed out once")

    def test_aSpareOnlyGoesToItsOwnAccount(self):
        """Another account never gets it."""
        self.spare(account("alice"))
        self.assertIsNone(self.warm.take(account("bob")))

    def test_aChangedAccountDoesNotGetTheOldSpare(self):
        """After the account moved to another server, the spare is logged out, not used."""
        proto = self.spare(account())
        moved = attrs.evolve(account(), upstream=attrs.evolve(account().upstream, host="other"))
        self.assertIsNone(self.warm.take(moved))
        self.assertEqual(proto.state, "logged-out")

    def test_anUnusedSpareLogsOutAfterTheWindow(self):
        """A spare nobody takes is logged out after ``keep`` seconds."""
        proto = self.spare(account())
        self.clock.advance(299)
        self.assertEqual(proto.state, "spare")
        self.clock.advance(2)
        self.assertEqual(proto.state, "logged-out")
        self.assertEqual(len(self.warm), 0)

    def test_aSpareThatDiesIsForgotten(self):
        """The provider closing a spare removes it: the next login connects anew."""
        proto = self.spare(account())
        proto.die()
        self.assertIsNone(self.warm.take(account()))
        self.assertEqual(len(self.warm), 0)

    def test_aFailedWarmUpCostsNothing(self):
        """A spare that cannot be made is simply not there; a later login may try again."""
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.clock.advance(0)
        self.made[-1][1].errback(Unavailable("upstream-unreachable"))
        self.assertIsNone(self.warm.take(account()))
        self.warm.loggedIn(account())
        self.clock.advance(0)
        self.assertEqual(len(self.made), 2)
        self.made[-1][1].errback(Failure(Unavailable("upstream-unreachable")))

    def test_noSpareAtTheConnectionCap(self):
        """An account at its connection cap gets no spare (None), and may get one later."""
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.clock.advance(0)
        self.made[-1][1].callback(None)
        self.assertEqual(len(self.warm), 0)
        self.assertIsNone(self.warm.take(account()))
        self.warm.loggedIn(account())
        self.clock.advance(0)
        self.assertEqual(len(self.made), 2)
        self.made[-1][1].callback(FakeUpstream())
        self.assertEqual(len(self.warm), 1)

    def test_oneSpareAtATimePerAccount(self):
        """Logins while a spare waits (or is being made) make no second one."""
        self.spare(account())
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.clock.advance(0)
        self.assertEqual(len(self.made), 1)

    def test_theSpareIsConnectedAfterTheLoginIsAnswered(self):
        """
        ``loggedIn`` is called before the login is answered: the spare's
        connection is begun in the reactor's next turn, not at once.
        """
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.assertEqual(self.made, [])
        self.clock.advance(0)
        self.assertEqual([m[0] for m in self.made], ["alice"])

    def test_aCloseBeforeTheSpareIsBegunMakesNone(self):
        """An account closed in the login's own turn gets no spare, and nothing is dialled."""
        registry = SessionRegistry(spares=self.warm)
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        registry.close(account="alice")
        self.clock.advance(0)
        self.assertEqual(self.made, [])
        self.assertEqual(len(self.warm), 0)
        self.warm.loggedIn(account())
        self.clock.advance(0)
        self.assertEqual(len(self.made), 1, "a later login may make one again")
        self.made[-1][1].callback(None)

    def test_stopCancelsASpareNotYetBegun(self):
        """A stop between a login and the next turn leaves no call behind and dials nothing."""
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.warm.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.made, [])

    def test_theCapLogsOutTheOldest(self):
        """At ``maxSpares`` the oldest spare makes room."""
        first = self.spare(account("a1"))
        self.spare(account("a2"))
        self.spare(account("a3"))
        self.assertEqual(first.state, "logged-out")
        self.assertEqual(len(self.warm), 2)

    def test_closingAnAccountsSessionsLogsOutItsSpare(self):
        """Account deletion (a close request for the account) takes its spare too."""
        registry = SessionRegistry(spares=self.warm)
        proto = self.spare(account())
        registry.close(account="alice")
        self.assertEqual(proto.state, "logged-out")

    def test_noSparesWhenTurnedOff(self):
        """keep=0 turns spares off."""
        warm = WarmUpstreams(lambda a: fail(RuntimeError("never")), self.clock, keep=0)
        for _ in range(3):
            warm.loggedIn(account())
        self.assertIsNone(warm.take(account()))

    def test_stopLogsOutEverySpare(self):
        """At shutdown every spare is logged out and no new one is made."""
        proto = self.spare(account())
        self.warm.stop()
        self.assertEqual(proto.state, "logged-out")
        self.warm.loggedIn(account())
        self.warm.loggedIn(account())
        self.assertEqual(len(self.made), 1)


class ConnectionPhaseTests(_Driver):
    """
    The phases of an ``UpstreamProtocol`` after its login: logged in (paused,
    owned by the login), spare (reading, owned by the pool), relaying (the
    splice's), closed; what each call does in each phase.
    """

    def loggedInProto(self):
        self.connect()
        self.receive(GREETING, b"U1 OK [CAPABILITY IMAP4rev1] ok")
        self.loggedIn()
        self.transport.clear()
        return self.proto

    def test_onlyASpareCanBeClaimed(self):
        """claim() is False while logging in, logged in, relaying and closed."""
        self.connect()
        self.assertFalse(self.proto.claim(), "logging in")
        self.receive(GREETING, b"U1 OK [CAPABILITY IMAP4rev1] ok")
        self.assertFalse(self.proto.claim(), "logged in, not a spare")
        self.proto.takeOver(lambda data: None, lambda reason: None)
        self.assertFalse(self.proto.claim(), "relaying")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.proto.claim(), "closed")

    def test_aClosingSpareIsNotClaimed(self):
        """A spare whose connection is already closing is not handed out."""
        p = self.loggedInProto()
        p.keepAsSpare(lambda: None)
        self.transport.loseConnection()
        self.assertFalse(p.claim())

    def test_aClaimedSpareIsLoggedInAgain(self):
        """A claimed spare is paused and can be taken over, or logged out."""
        p = self.loggedInProto()
        lost: list = []
        p.keepAsSpare(lambda: lost.append(True))
        self.assertTrue(p.claim())
        self.assertEqual(self.transport.producerState, "paused")
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(lost, [], "a claimed spare no longer reports to its pool")

    def test_discardOnlyLogsOutWhatNobodyRelays(self):
        """discard() logs out a logged-in or spare connection, never one being relayed."""
        p = self.loggedInProto()
        p.takeOver(lambda data: None, lambda reason: None)
        p.discard()
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_discardWhileLoggingInDoesNothing(self):
        """discard() during the login neither sends nor closes: the login decides."""
        self.connect()
        self.proto.discard()
        self.assertEqual(self.transport.value(), b"")
        self.receive(GREETING, b"U1 OK [CAPABILITY IMAP4rev1] ok")
        self.loggedIn()

    def test_aDiscardedSpareIsClosed(self):
        """After discard() a spare reads nothing more and reports no loss to the pool."""
        p = self.loggedInProto()
        lost: list = []
        p.keepAsSpare(lambda: lost.append(True))
        p.discard()
        self.assertEqual(self.sent(), [b"U2 LOGOUT"])
        self.receive(b"* BYE logging out")
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(lost, [])
        self.assertFalse(p.claim())

    def test_theSpliceHearsTheEndOnce(self):
        """While relaying, the connection's end goes to the splice, once."""
        p = self.loggedInProto()
        ends: list = []
        p.takeOver(lambda data: None, ends.append)
        p.connectionLost(Failure(ConnectionDone()))
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(ends), 1)

    def test_aFailedLoginIsClosed(self):
        """A failed login closes the connection; later lines and its end change nothing."""
        self.connect()
        self.receive(b"* BYE no")
        self.failed(Unavailable)
        self.receive(GREETING, b"U1 OK [CAPABILITY X] ok")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.results), 1)
        self.assertFalse(self.proto.claim())

    def test_aTooLongLineWhileRelayingIsNotParsed(self):
        """Once relaying, bytes are not lines: no length limit applies."""
        p = self.loggedInProto()
        got: list[bytes] = []
        p.takeOver(got.append, lambda reason: None)
        p.dataReceived(b"x" * (p.MAX_LENGTH + 10))
        self.assertEqual(len(got[0]), p.MAX_LENGTH + 10)
        self.assertFalse(self.transport.disconnecting)

    def test_theLoginCanBeTakenOverFromItsReadyCallback(self):
        """ready's callback may take the connection over at once (as the realm's caller does)."""
        self.connect()
        leftovers: list[bytes] = []
        self.proto.ready.addCallback(
            lambda p: leftovers.append(p.takeOver(lambda data: None, lambda reason: None))
        )
        self.proto.dataReceived(GREETING + b"\r\nU1 OK [CAPABILITY X] ok\r\n* 1 EXISTS\r\n")
        self.assertEqual(leftovers, [b"* 1 EXISTS\r\n"])


class SpareProtocolTests(_Driver):
    """An ``UpstreamProtocol`` kept as a spare."""

    def spare(self):
        self.connect()
        self.receive(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi", b"U1 OK [CAPABILITY X] ok"
        )
        self.loggedIn()
        self.transport.clear()
        self.lost: list = []
        self.proto.keepAsSpare(lambda: self.lost.append(True))
        self.assertEqual(self.transport.producerState, "producing", "a spare keeps reading")
        return self.proto

    def test_whatArrivesMeanwhileGoesToTheClient(self):
        """Untagged lines read while waiting come back from takeOver(), in order."""
        p = self.spare()
        self.receive(b"* OK still here", b"* 2 EXISTS")
        self.proto.dataReceived(b"* partial")
        self.assertTrue(p.claim())
        self.assertEqual(self.transport.producerState, "paused")
        leftover = p.takeOver(lambda data: None, lambda reason: None)
        self.assertEqual(leftover, b"* OK still here\r\n* 2 EXISTS\r\n* partial")

    def test_aSpareThatIsClosedReportsIt(self):
        """The server's close of a waiting spare reaches the pool, and it cannot be claimed."""
        p = self.spare()
        p.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.lost, [True])
        self.assertFalse(p.claim())

    def test_tooMuchWhileWaitingDropsTheSpare(self):
        """A spare does not buffer without bound."""
        p = self.spare()
        for _ in range(p.MAX_KEPT // 1000 + 2):
            self.proto.dataReceived(b"* " + b"x" * 998 + b"\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_discardLogsOut(self):
        """An unwanted spare says LOGOUT and closes."""
        p = self.spare()
        p.discard()
        self.assertEqual(self.sent(), [b"U2 LOGOUT"])
        self.assertTrue(self.transport.disconnecting)


# --- Regression tests (each docstring says what was wrong; every test
# failed before its fix). ---


class WarmStopWhileConnectingTests(_Driver):
    def test_aSpareFinishedAfterStopIsClosed(self):
        """
        proxy/upstream/spares.py _warm: a warm-up that completes after ``stop()`` (or for
        an account that already has a spare) calls ``protocol.discard()``, but
        the protocol is still in state "ready" (keepAsSpare was never called)
        and ``UpstreamProtocol.discard`` only acts in state "spare".

        Expected: the logged-in provider connection is logged out / closed.
        Actual: nothing is sent, the transport stays open (and paused, so it
        never even notices the server closing it): the connection leaks.
        """
        clock = task.Clock()
        pending: list[Deferred] = []

        def connect(acct):
            d: Deferred = Deferred()
            pending.append(d)
            return d

        warm = WarmUpstreams(connect, clock, keep=300.0, often=2)
        acct = account()
        warm.loggedIn(acct)
        clock.advance(1)
        warm.loggedIn(acct)
        clock.advance(0)
        self.assertEqual(len(pending), 1)

        # A real UpstreamProtocol, logged in (state "ready"), as connect gives it.
        self.connect()
        self.receive(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi", b"U1 OK [CAPABILITY X] ok"
        )
        proto = self.loggedIn()
        self.transport.clear()

        warm.stop()  # shutdown while the warm-up is under way
        pending[0].callback(proto)

        self.assertEqual(len(warm), 0)
        self.assertTrue(
            self.transport.disconnecting,
            "the spare made after stop() is neither logged out nor closed",
        )


class SpareAfterAccountCloseTests(SynchronousTestCase):
    def test_aWarmUpUnderWayWhenTheAccountIsRemovedMakesNoSpare(self):
        """
        proxy/imap SessionRegistry.close(account) -> WarmUpstreams.discard
        only drops a spare that exists; a warm-up still connecting (in
        ``_warming``) is not cancelled or marked, so when it completes the
        removed account gets a fresh logged-in spare (to its mailbox, with
        its old grant) that lives for ``keep`` seconds, and is handed out if
        the account id is re-created with the same settings within that time.

        Expected: after the account's sessions are closed (account removed),
        no spare for it exists. Actual: one is kept.
        """
        clock = task.Clock()
        pending: list[Deferred] = []

        def connect(acct):
            d: Deferred = Deferred()
            pending.append(d)
            return d

        warm = WarmUpstreams(connect, clock, keep=300.0, often=2)
        registry = SessionRegistry(spares=warm)
        acct = account()
        warm.loggedIn(acct)
        clock.advance(1)
        warm.loggedIn(acct)
        clock.advance(0)  # the warm-up is connecting
        registry.close(account=acct.id)  # accounts remove (here or via the bus)
        proto = FakeUpstream()
        pending[0].callback(proto)
        try:
            self.assertEqual(len(warm), 0, "the removed account got a spare")
        finally:
            warm.stop()
