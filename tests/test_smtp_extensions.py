"""
Tests for what the pre-auth EHLO offers (``proxy.smtp.extensions``) and for
priming it from the stored accounts' SMTP servers (``proxy.smtp.prime``),
with a fake store and fake probes on a ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import Unavailable
from proxy.model import Account, OAuth2Grant, Upstream
from proxy.smtp import ExtensionsPrimer, Features, ProviderExtensions, serverKey

GMAIL = [
    b"SIZE 35882577",
    b"8BITMIME",
    b"AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
    b"ENHANCEDSTATUSCODES",
    b"PIPELINING",
    b"CHUNKING",
    b"SMTPUTF8",
]
OFFICE365 = [
    b"SIZE 157286400",
    b"PIPELINING",
    b"DSN",
    b"ENHANCEDSTATUSCODES",
    b"AUTH LOGIN XOAUTH2",
    b"8BITMIME",
    b"BINARYMIME",
    b"CHUNKING",
    b"SMTPUTF8",
]
DOVECOT = [
    b"8BITMIME",
    b"AUTH XOAUTH2 OAUTHBEARER",
    b"BURL imap",
    b"CHUNKING",
    b"ENHANCEDSTATUSCODES",
    b"SIZE 35882577",
    b"STARTTLS",
    b"PIPELINING",
]


class FeaturesTests(SynchronousTestCase):
    def test_allowList(self):
        """Only the allow-listed keywords are kept: never AUTH, STARTTLS, BURL or vendor ones."""
        f = Features.parse(DOVECOT + [b"XCLIENT ADDR", b"X-EXPS GSSAPI", b"VRFY", b"ETRN"])
        self.assertEqual(
            f.lines(),
            [b"SIZE 35882577", b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"CHUNKING"],
        )

    def test_caseAndJunk(self):
        """Keywords are case-insensitive; empty, non-bytes and unreadable SIZE lines are dropped."""
        f = Features.parse([b"pipelining", b"", b"   ", "8BITMIME", b"SIZE lots"])  # type: ignore[list-item]
        self.assertEqual(f.lines(), [b"PIPELINING"])
        self.assertEqual(Features.parse([b"SIZE 1" + b"0" * 30]).lines(), [])

    def test_sizeWithoutLimit(self):
        """SIZE without a number (or 0) is SIZE with no stated limit."""
        self.assertEqual(Features.parse([b"SIZE"]).lines(), [b"SIZE"])
        self.assertEqual(Features.parse([b"SIZE 0"]).lines(), [b"SIZE"])

    def test_binarymimeNeedsChunking(self):
        """BINARYMIME without CHUNKING is dropped (RFC 3030 ties them)."""
        self.assertEqual(Features.parse([b"BINARYMIME"]).lines(), [])
        self.assertEqual(
            Features.parse([b"BINARYMIME", b"CHUNKING"]).lines(), [b"CHUNKING", b"BINARYMIME"]
        )


class ProviderExtensionsTests(SynchronousTestCase):
    def test_firstConnectionOffersNothing(self):
        """Nothing learned: nothing offered."""
        self.assertEqual(ProviderExtensions().offered(), [])

    def test_oneProvider(self):
        """One provider learned: its allowed extensions, SIZE with its limit."""
        cache = ProviderExtensions()
        cache.learn("smtp.office365.com:587", OFFICE365)
        self.assertEqual(
            cache.offered(),
            [
                b"SIZE 157286400",
                b"8BITMIME",
                b"PIPELINING",
                b"ENHANCEDSTATUSCODES",
                b"CHUNKING",
                b"BINARYMIME",
                b"SMTPUTF8",
                b"DSN",
            ],
        )

    def test_intersection(self):
        """Several providers: what all have, SIZE with the smallest limit."""
        cache = ProviderExtensions()
        cache.learn("smtp.office365.com:587", OFFICE365)
        cache.learn("smtp.gmail.com:465", GMAIL)
        self.assertEqual(
            cache.offered(),
            [
                b"SIZE 35882577",
                b"8BITMIME",
                b"PIPELINING",
                b"ENHANCEDSTATUSCODES",
                b"CHUNKING",
                b"SMTPUTF8",
            ],
        )
        cache.learn("localhost:10587", DOVECOT)
        self.assertNotIn(b"SMTPUTF8", cache.offered())

    def test_sizeLimits(self):
        """A stated limit wins over none; no SIZE at one server, no SIZE at all."""
        cache = ProviderExtensions()
        cache.learn("a:1", [b"SIZE"])
        cache.learn("b:1", [b"SIZE 1000"])
        self.assertEqual(cache.offered(), [b"SIZE 1000"])
        cache.learn("c:1", [b"SIZE 500", b"PIPELINING"])
        self.assertEqual(cache.offered(), [b"SIZE 500"])
        cache.learn("d:1", [b"PIPELINING"])
        self.assertEqual(cache.offered(), [])

    def test_relearnReplaces(self):
        """A server learned again replaces what it offered before."""
        cache = ProviderExtensions()
        cache.learn("a:1", [b"PIPELINING", b"DSN"])
        cache.learn("a:1", [b"PIPELINING"])
        self.assertEqual(cache.offered(), [b"PIPELINING"])
        self.assertEqual(len(cache), 1)

    def test_pendingServersOfferNothing(self):
        """While a stored account's server is unknown, nothing is offered; learning it ends that."""
        cache = ProviderExtensions()
        cache.learn("a:1", GMAIL)
        self.assertEqual(cache.expect(["a:1", "b:2"]), frozenset({"b:2"}))
        self.assertEqual(cache.offered(), [])
        cache.learn("b:2", GMAIL)
        self.assertEqual(cache.pending, frozenset())
        self.assertEqual(cache.offered()[0], b"SIZE 35882577")
        # An account removed: its server is no longer waited for.
        cache.expect(["c:3"])
        self.assertEqual(cache.offered(), [])
        cache.expect([])
        self.assertNotEqual(cache.offered(), [])

    def test_unreachableServerStopsHoldingBack(self):
        """A stored account's server that failed its probe no longer empties the offer."""
        cache = ProviderExtensions()
        cache.learn("a:1", [b"PIPELINING"])
        cache.expect(["a:1", "dead:1"])
        self.assertEqual(cache.offered(), [])
        cache.unreachable("dead:1")
        self.assertEqual(cache.offered(), [b"PIPELINING"])
        # Probed again next round: still not waited for while the probe runs.
        self.assertEqual(cache.expect(["a:1", "dead:1"]), frozenset({"dead:1"}))
        self.assertEqual(cache.offered(), [b"PIPELINING"])
        # A server no stored account names is not marked.
        cache.unreachable("other:1")
        cache.expect(["a:1", "dead:1", "other:1"])
        self.assertEqual(cache.offered(), [])
        cache.learn("other:1", [b"PIPELINING", b"DSN"])
        self.assertEqual(cache.offered(), [b"PIPELINING"])
        # An account gone and back: its server is waited for afresh.
        cache.expect(["a:1"])
        self.assertEqual(cache.expect(["a:1", "dead:1"]), frozenset({"dead:1"}))
        self.assertEqual(cache.offered(), [])

    def test_boundedAndForgettingNeverWidens(self):
        """Past maxHosts the oldest server goes, but what it lacked stays unoffered."""
        cache = ProviderExtensions(maxHosts=2)
        cache.learn("poor:1", [b"PIPELINING"])
        cache.learn("rich:1", GMAIL)
        cache.learn("rich:2", GMAIL)
        self.assertEqual(len(cache), 2)
        self.assertFalse(cache.knows("poor:1"))
        self.assertEqual(cache.offered(), [b"PIPELINING"])

    def test_offeredIsACopy(self):
        """A caller appending STARTTLS or AUTH does not change the cache."""
        cache = ProviderExtensions()
        cache.learn("a:1", [b"PIPELINING"])
        cache.offered().append(b"AUTH PLAIN LOGIN")
        self.assertEqual(cache.offered(), [b"PIPELINING"])


def account(id: str, smtp: Upstream | None) -> Account:
    grant = OAuth2Grant(
        tokenURL="https://t.example/token", clientId="c", clientSecret="s", refreshToken="r"
    )
    return Account(id, f"{id}@example.com", Upstream("imap.example"), grant, smtp=smtp)


class FakeStore:
    def __init__(self, accounts: list[Account]):
        self.accounts = accounts
        self.down = False

    def listAccounts(self) -> Deferred:
        if self.down:
            return fail(ConnectionError("down"))
        return succeed(list(self.accounts))


class PrimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.cache = ProviderExtensions()
        self.probes: list[tuple[Any, Deferred]] = []
        gmail = Upstream("smtp.gmail.com", 465, "implicit")
        self.store = FakeStore(
            [
                account("a", gmail),
                account("b", gmail),
                account("c", Upstream("smtp.office365.com", 587, "starttls")),
                account("d", None),
            ]
        )
        self.primer = ExtensionsPrimer(self.store, self.cache, self.probe, self.clock, interval=300)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def tearDown(self) -> None:
        self.primer.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def probe(self, upstream: Any) -> Deferred:
        d: Deferred = Deferred()
        self.probes.append((upstream, d))
        return d

    def text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def test_probesEachServerOnceAndLearns(self):
        """At start each distinct SMTP server is probed once; their answers are learned."""
        self.primer.startService()
        self.assertEqual(
            sorted(serverKey(u) for u, _d in self.probes),
            ["smtp.gmail.com:465", "smtp.office365.com:587"],
        )
        self.assertEqual(self.cache.offered(), [])
        byServer = {serverKey(u): d for u, d in self.probes}
        byServer["smtp.gmail.com:465"].callback(GMAIL)
        self.assertEqual(self.cache.offered(), [])  # office365 still unknown
        byServer["smtp.office365.com:587"].callback(OFFICE365)
        self.assertEqual(self.cache.offered()[0], b"SIZE 35882577")
        self.assertIn("SMTP server smtp.gmail.com:465 offers SIZE 35882577 8BITMIME", self.text())
        # The next round finds nothing to probe.
        self.clock.advance(300)
        self.assertEqual(len(self.probes), 2)

    def test_failureLoggedOnceAndRetried(self):
        """A server that cannot be probed is named once, and probed again next round."""
        self.primer.startService()
        for _u, d in self.probes:
            d.errback(Unavailable())
        self.clock.advance(300)
        self.assertEqual(len(self.probes), 4)
        for _u, d in self.probes[2:]:
            d.errback(ConnectionRefusedError())
        failures = [e for e in self.events if "failed" in formatEvent(e)]
        self.assertEqual(len(failures), 2)
        self.assertIn("probing SMTP server smtp.gmail.com:465 failed (unavailable)", self.text())
        self.assertEqual(self.cache.pending, frozenset())
        # One answers at last; the other fails a third time, unlogged.
        self.clock.advance(300)
        byServer = {serverKey(u): d for u, d in self.probes[4:]}
        byServer["smtp.gmail.com:465"].callback(GMAIL)
        self.assertEqual(self.cache.offered()[0], b"SIZE 35882577")
        byServer["smtp.office365.com:587"].errback(Unavailable())
        self.assertEqual(self.text().count("failed"), 2)

    def test_slowProbeNotDoubled(self):
        """A probe still under way at the next round is not started again."""
        self.primer.startService()
        self.clock.advance(300)
        self.assertEqual(len(self.probes), 2)

    def test_loginLearnedMeanwhile(self):
        """A server a login taught is not probed."""
        self.cache.learn("smtp.gmail.com:465", GMAIL)
        self.primer.startService()
        self.assertEqual([serverKey(u) for u, _d in self.probes], ["smtp.office365.com:587"])

    def test_storeDown(self):
        """A store that cannot list accounts: one line, and the next round tries again."""
        self.store.down = True
        self.primer.startService()
        self.clock.advance(300)
        self.assertEqual(self.probes, [])
        self.assertEqual(self.text().count("cannot list the accounts"), 1)
        self.store.down = False
        self.clock.advance(300)
        self.assertEqual(len(self.probes), 2)

    def test_probeRaising(self):
        """A probe that raises at once counts as a failed probe, not a stopped primer."""

        def broken(upstream: Any) -> Deferred:
            raise ValueError("bad")

        primer = ExtensionsPrimer(self.store, self.cache, broken, self.clock, interval=300)
        primer.startService()
        self.assertIn("failed (ValueError)", self.text())
        primer.stopService()

    def test_stopCancelsProbes(self):
        """Stopping cancels the probes under way and the rounds, quietly."""
        self.primer.startService()
        self.primer.stopService()
        self.assertEqual(len(self.probes), 2)
        self.assertEqual(self.primer._inflight, {})
        self.assertNotIn("failed", self.text())
