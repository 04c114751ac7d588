"""
Unit tests for ``redis+sentinel://`` store URLs (``proxy.store._redissentinel``):
what they give, what they refuse, that no secret shows in ``describe()``, and
that ``makeStore`` takes them for Redis stores.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from proxy.encryption import ENV_VAR
from proxy.store import REDIS_SCHEMES, RedisStore, StoreError, makeStore
from proxy.store._redissentinel import DEFAULT_REPLICAS, SentinelLink, isDemoted, sameServer
from proxy.store.redis import RedisAddress, parseRedisURL


class ParseTests(SynchronousTestCase):
    def test_full(self):
        a = parseRedisURL(
            "redis+sentinel://user:p%40ss@s1.example:26380,10.0.0.2,[::1]:5000/mymaster/3"
            "?prefix=px:&replicas=2&sentinel_password=sp&sentinel_username=su"
        )
        self.assertEqual(a.sentinels, (("s1.example", 26380), ("10.0.0.2", 26379), ("::1", 5000)))
        self.assertEqual((a.service, a.db, a.prefix, a.replicas), ("mymaster", 3, "px:", 2))
        self.assertEqual((a.username, a.password), ("user", "p@ss"))
        self.assertEqual((a.sentinelUsername, a.sentinelPassword), ("su", "sp"))
        self.assertIsNone(a.host)
        self.assertIsNone(a.path)

    def test_defaults(self):
        a = parseRedisURL("redis+sentinel://127.0.0.1:26379/svc")
        self.assertEqual(a.sentinels, (("127.0.0.1", 26379),))
        self.assertEqual((a.service, a.db, a.replicas), ("svc", 0, DEFAULT_REPLICAS))
        self.assertEqual(a.prefix, "imapproxy:")
        self.assertIsNone(a.password)
        self.assertIsNone(a.sentinelPassword)

    def test_passwordOnly(self):
        a = parseRedisURL("redis+sentinel://:secret@h1,h2/svc?db=2&replicas=0")
        self.assertEqual((a.username, a.password, a.db, a.replicas), (None, "secret", 2, 0))

    def test_describeHidesSecrets(self):
        a = parseRedisURL("redis+sentinel://u:pw1@h1:1,[::1]:2/svc/4?sentinel_password=pw2")
        self.assertEqual(a.describe(), "redis+sentinel://h1:1,[::1]:2/svc/4")
        self.assertNotIn("pw1", repr(a))
        self.assertNotIn("pw2", repr(a))

    def test_refused(self):
        for url in [
            "redis+sentinel://h1/",  # no service
            "redis+sentinel://h1",
            "redis+sentinel://h1/svc/0/extra",
            "redis+sentinel://h1/svc/x",  # database not a number
            "redis+sentinel://h1/svc/1?db=1",  # twice
            "redis+sentinel://h1:0/svc",
            "redis+sentinel://h1:99999/svc",
            "redis+sentinel://h1:port/svc",
            "redis+sentinel://h1,,h2/svc",  # empty address
            "redis+sentinel://[::1/svc",
            "redis+sentinel://pw@h1/svc",  # a password needs its colon
            "redis+sentinel://h1/svc?password=x",  # the password goes before the @
            "redis+sentinel://h1/svc?replicas=-1",
            "redis+sentinel://h1/svc?replicas=1&replicas=2",
            "redis+sentinel://h1/svc#frag",
            "redis+sentinels://h1/svc",
        ]:
            with self.assertRaises(StoreError, msg=url) as caught:
                parseRedisURL(url)
            self.assertNotIn("Traceback", str(caught.exception))

    def test_otherSchemesUnchanged(self):
        a = parseRedisURL("redis://h:6380/1")
        self.assertEqual((a.host, a.port, a.db, a.sentinels, a.replicas), ("h", 6380, 1, (), 0))


class MakeStoreTests(SynchronousTestCase):
    def test_aRedisStore(self):
        """``makeStore`` builds a Redis store for the scheme; the admin command knows it too."""
        import os

        from cryptography.fernet import Fernet

        self.assertIn("redis+sentinel", REDIS_SCHEMES)
        old = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = Fernet.generate_key().decode()
        try:
            store = makeStore("redis+sentinel://127.0.0.1:1/svc", None)
        finally:
            if old is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = old
        self.assertIsInstance(store, RedisStore)
        self.assertEqual(store.path, "redis+sentinel://127.0.0.1:1/svc/0")


class LinkTests(SynchronousTestCase):
    def test_movedIsCalledWhenTheMasterChanges(self):
        """Only a change of master calls the watchers, not the first answer or the same one."""
        link = SentinelLink(RedisAddress(host=None, sentinels=(("h", 1),), service="s"), None, 1)
        calls: list[int] = []
        link._moved.append(lambda: calls.append(1))
        self.assertEqual(link._found(("10.0.0.1", "6379")), ("10.0.0.1", 6379))
        link._found(("10.0.0.1", 6379))
        self.assertEqual(calls, [])
        link._found(("10.0.0.2", 6379))
        self.assertEqual((calls, link.master), ([1], ("10.0.0.2", 6379)))

    def test_sameServer(self):
        self.assertTrue(sameServer(("127.0.0.1", 6379), ("127.0.0.1", 6379)))
        self.assertTrue(sameServer(("::1", 6379), ("0:0::1", 6379)))
        self.assertFalse(sameServer(("127.0.0.1", 6379), ("127.0.0.1", 6380)))
        self.assertFalse(sameServer(("10.0.0.1", 6379), ("10.0.0.2", 6379)))
        # A host name the sentinels announce: the port alone.
        self.assertTrue(sameServer(("redis-a", 6379), ("10.0.0.2", 6379)))

    def test_readOnly(self):
        import txredisapi

        self.assertTrue(isDemoted(txredisapi.ResponseError("READONLY You can't write")))
        self.assertTrue(isDemoted(txredisapi.ResponseError("NOREPLICAS Not enough")))
        self.assertFalse(isDemoted(txredisapi.ResponseError("ERR no")))
        self.assertFalse(isDemoted("READONLY"))
