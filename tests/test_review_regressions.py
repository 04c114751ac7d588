"""
Regression tests for bugs a review found in the relay, spare connections,
close requests and store copy (each docstring says what was wrong; every
test failed before its fix).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile

from cryptography.fernet import Fernet
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy import cli
from proxy.admin import Admin
from proxy.encryption import Secrets
from proxy.store import SQLiteStore, makeStore
from proxy.store.copy import copyStore
from proxy.tokens import newToken
from proxy.upstream import WarmUpstreams
from tests.test_oauth import account
from tests.test_store import account as storedAccount
from tests.test_store import token as storedToken
from tests.test_upstream import _Driver


class WarmStopWhileConnectingTests(_Driver):
    def test_aSpareFinishedAfterStopIsClosed(self):
        """
        proxy/warm.py _warm: a warm-up that completes after ``stop()`` (or for
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


class SpareLongLineTests(_Driver):
    def test_aTooLongLineWhileSpareClosesIt(self):
        """
        proxy/upstream.py: in state "spare" the LineReceiver still enforces
        MAX_LENGTH; ``lineLengthExceeded`` -> ``_fail`` (which does not
        exclude "spare") -> ``self.ready.errback`` on a Deferred that already
        fired.

        Expected: the spare is dropped quietly (connection closed, pool told
        through its onLost callback).
        Actual: AlreadyCalledError escapes dataReceived (in the reactor: the
        connection is torn down with an unhandled error), and since the state
        is then "failed", connectionLost never calls the pool's onLost, so the
        pool keeps a dead entry until its expiry timer.
        """
        self.connect()
        self.receive(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi", b"U1 OK [CAPABILITY X] ok"
        )
        proto = self.loggedIn()
        lost: list = []
        proto.keepAsSpare(lambda: lost.append(True))
        proto.dataReceived(b"* " + b"x" * (proto.MAX_LENGTH + 10))
        self.assertTrue(self.transport.disconnecting)
        proto.connectionLost()
        self.assertEqual(lost, [True])


class StoreCopyOverwriteTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-review-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    @inlineCallbacks
    def openStore(self, name):
        store = SQLiteStore(
            os.path.join(self.dir, name, "s.sqlite3"), Secrets([Fernet.generate_key()])
        )
        yield store.open()
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_overwriteReplacesTokensWithTheSameIds(self):
        """
        proxy/storecopy.py copyStore(overwrite=True) is documented as
        "replacing records with the same ids", but it calls
        ``target.addToken``, which refuses an existing id (SQLite: UNIQUE
        constraint; Redis: StoreError "a token with this id exists").

        Expected: copying again with --overwrite (e.g. re-running an
        interrupted copy, or refreshing the target) succeeds.
        Actual: it fails on the first token already there, after apps and
        accounts were rewritten, leaving a partial copy.
        """
        source = yield self.openStore("from")
        target = yield self.openStore("to")
        yield source.putAccount(storedAccount("alice"))
        yield source.addToken(storedToken("t1"))
        first = yield Deferred.fromCoroutine(copyStore(source, target))
        self.assertEqual(first.tokens, 1)
        again = yield Deferred.fromCoroutine(copyStore(source, target, overwrite=True))
        self.assertEqual(again.tokens, 1)


class _Store:
    def __init__(self, record):
        self.record = record

    def getToken(self, tid):
        return succeed(self.record if tid == self.record.id else None)

    def removeToken(self, tid):
        return succeed(None)


class _FailingBus:
    def publish(self, account=None, tokenId=None):
        return fail(ConnectionError("redis went away"))


class RevokeDisconnectReportTests(SynchronousTestCase):
    def test_aFailedPublishIsNotReportedAsDone(self):
        """
        proxy/admin.py Admin._close swallows a failed ``bus.publish`` (it only
        logs it) and proxy/cli.py then prints "its sessions closed on every
        instance" and exits 0. The admin command installs no log observer,
        so the logged error is never shown.

        Expected: ``imapproxy tokens revoke --disconnect`` whose close request
        could not be published reports an error (non-zero exit).
        Actual: it claims the sessions were closed everywhere; on the other
        instances they stay open.
        """
        secret, tid = newToken()
        admin = Admin(_Store(storedToken(tid)), bus=_FailingBus())
        args = argparse.Namespace(group="tokens", command="revoke", token=tid, disconnect=True)
        err = io.StringIO()
        old, sys.stderr = sys.stderr, err
        try:
            d = Deferred.fromCoroutine(cli._run(args, admin, io.StringIO()))
            failure = []
            d.addErrback(failure.append)
        finally:
            sys.stderr = old
        self.assertTrue(
            failure or "closed on every instance" not in err.getvalue(),
            f"reported success: {err.getvalue()!r}",
        )


class StoreCopySameStoreTests(SynchronousTestCase):
    def test_twoPrefixesOnOneRedisAreDifferentStores(self):
        """
        proxy/cli.py _openBoth compares ``store.path``, which for Redis is
        ``RedisAddress.describe()``: host, port and db, without the key
        prefix (``?prefix=``) that separates deployments sharing a Redis.

        Expected: copying between two prefixes on one Redis is allowed.
        Actual: refused with "FROM and TO are the same store".
        """
        keyfile = os.path.join(tempfile.mkdtemp(prefix="imapproxy-review-"), "k")
        self.addCleanup(shutil.rmtree, os.path.dirname(keyfile), True)
        with open(keyfile, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
        os.chmod(keyfile, 0o600)
        opened = []

        def fakeOpen(url, secretFile):
            store = makeStore(url, keyfile)  # not opened: no server needed
            opened.append(store)
            return store

        self.patch(cli, "_open", fakeOpen)
        args = argparse.Namespace(
            source="redis://127.0.0.1:6379/0?prefix=old:",
            target="redis://127.0.0.1:6379/0?prefix=new:",
            from_secret_file=keyfile,
            to_secret_file=keyfile,
        )
        try:
            cli._openBoth(args, "sqlite:///nowhere", None)
        except SystemExit as e:
            self.fail(f"two prefixes refused as one store: {e}")


class SpareAfterAccountCloseTests(SynchronousTestCase):
    def test_aWarmUpUnderWayWhenTheAccountIsRemovedMakesNoSpare(self):
        """
        proxy/imap.py SessionRegistry.close(account) -> WarmUpstreams.discard
        only drops a spare that exists; a warm-up still connecting (in
        ``_warming``) is not cancelled or marked, so when it completes the
        removed account gets a fresh logged-in spare (to its mailbox, with
        its old grant) that lives for ``keep`` seconds, and is handed out if
        the account id is re-created with the same settings within that time.

        Expected: after the account's sessions are closed (account removed),
        no spare for it exists. Actual: one is kept.
        """
        from proxy.imap import SessionRegistry
        from tests.test_warm import FakeUpstream

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
        registry.close(account=acct.id)  # accounts remove (here or via the bus)
        proto = FakeUpstream()
        pending[0].callback(proto)
        try:
            self.assertEqual(len(warm), 0, "the removed account got a spare")
        finally:
            warm.stop()
