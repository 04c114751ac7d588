"""
Tests for ``proxy.cli`` (the ``imapproxy`` admin command): what it reports
and which stores it agrees to open.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile

from cryptography.fernet import Fernet
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from proxy import cli
from proxy.admin import Admin
from proxy.store import makeStore
from proxy.tokens import newToken
from tests.test_store import token as storedToken

# --- Regression tests moved from test_review_regressions.py (each docstring
# says what was wrong; every test failed before its fix). ---


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
