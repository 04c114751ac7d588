"""
Tests for ``proxy.penalties`` and the penalties of ``TokenChecker``: the
doubling and its cap, decay, per-address bookkeeping, the checker's waits and
429 refusals over a ``task.Clock``, its refusal lines against the fail2ban
filter in ``docs/fail2ban``, and the Redis backend shared by two stores on a
real redis-server.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile

from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, fail, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy.cred import TokenChecker, TokenCredentials
from proxy.encryption import Secrets
from proxy.errors import AccessDenied
from proxy.model import Token
from proxy.penalties import (
    IPenaltyBackend,
    LoginPenalties,
    MemoryPenalties,
    PenaltyInForce,
    PenaltyPolicy,
    PenaltyStatus,
    penaltyKey,
)
from proxy.store import RedisPenalties, RedisStore
from proxy.tokens import newToken
from tests.test_api import MemoryStore
from tests.upstream.redisserver import RedisServer

NOW = 1_750_000_000.0
ATTACKER = "127.0.0.2"
USER = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
FILTER = os.path.join(os.path.dirname(HERE), "docs", "fail2ban", "imapproxy.conf")


class PolicyTests(SynchronousTestCase):
    def test_doublingUpToTheCap(self):
        """2 s after the first failure, doubling per failure, capped at 15 s."""
        policy = PenaltyPolicy()
        self.assertEqual([policy.penalty(n) for n in range(7)], [0, 2, 4, 8, 15, 15, 15])
        self.assertEqual(policy.penalty(10**6), 15)

    def test_off(self):
        """A maximum of 0 turns penalties off."""
        self.assertEqual(PenaltyPolicy(maximum=0).penalty(5), 0)

    def test_retryAfterWholeSeconds(self):
        """Retry-After is the remaining penalty rounded up, at least 1."""
        self.assertEqual(PenaltyStatus(5, 14.2).retryAfter, 15)
        self.assertEqual(PenaltyStatus(5, 0.01).retryAfter, 1)


class KeyTests(SynchronousTestCase):
    def test_keys(self):
        """IPv4 by address (mapped IPv6 too), IPv6 by its /64, junk as it is."""
        self.assertEqual(penaltyKey("192.0.2.7"), "192.0.2.7")
        self.assertEqual(penaltyKey("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(penaltyKey("2001:db8:1:2:3::7"), "2001:db8:1:2::/64")
        self.assertEqual(penaltyKey("2001:db8:1:2:ffff::1%eth0"), "2001:db8:1:2::/64")
        self.assertEqual(penaltyKey("unknown"), "unknown")


class LoginPenaltiesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.backend = MemoryPenalties(self.clock)
        self.penalties = LoginPenalties(self.backend, self.clock, PenaltyPolicy(forget=600))

    def status(self, address: str = ATTACKER) -> PenaltyStatus:
        return self.successResultOf(self._status(address))

    def _status(self, address: str):
        return ensureDeferred(self.penalties.status(address))

    def fail(self, address: str = ATTACKER) -> int:
        return self.successResultOf(ensureDeferred(self.penalties.failed(address)))

    def test_interface(self):
        verifyObject(IPenaltyBackend, self.backend)

    def test_cleanAddress(self):
        self.assertEqual(self.status(), PenaltyStatus(0, 0.0))

    def test_remainingRunsDown(self):
        """The penalty counts from the last failure and runs down with the clock."""
        self.fail()
        self.fail()
        self.assertEqual(self.status(), PenaltyStatus(2, 4.0))
        self.clock.advance(3)
        self.assertEqual(self.status(), PenaltyStatus(2, 1.0))
        self.clock.advance(1)
        self.assertEqual(self.status(), PenaltyStatus(2, 0.0))

    def test_decay(self):
        """An address quiet for ``forget`` seconds starts clean again."""
        for _ in range(6):
            self.fail()
        self.clock.advance(599)
        self.assertEqual(self.status().failures, 6)
        self.clock.advance(1)
        self.assertEqual(self.status(), PenaltyStatus())
        self.assertEqual(self.fail(), 1)
        self.assertEqual(len(self.backend), 1)

    def test_otherAddressUntouched(self):
        for _ in range(6):
            self.fail()
        self.assertEqual(self.status(USER), PenaltyStatus())

    def test_successClears(self):
        self.fail()
        self.successResultOf(ensureDeferred(self.penalties.succeeded(ATTACKER, self.status())))
        self.assertEqual(self.status(), PenaltyStatus())

    def test_memoryBounded(self):
        """Past its size the in-memory backend drops the address that failed longest ago."""
        backend = MemoryPenalties(self.clock, maxAddresses=3)
        for i in range(5):
            backend.fail(f"192.0.2.{i}", self.clock.seconds(), 600)
        self.assertEqual(len(backend), 3)
        self.assertIsNone(self.successResultOf(backend.get("192.0.2.0")))
        self.assertEqual(self.successResultOf(backend.get("192.0.2.4")), (1, NOW))

    def test_remainingNeverExceedsThePenalty(self):
        """
        A failure time ahead of this clock (another instance's clock on a
        shared Redis, or a damaged value) never makes a wait longer than the
        penalty itself: waits stay bounded by ``maximum``.
        """
        for last in (NOW + 3600, float("inf")):
            self.backend._entries[ATTACKER] = (3, last, NOW + 600)
            self.assertEqual(self.status(), PenaltyStatus(3, 8.0))

    def test_disabled(self):
        """With penalties off nothing is counted."""
        off = LoginPenalties(self.backend, self.clock, PenaltyPolicy(maximum=0))
        self.successResultOf(ensureDeferred(off.failed(ATTACKER)))
        self.assertEqual(len(self.backend), 0)


def tokenRecord(token: str, tid: str, **kw) -> Token:
    fields = dict(
        id=tid, account="alice", scopes=("imap-proxy",), description="t", created=NOW - 10
    )
    fields.update(kw)
    return Token(**fields)


class CheckerPenaltyTests(SynchronousTestCase):
    """``TokenChecker`` with penalties, over a memory store and a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore(self.clock)
        self.token, tid = newToken()
        self.store.tokens[tid] = tokenRecord(self.token, tid)
        self.penalties = LoginPenalties(MemoryPenalties(self.clock), self.clock)
        self.checker = TokenChecker(self.store, self.clock, penalties=self.penalties)

    def attempt(self, address: str = ATTACKER, good: bool = False, checker=None):
        token = self.token if good else "f" * 64
        creds = TokenCredentials(account="alice", token=token, address=address)
        return (checker or self.checker).requestAvatarId(creds)

    def answeredAfter(self, d) -> float:
        """Advance the clock a second at a time until ``d`` fires; :return: seconds waited."""
        waited = 0
        while not d.called:
            self.clock.advance(1)
            waited += 1
            self.assertLess(waited, 60, "never answered")
        return waited

    def refusedAfter(self, d) -> float:
        """Like ``answeredAfter``, for an attempt that must be refused."""
        waited = self.answeredAfter(d)
        self.failureResultOf(d, AccessDenied)
        return waited

    def test_failuresDouble(self):
        """Successive failures from one address are answered after 0, 2, 4, 8, 15, 15 s."""
        waits = []
        for _ in range(6):
            d = self.attempt()
            waits.append(self.answeredAfter(d))
            self.failureResultOf(d, AccessDenied)
        self.assertEqual(waits, [0, 2, 4, 8, 15, 15])

    def test_validLoginSlowedNotRefused(self):
        """A valid login from a penalised address waits out the penalty, succeeds, and clears it."""
        for _ in range(4):
            d = self.attempt()
            self.answeredAfter(d)
            self.failureResultOf(d, AccessDenied)
        d = self.attempt(good=True)
        self.assertNoResult(d)
        self.assertEqual(self.answeredAfter(d), 15)
        self.assertEqual(self.successResultOf(d)[0], "alice")
        # Cleared: the next failure is answered at once.
        self.failureResultOf(self.attempt(), AccessDenied)

    def test_otherAddressNotSlowed(self):
        """Failures from one address never slow a login from another."""
        for _ in range(5):
            self.refusedAfter(self.attempt())
        self.successResultOf(self.attempt(USER, good=True))
        self.failureResultOf(self.attempt(USER), AccessDenied)

    def test_decay(self):
        """After a quiet period the address is answered at once again."""
        for _ in range(5):
            self.refusedAfter(self.attempt())
        self.clock.advance(600)
        self.failureResultOf(self.attempt(), AccessDenied)

    def test_refuseWithRetryAfter(self):
        """With refuse (the API), past refuseAfter failures: PenaltyInForce, no wait, no count."""
        api = TokenChecker(self.store, self.clock, penalties=self.penalties, refuse=True)
        for _ in range(5):
            d = self.attempt(checker=api)
            self.answeredAfter(d)
            self.failureResultOf(d, AccessDenied)
        refused = self.failureResultOf(self.attempt(good=True, checker=api), PenaltyInForce)
        self.assertEqual(refused.value.retryAfter, 15)
        self.clock.advance(10)
        refused = self.failureResultOf(self.attempt(checker=api), PenaltyInForce)
        self.assertEqual(refused.value.retryAfter, 5)
        self.clock.advance(5)
        self.successResultOf(self.attempt(good=True, checker=api))

    def test_penaltyStoreDownFailsOpen(self):
        """A backend that fails does not refuse logins the token check admits; said once."""

        @implementer(IPenaltyBackend)
        class Broken:
            def get(self, key):
                return fail(RuntimeError("down"))

            fail = clear = get

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        checker = TokenChecker(
            self.store, self.clock, penalties=LoginPenalties(Broken(), self.clock)
        )
        self.successResultOf(self.attempt(good=True, checker=checker))
        self.failureResultOf(self.attempt(checker=checker), AccessDenied)
        self.failureResultOf(self.attempt(checker=checker), AccessDenied)
        warned = [e for e in events if "penalties unavailable" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)


# -- the fail2ban filter ---------------------------------------------------------------


def filterRegex() -> re.Pattern[str]:
    """docs/fail2ban/imapproxy.conf's failregex, its <HOST> as fail2ban reads addresses."""
    with open(FILTER, encoding="utf-8") as f:
        text = f.read()
    [line] = [ln for ln in text.splitlines() if ln.startswith("failregex")]
    pattern = line.split("=", 1)[1].strip()
    host = r"(?:::f{4,6}:)?(?P<host>[0-9A-Fa-f:.]+)"
    return re.compile(pattern.replace("<HOST>", host))


_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")


def failedHosts(log: str) -> list[str]:
    """The addresses fail2ban would count in ``log`` (the date cut first, as it does)."""
    rx = filterRegex()
    hosts = []
    for line in log.splitlines():
        m = rx.search(_DATE.sub("", line, count=1))
        if m:
            hosts.append(m.group("host"))
    return hosts


class Fail2banFilterTests(SynchronousTestCase):
    def refusalLog(self) -> str:
        """Real log lines, as twistd's text log writes them, for refusals of every shape."""
        clock = Clock()
        clock.advance(NOW)
        store = MemoryStore(clock)
        token, tid = newToken()
        store.tokens[tid] = tokenRecord(token, tid, addresses=("10.0.0.0/8",))
        out = io.StringIO()
        observer = textFileLogObserver(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        imap = TokenChecker(store, clock)
        api = TokenChecker(store, clock, scope="api")
        attempts = [
            (imap, "alice", "f" * 64, "192.0.2.7"),  # unknown token
            (imap, "alice", token, "2001:db8::7"),  # wrong address
            (imap, "bob", token, "192.0.2.8"),  # wrong account
            (imap, "x from 10.9.9.9", token, "192.0.2.9"),  # a forged account field
            (imap, token, token, "::ffff:192.0.2.10"),  # a token pasted as user name
            (api, None, token, "192.0.2.11"),  # wrong scope
        ]
        for checker, account, presented, address in attempts:
            proto = "api" if checker is api else "imap"
            creds = TokenCredentials(account, presented, address, proto)
            self.failureResultOf(checker.requestAvatarId(creds), AccessDenied)
        return out.getvalue()

    def test_filterMatchesEveryRefusal(self):
        """Each refusal line gives fail2ban the client's address, whatever the user typed."""
        log = self.refusalLog()
        self.assertEqual(
            failedHosts(log),
            ["192.0.2.7", "2001:db8::7", "192.0.2.8", "192.0.2.9", "192.0.2.10", "192.0.2.11"],
            log,
        )
        self.assertNotIn("10.9.9.9", failedHosts(log))

    def test_realFail2banRegex(self):
        """fail2ban-regex itself, where installed, matches the same lines."""
        tool = shutil.which("fail2ban-regex")
        if tool is None:
            raise self.skipTest("fail2ban-regex is not installed")
        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
            f.write(self.refusalLog())
        self.addCleanup(os.unlink, f.name)
        result = subprocess.run(
            [tool, f.name, FILTER], capture_output=True, text=True, timeout=60, check=True
        )
        self.assertIn("6 matched", result.stdout)


# -- Redis: penalties shared by instances -------------------------------------------------


class RedisPenaltyTests(TestCase):
    """Two ``RedisStore`` instances on one real redis-server see one penalty."""

    def setUp(self):
        if shutil.which("redis-server") is None:
            raise self.skipTest("redis-server is not installed")
        self.server = RedisServer()
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.key = Fernet.generate_key()

    @inlineCallbacks
    def openStore(self):
        store = RedisStore(self.server.url, Secrets([self.key]))
        self.addCleanup(store.close)
        yield store.open()
        return store

    @inlineCallbacks
    def test_sharedAcrossInstances(self):
        """Failures counted through one store are seen, and cleared, through another."""
        a = RedisPenalties((yield self.openStore()))
        b = RedisPenalties((yield self.openStore()))
        verifyObject(IPenaltyBackend, a)
        self.assertIsNone((yield b.get(ATTACKER)))
        self.assertEqual((yield a.fail(ATTACKER, NOW, 600)), 1)
        self.assertEqual((yield b.fail(ATTACKER, NOW + 1.5, 600)), 2)
        self.assertEqual((yield a.get(ATTACKER)), (2, NOW + 1.5))
        self.assertIsNone((yield a.get(USER)))
        yield b.clear(ATTACKER)
        self.assertIsNone((yield a.get(ATTACKER)))

    @inlineCallbacks
    def test_forgottenByRedis(self):
        """The penalty keys expire ``forget`` after the last failure: an idle store is clean."""
        store = yield self.openStore()
        backend = RedisPenalties(store)
        yield backend.fail(ATTACKER, NOW, 600)
        keys = sorted(self.server.command("KEYS", "*penalt*"))
        self.assertEqual(len(keys), 2, keys)
        for key in keys:
            ttl = int(self.server.command("PTTL", key))
            self.assertTrue(595_000 < ttl <= 600_000, ttl)

    @inlineCallbacks
    def test_quietAddressesAreForgotten(self):
        """A failure sweeps the addresses quiet for ``forget`` seconds: they start clean."""
        backend = RedisPenalties((yield self.openStore()))
        yield backend.fail(ATTACKER, NOW, 600)
        yield backend.fail(ATTACKER, NOW + 1, 600)
        yield backend.fail(USER, NOW + 601, 600)
        self.assertIsNone((yield backend.get(ATTACKER)))
        self.assertEqual((yield backend.fail(ATTACKER, NOW + 602, 600)), 1)

    @inlineCallbacks
    def test_boundedAcrossInstances(self):
        """
        However many addresses fail, the shared store keeps at most
        ``maxAddresses`` of them, dropping those that failed longest ago:
        one client spread over many networks cannot fill Redis.
        """
        a = RedisPenalties((yield self.openStore()), maxAddresses=3)
        b = RedisPenalties((yield self.openStore()), maxAddresses=3)
        for i in range(50):
            yield (a if i % 2 else b).fail(f"2001:db8:{i:x}::/64", NOW + i, 600)
        self.assertEqual(int(self.server.command("HLEN", "imapproxy:penalties")), 3)
        self.assertEqual(int(self.server.command("ZCARD", "imapproxy:penalties-seen")), 3)
        self.assertIsNone((yield a.get("2001:db8:2e::/64")))
        self.assertEqual((yield a.get("2001:db8:31::/64")), (1, NOW + 49))

    @inlineCallbacks
    def test_checkerOverRedis(self):
        """Two checkers on two stores: a failure through one slows the other's next answer."""
        clock = Clock()
        clock.advance(NOW)
        memory = MemoryStore(clock)
        token, tid = newToken()
        memory.tokens[tid] = tokenRecord(token, tid)
        one = TokenChecker(
            memory, clock, penalties=LoginPenalties(RedisPenalties((yield self.openStore())), clock)
        )
        two = TokenChecker(
            memory, clock, penalties=LoginPenalties(RedisPenalties((yield self.openStore())), clock)
        )
        bad = TokenCredentials("alice", "f" * 64, ATTACKER)
        with self.assertRaises(AccessDenied):
            yield one.requestAvatarId(bad)
        d = two.requestAvatarId(TokenCredentials("alice", token, ATTACKER))
        # Redis answers in real time; the penalty waits on the Clock, which
        # is moved only to the next call due on it.
        while not d.called:
            calls = clock.getDelayedCalls()
            if calls:
                clock.advance(min(c.getTime() for c in calls) - clock.seconds())
            else:
                yield self._tick()
        self.assertEqual((yield d)[0], "alice")
        self.assertEqual(clock.seconds(), NOW + 2)

    def _tick(self):
        return deferLater(reactor, 0.01, lambda: None)
