"""
Tests for ``proxy.relay`` (the splice both front doors share).
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from proxy.relay import eagerWrites

# --- Regression tests moved from test_review_regressions.py (each docstring
# says what was wrong; every test failed before its fix). ---


class _Sink(Protocol):
    pass


class EagerWriteAfterAbortTests(SynchronousTestCase):
    def test_nothingIsSentAfterAbortConnection(self):
        """
        proxy/relay/splice.py eagerWrites: ``tcp.Connection.abortConnection`` does
        not set ``disconnecting`` (it sets ``_aborting`` and cuts the
        connection on the next reactor turn), and the eager ``write`` checks
        ``connected``/``disconnecting``/``_writeDisconnected`` only.

        Expected (Twisted's contract: "Aborts the connection immediately,
        dropping any buffered data"): nothing written after the abort reaches
        the peer. Actual: it is sent on the socket at once. E.g. a client's
        command relayed in the same turn as Splice.close()'s abort of a plain
        upstream (token revoked with disconnect) still reaches the provider;
        a TLS abort's close_notify goes out too.
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        b.setblocking(False)
        reactor = MemoryReactorClock()
        conn = tcp.Connection(a, _Sink(), reactor)
        conn.connected = 1
        eagerWrites(conn)
        self.assertTrue(vars(conn).get("_eager"))

        conn.abortConnection()
        conn.write(b"A1 DELETE INBOX\r\n")
        try:
            got = b.recv(1000)
        except BlockingIOError:
            got = b""
        self.assertEqual(got, b"", "bytes written after abortConnection reached the peer")
