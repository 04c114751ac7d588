"""
Tests for ``proxy.startup``: listeners that must all listen, and the record
of the keys a running server uses.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from io import StringIO
from unittest import mock

from cryptography.fernet import Fernet
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy.encryption import Secrets, keyFingerprint, readLoadedMarker
from proxy.startup import KeyWatch, ListeningEndpoint, ProxyService, StartupFailed, freezeStartup


class FailingEndpoint:
    """An endpoint whose port is taken."""

    def listen(self, factory):
        return fail(CannotListenError("127.0.0.1", 2143, OSError(98, "Address already in use")))


class RecordingPort:
    stopped = False

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 1143)

    def stopListening(self):
        self.stopped = True


class RecordingEndpoint:
    """An endpoint that listens at once on a port that records being closed."""

    def __init__(self):
        self.port = RecordingPort()

    def listen(self, factory):
        return succeed(self.port)


class ProxyServiceTests(SynchronousTestCase):
    def test_listenerFailureEndsStart(self):
        """A listener that cannot listen ends the start with one line; the others close."""
        top = ProxyService()
        reactor = MemoryReactorClock()
        endpoint = RecordingEndpoint()
        good = ListeningEndpoint(endpoint, "tcp:1143", "IMAP", reactor)
        top.addListener(good, Factory())
        top.addListener(ListeningEndpoint(FailingEndpoint(), "tcp:8080", "API", reactor), Factory())
        err = StringIO()
        with mock.patch("sys.excepthook"), mock.patch("sys.__stderr__", err):
            e = self.assertRaises(StartupFailed, top.privilegedStartService)
            # Out of twistd, the interpreter shows it as one line.
            sys.excepthook(StartupFailed, e, None)
        self.assertEqual(str(e), "cannot listen on tcp:8080: Address already in use")
        self.assertEqual(err.getvalue(), f"imapproxy: {e}\n")
        self.assertTrue(endpoint.port.stopped)


class KeyWatchTests(SynchronousTestCase):
    """The server's record of the keys it uses, read by 'imapproxy secrets add-key'."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "secret.key")
        self.secrets = Secrets([Fernet.generate_key()], self.path)
        self.changed = False
        self.store = mock.Mock(secrets=self.secrets)
        self.store.reloadSecrets = lambda: succeed(self.changed)

    def watch(self) -> KeyWatch:
        return KeyWatch(self.store, MemoryReactorClock(), pid=4321, runInThread=maybeDeferred)

    def test_recordsKeysInUse(self):
        """After a look at the key file the keys in use are recorded, by fingerprint."""
        watch = self.watch()
        self.successResultOf(watch.check())
        self.assertEqual(
            readLoadedMarker(self.path), (4321, [keyFingerprint(self.secrets.keys[0])])
        )
        # Unchanged keys are not written again.
        os.unlink(self.path + ".loaded")
        self.successResultOf(watch.check())
        self.assertIsNone(readLoadedMarker(self.path))
        # New keys are.
        self.secrets._setKeys([Fernet.generate_key(), *self.secrets.keys])
        self.changed = True
        self.successResultOf(watch.check())
        self.assertEqual(readLoadedMarker(self.path)[1][0], keyFingerprint(self.secrets.keys[0]))

    def test_unwritableRecordWarnsOnce(self):
        """A directory the server cannot write is one warning, and the watch goes on."""
        self.secrets.path = os.path.join(self.dir, "missing", "secret.key")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        watch = self.watch()
        self.successResultOf(watch.check())
        self.successResultOf(watch.check())
        warned = [e for e in events if "cannot record the keys" in formatEvent(e)]
        self.assertEqual(len(warned), 1)


class FreezeStartupTests(SynchronousTestCase):
    """``freezeStartup``: the code's objects leave the collector's full passes."""

    def test_freezesOnceTheReactorRuns(self):
        """Nothing is frozen while the service is built; once running, it is."""
        frozen = []
        reactor = MemoryReactorClock()
        freezeStartup(reactor, lambda: frozen.append(True))
        self.assertEqual(frozen, [])
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
        self.assertEqual(frozen, [True])

    def test_theDefaultIsTheCollectorsFreeze(self):
        """The real run freezes with ``gc.freeze`` (it is not called here)."""
        reactor = MemoryReactorClock()
        freezeStartup(reactor)
        self.assertEqual([hook for hook, _a, _k in reactor.whenRunningHooks], [gc.freeze])
