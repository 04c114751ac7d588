"""
``proxy.store._redissessions.SessionBoard`` and the session bus's one-session
end, against a real redis-server: what one instance publishes the others
read, a new round replaces the last, an instance whose entry expired (it
died) is no longer listed, and ``publish(session=ID)`` reaches the owner.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from proxy.store import SessionBoard, SessionBus
from tests.test_rediscoord import until
from tests.test_store_redis import RedisHarness, setUpModule, tearDownModule

__all__ = ["setUpModule", "tearDownModule"]

INDEX = "imapproxy:sessions:instances"


def view(sid: str, account: str = "alice") -> dict:
    return {"id": sid, "account": account, "protocol": "imap"}


class BoardTests(RedisHarness, TestCase):
    @inlineCallbacks
    def boards(self) -> Deferred[tuple[SessionBoard, SessionBoard]]:
        store = yield self.openStore()
        return SessionBoard(store, "x" * 16, 5.0), SessionBoard(store, "y" * 16, 5.0)

    @inlineCallbacks
    def test_othersSeeWhatWasPublished(self):
        """Y reads X's sessions (marked with X's id), never its own."""
        x, y = yield self.boards()
        yield x.publish([view("s1"), view("s2", "bob")])
        yield y.publish([view("s3")])
        seen = yield ensureDeferred(y.others())
        self.assertEqual(
            sorted((v["id"], v["instance"]) for v in seen), [("s1", "x" * 16), ("s2", "x" * 16)]
        )
        self.assertEqual([v["id"] for v in (yield ensureDeferred(x.others()))], ["s3"])

    @inlineCallbacks
    def test_aRoundReplacesTheLast(self):
        x, y = yield self.boards()
        yield x.publish([view("s1"), view("s2")])
        yield x.publish([view("s2")])
        self.assertEqual([v["id"] for v in (yield ensureDeferred(y.others()))], ["s2"])
        yield x.publish([])
        self.assertEqual((yield ensureDeferred(y.others())), [])

    @inlineCallbacks
    def test_aDeadInstanceIsNoLongerListed(self):
        """Entries carry a TTL (three rounds); once X's has passed, X is not listed."""
        x, y = yield self.boards()
        yield x.publish([view("s1")])
        ttl = int(self.server.command("PTTL", "imapproxy:sessions:live:" + "x" * 16))
        self.assertTrue(10_000 < ttl <= 15_000, ttl)
        # X's time runs out, as when it stops publishing: a score in the past.
        self.server.command("ZADD", INDEX, "1000", "x" * 16)
        self.assertEqual((yield ensureDeferred(y.others())), [])


class BusEndTests(RedisHarness, TestCase):
    @inlineCallbacks
    def test_oneSessionEndedOnItsOwner(self):
        """``publish(session=)`` asks the others to end one session; nothing is closed."""
        buses, ended, closed = [], [], []
        for _ in range(2):
            store = yield self.openStore()
            bus = SessionBus(
                store, lambda a, t: closed.append((a, t)) or 0, reactor, 0.5, end=ended.append
            )
            bus.startService()
            self.addCleanup(bus.stopService)
            buses.append(bus)
        yield until(lambda: all(b._subscribed for b in buses))
        yield buses[0].publish(session="ab" * 12)
        yield until(lambda: ended)
        self.assertEqual((ended, closed), (["ab" * 12], []))
