"""
Tests for provider throttling: the recognition tables
(``proxy.upstream.throttling``), the login machines' use of them, the
back-off (``proxy.throttle``, time from ``task.Clock``), the realm's use of
it (no provider reached during a back-off), the stores' records and the
account views.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from proxy import throttle as throttlemodule
from proxy.cred import IUpstreamSession, UpstreamRealm
from proxy.errors import LimitReached, ProviderThrottled, UpstreamRejectedToken
from proxy.metrics import Metrics
from proxy.oauth import AccessTokens, Grant
from proxy.store import MemoryStore
from proxy.store._throttles import MAX_LOCAL, LocalThrottles
from proxy.throttle import ThrottlePolicy, Throttles, throttledViews
from proxy.upstream.login import UpstreamLogin
from proxy.upstream.smtpreplies import ReplyReader
from proxy.upstream.throttling import imapThrottling, smtpThrottling
from tests.test_cred import FakeConnector, MemoryAccounts
from tests.test_oauth import FakeRefresher, FakeSaver, account

GMAIL_CONNECTIONS = b"NO [ALERT] Too many simultaneous connections. (Failure)"
GMAIL_BANDWIDTH = b"NO [ALERT] Account exceeded command or bandwidth limits. (Failure)"
GMAIL_QUOTA = b"NO [OVERQUOTA] Account is over quota (Failure)"
MS_THROTTLED = b"NO Request is throttled. Suggested Backoff Time: 2500 milliseconds"
MS_THREADS = b"432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"


def reply(line: bytes) -> Any:
    r = ReplyReader().feed(line)
    assert r is not None
    return r


class RecognitionTests(SynchronousTestCase):
    def test_imapTexts(self):
        """Gmail's and Microsoft's throttling texts each get their fixed reason."""
        for text, reason in (
            (GMAIL_CONNECTIONS, "throttled-connections"),
            (GMAIL_BANDWIDTH, "throttled-bandwidth"),
            (GMAIL_QUOTA, "throttled-quota"),
            (MS_THROTTLED, "throttled-backoff"),
        ):
            with self.subTest(text=text):
                found = imapThrottling(text[3:])
                assert found is not None
                self.assertEqual(found.reason, reason)

    def test_microsoftSuggestedTime(self):
        """Microsoft's suggested back-off is read in seconds."""
        found = imapThrottling(MS_THROTTLED[3:])
        assert found is not None
        self.assertEqual(found.suggested, 2.5)

    def test_otherRefusalsAreNotThrottling(self):
        """A refused token or a server's own limit is not throttling."""
        for text in (
            b"[AUTHENTICATIONFAILED] Invalid credentials (Failure)",
            b"[UNAVAILABLE] Maximum number of connections from user+IP exceeded",
            b"",
        ):
            self.assertIsNone(imapThrottling(text))

    def test_smtpReplies(self):
        """Microsoft's sender thread limit and 4.7.x throttling replies are recognised."""
        for line, reason in (
            (MS_THREADS, "throttled-submission"),
            (b"451 4.7.500 Server busy. Please try again later", "throttled-busy"),
            (b"421 4.7.28 Our system has detected an unusual rate", "throttled-rate"),
            (b"454 4.7.0 Too many login attempts, please try again later", "throttled"),
        ):
            with self.subTest(line=line):
                found = smtpThrottling(reply(line))
                assert found is not None
                self.assertEqual(found.reason, reason)

    def test_smtpOtherReplies(self):
        """A shutting-down server or a plain temporary failure is not throttling."""
        for line in (
            b"421 4.3.2 Service shutting down",
            b"454 4.7.0 Temporary authentication failure",
            b"535 5.7.8 Username and Password not accepted",
        ):
            self.assertIsNone(smtpThrottling(reply(line)))


class FakeIO:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.errors: list[Any] = []

    def sendLine(self, line: bytes) -> None:
        self.sent.append(line)

    def upgradeToTLS(self) -> None:
        pass

    def loginSucceeded(self) -> None:
        pass

    def loginFailed(self, error: Any) -> None:
        self.errors.append(error)


class Authenticator:
    user = b"alice@example.com"

    def getName(self) -> bytes:
        return b"XOAUTH2"

    def challengeResponse(self, secret: bytes, challenge: bytes) -> bytes:
        return b"user=alice\x01auth=Bearer x\x01\x01"


class LoginMachineTests(SynchronousTestCase):
    def refusedWith(self, line: bytes) -> Any:
        io = FakeIO()
        login = UpstreamLogin(io, Authenticator(), b"at", startTLS=False)
        login.lineReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi")
        login.lineReceived(b"U1 " + line)
        self.assertEqual(len(io.errors), 1)
        return io.errors[0]

    def test_gmailConnectionsIsThrottlingNotARefusedToken(self):
        """Gmail's [ALERT] connection limit is throttling: no refresh and retry."""
        error = self.refusedWith(GMAIL_CONNECTIONS)
        self.assertIsInstance(error, ProviderThrottled)
        self.assertNotIsInstance(error, UpstreamRejectedToken)

    def test_microsoftThrottling(self):
        """Microsoft's throttled answer carries its suggested time."""
        error = self.refusedWith(MS_THROTTLED)
        self.assertIsInstance(error, ProviderThrottled)
        self.assertEqual(error.suggested, 2.5)

    def test_limitCodeStaysLimitReached(self):
        """NO [LIMIT] stays the provider's own connection limit."""
        self.assertIsInstance(
            self.refusedWith(b"NO [LIMIT] Too many simultaneous connections"), LimitReached
        )

    def test_byeAtGreeting(self):
        """A throttling BYE instead of a greeting is throttling too."""
        io = FakeIO()
        login = UpstreamLogin(io, Authenticator(), b"at", startTLS=False)
        login.lineReceived(b"* BYE Request is throttled. Suggested Backoff Time: 1000 ms")
        self.assertIsInstance(io.errors[0], ProviderThrottled)


class ErrorTextTests(SynchronousTestCase):
    def test_fixedTexts(self):
        """The client reads a fixed text with the seconds left, IMAP and SMTP."""
        e = ProviderThrottled("throttled-backoff", 2.5, retryAfter=3)
        self.assertEqual(
            e.imapResponse(),
            b"NO [UNAVAILABLE] The provider is throttling this account, try again in 3 seconds",
        )
        self.assertEqual(
            e.smtpResponse(),
            b"454 4.7.0 The provider is throttling this account, try again in 3 seconds",
        )


class ThrottlesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1764511200)
        self.store = MemoryStore()
        self.metrics = Metrics(self.clock, process=False)
        self.events: list[dict] = []
        self.patch(throttlemodule, "log", Logger(observer=self.events.append))
        self.throttles = Throttles(
            self.store, self.clock, ThrottlePolicy(default=60.0, maximum=600.0), self.metrics
        )

    def check(self, protocol: str = "imap") -> Deferred[None]:
        return Deferred.fromCoroutine(self.throttles.check("alice", protocol))

    def record(self, error: ProviderThrottled, protocol: str = "imap") -> None:
        self.successResultOf(
            Deferred.fromCoroutine(self.throttles.record("alice", protocol, error))
        )

    def test_backOffAfterThrottling(self):
        """After a throttling, logins of that protocol are refused until it ends."""
        self.successResultOf(self.check())
        e = ProviderThrottled("throttled-bandwidth")
        self.record(e)
        self.assertEqual(e.retryAfter, 60)
        refused = self.failureResultOf(self.check(), ProviderThrottled).value
        self.assertEqual(refused.reason, "throttled-bandwidth")
        self.assertEqual(refused.retryAfter, 60)
        self.successResultOf(self.check("smtp"))
        self.clock.advance(59.5)
        self.assertEqual(self.failureResultOf(self.check(), ProviderThrottled).value.retryAfter, 1)
        self.clock.advance(0.5)
        self.successResultOf(self.check())

    def test_suggestedTimeHonouredAndBounded(self):
        """Microsoft's suggested time is the back-off, up to the maximum."""
        e = ProviderThrottled("throttled-backoff", 2.5)
        self.record(e)
        self.assertEqual(e.retryAfter, 3)
        self.clock.advance(2.5)
        self.successResultOf(self.check())
        e = ProviderThrottled("throttled-backoff", 86400.0)
        self.record(e)
        self.assertEqual(e.retryAfter, 600)

    def test_loggedCountedAudited(self):
        """A throttling is logged with the account, counted and audited; refusals counted."""
        self.record(ProviderThrottled("throttled-connections", 10.0))
        self.failureResultOf(self.check(), ProviderThrottled)
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn(
            'imapproxy_account_throttled_total{protocol="imap",reason="throttled-connections"} 1.0',
            text,
        )
        self.assertIn(
            'imapproxy_account_throttled_refused_total{protocol="imap",'
            'reason="throttled-connections"} 1.0',
            text,
        )
        warned = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(warned[0]["account"], "alice")

    def test_view(self):
        """The account view shows the last throttling, then null once forgotten."""
        self.record(ProviderThrottled("throttled-submission"), "smtp")
        now = self.clock.seconds()
        (view,) = self.successResultOf(
            Deferred.fromCoroutine(throttledViews(self.store, [{"account": "alice"}], now))
        )
        self.assertEqual(
            view["throttled"],
            {"reason": "throttled-submission", "protocol": "smtp", "at": now, "until": now + 60},
        )
        later = now + 60 + self.throttles.policy.keep
        (view,) = self.successResultOf(
            Deferred.fromCoroutine(throttledViews(self.store, [{"account": "alice"}], later))
        )
        self.assertIsNone(view["throttled"])


class LocalThrottlesTests(SynchronousTestCase):
    def test_bounded(self):
        """The in-process records are bounded: those forgotten soonest go first."""
        store = LocalThrottles()
        for i in range(MAX_LOCAL + 5):
            store.setThrottle(f"a{i}", "imap", "throttled", 0.0, float(i), 10.0)
        found = self.successResultOf(store.getThrottles([("a0", "imap"), ("a9999", "imap")], 0))
        self.assertEqual(found, [None, ("throttled", 0.0, 9999.0)])


class RealmTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1764511200)
        self.refresh = FakeRefresher()
        self.connect = FakeConnector()
        self.tokens = AccessTokens(self.refresh, FakeSaver(), self.clock)
        self.realm = UpstreamRealm(MemoryAccounts(account()), self.tokens, self.connect, self.clock)
        self.realm.throttles = Throttles(MemoryStore(), self.clock)

    def login(self, iface: Any = IUpstreamSession) -> Deferred[Any]:
        return self.realm.requestAvatar(("alice", "token-id"), None, iface)

    def test_noRetryStorm(self):
        """A throttled login is not retried, and the next reaches no provider at all."""
        self.connect.answers = [ProviderThrottled("throttled-connections", 10.0)]
        d = self.login()
        self.refresh.answer(Grant("at-1", 3600.0))
        error = self.failureResultOf(d, ProviderThrottled).value
        self.assertEqual(error.retryAfter, 10)
        self.assertEqual(self.connect.tokens, ["at-1"])
        self.assertEqual(len(self.refresh.calls), 1)
        self.failureResultOf(self.login(), ProviderThrottled)
        self.assertEqual(self.connect.tokens, ["at-1"])
        self.clock.advance(10)
        self.successResultOf(self.login())
        self.assertEqual(self.connect.tokens, ["at-1", "at-1"])

    def test_smtpBackOffIsItsOwn(self):
        """An SMTP throttling backs off SMTP logins; IMAP ones go on."""
        self.successResultOf(
            Deferred.fromCoroutine(
                self.realm.throttles.record(
                    "alice", "smtp", ProviderThrottled("throttled-submission")
                )
            )
        )
        smtp = Deferred.fromCoroutine(self.realm.throttles.check("alice", "smtp"))
        self.failureResultOf(smtp, ProviderThrottled)
        d = self.login()
        self.refresh.answer(Grant("at-1", 3600.0))
        self.successResultOf(d)
