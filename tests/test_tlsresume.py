"""
Tests for ``ResumingTLSOptions``: an upstream connection resumes the TLS
session of an earlier, fully verified one, and a server that was not
verified never gets that far. Both ends are real OpenSSL, over Twisted's
in-memory transports (``iosim``). Under both relay paths: resumption
works with Twisted's and pyOpenSSL's public interfaces alone.
"""

from __future__ import annotations

import os
import tempfile

from OpenSSL._util import lib  # only to check the handshake; the proxy never uses it
from twisted.internet import ssl, task
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from proxy.upstream import ResumingTLSOptions
from proxy.upstream.verify import ReportingTLSOptions
from tests.relaypaths import useRelay
from tests.upstream.certs import make_pki


class Greeter(Protocol):
    def connectionMade(self):
        self.transport.write(b"* OK hello\r\n")


class Reader(Protocol):
    def __init__(self):
        self.data = b""
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


def reused(tls) -> int:
    return lib.SSL_session_reused(tls.getHandle()._ssl)  # type: ignore[no-any-return]


class ResumptionTests(SynchronousTestCase):
    relay = "fast"

    def setUp(self):
        useRelay(self, self.relay)
        # Every connection a test makes, held until the test ends. OpenSSL
        # marks a session not resumable when a connection that holds it is
        # freed without having sent close_notify (SSL_free, by way of
        # ssl_clear_bad_session), and these connections are never closed.
        # Held, none is freed while the test runs; dropped, the garbage
        # collector's timing would decide whether the kept session resumes.
        self.connections = []
        self.addCleanup(self.connections.clear)

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        cls.pki = make_pki(os.path.join(cls.dir, "pki"))

    def serverOptions(self):
        with open(self.pki.key) as k, open(self.pki.cert) as c:
            cert = ssl.PrivateCertificate.loadPEM(k.read() + c.read())
        # Session tickets, as IMAP servers (Dovecot, Gmail) issue them.
        return ssl.CertificateOptions(
            privateKey=cert.privateKey.original,
            certificate=cert.original,
            enableSessionTickets=True,
        )

    def clientOptions(self, host: str = "localhost") -> ResumingTLSOptions:
        with open(self.pki.ca_cert) as f:
            ca = ssl.Certificate.loadPEM(f.read())
        return ResumingTLSOptions(ssl.optionsForClientTLS(host, trustRoot=ca))

    def connect(self, serverOptions, options):
        """One TLS connection; :return: (client TLS protocol, client reader)."""
        reader = Reader()
        clock = task.Clock()  # small TLS writes are flushed on the next "turn"
        server = TLSMemoryBIOFactory(serverOptions, False, Factory.forProtocol(Greeter), clock)
        client = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: reader), clock)
        c, s, pump = connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None)
        )
        for _ in range(5):
            pump.flush()
            clock.advance(0)
        self.connections.append((c, s, pump))
        return c, reader

    def test_theNextConnectionResumes(self):
        """After remember(), a new connection resumes instead of a full handshake."""
        server, options = self.serverOptions(), self.clientOptions()
        first, reader = self.connect(server, options)
        self.assertEqual(reader.data, b"* OK hello\r\n")
        self.assertEqual(reused(first), 0)
        options.remember(first)
        second, reader = self.connect(server, options)
        self.assertEqual(reader.data, b"* OK hello\r\n")
        self.assertEqual(reused(second), 1)

    def test_withoutASessionEveryHandshakeIsFull(self):
        """Nothing remembered: a full handshake, as Twisted's own options do."""
        server, options = self.serverOptions(), self.clientOptions()
        first, _ = self.connect(server, options)
        second, _ = self.connect(server, options)
        self.assertEqual(reused(second), 0)

    def test_theWrongHostIsStillRefused(self):
        """Host name verification is Twisted's, unchanged: a mismatch fails the handshake."""
        server, options = self.serverOptions(), self.clientOptions("imap.example.org")
        _c, reader = self.connect(server, options)
        self.assertEqual(reader.data, b"")
        self.assertIsNotNone(reader.lost)

    def test_resumptionGoesOnConnectionAfterConnection(self):
        """The session kept from a resumed connection resumes the next one too."""
        server, options = self.serverOptions(), self.clientOptions()
        first, _ = self.connect(server, options)
        options.remember(first)
        for _ in range(3):
            later, reader = self.connect(server, options)
            self.assertEqual(reader.data, b"* OK hello\r\n")
            self.assertEqual(reused(later), 1)
            options.remember(later)

    def test_aConnectionFreedWithoutCloseNotifyCostsOneFullHandshake(self):
        """
        When the connection holding the kept session ends without
        close_notify (a provider that drops it, an abort) and is freed,
        OpenSSL no longer resumes that session: the next connection makes a
        full handshake, its session is kept, and the one after resumes.
        """
        import gc

        server, options = self.serverOptions(), self.clientOptions()
        for n in range(2):
            tls, reader = self.connect(server, options)
            self.assertEqual(reused(tls), 0 if n == 0 else 1)
            options.remember(tls)
        del tls, reader
        self.connections.clear()
        gc.collect()
        for expected in (0, 1):  # a full handshake, then resumption again
            tls, reader = self.connect(server, options)
            self.assertEqual(reader.data, b"* OK hello\r\n")
            self.assertEqual(reused(tls), expected)
            options.remember(tls)

    @staticmethod
    def recording(check, calls, n):
        """``check``, noting ``n`` in ``calls`` each time it runs."""

        def recorded(certificate):
            calls.append(n)
            return check(certificate)

        return recorded

    def test_resumesThroughEachConnectionsReportingOptions(self):
        """
        As a login connects: each connection gets its own
        ``ReportingTLSOptions`` (its verify callback) around the shared
        options, and ``remember`` goes through it. The second and later
        connections still resume, and a resumed handshake skips the
        certificate check (the chain was verified when the session was made).
        """
        server, shared = self.serverOptions(), self.clientOptions()
        checked = []
        for n in range(3):
            options = ReportingTLSOptions(shared, "localhost", 993)
            options._checkName = self.recording(options._checkName, checked, n)
            tls, reader = self.connect(server, options)
            self.assertEqual(reader.data, b"* OK hello\r\n")
            self.assertEqual(reused(tls), 0 if n == 0 else 1)
            options.remember(tls)
        self.assertEqual(checked, [0])

    def test_theVerifyCallbackIsLetGoAtTheEndOfTheLogin(self):
        """
        ``remember`` (the end of a login) lets go of the connection's verify
        callback, and the connection keeps its verify mode.
        """
        import gc
        import weakref

        from OpenSSL import SSL

        options = ReportingTLSOptions(self.clientOptions(), "localhost", 993)
        made = []
        callback = options._callback

        def recording(tlsProtocol):
            verify = callback(tlsProtocol)
            made.append(weakref.ref(verify))
            return verify

        options._callback = recording
        tls, reader = self.connect(self.serverOptions(), options)
        self.assertEqual(reader.data, b"* OK hello\r\n")
        gc.collect()
        self.assertIsNotNone(made[0]())
        options.remember(tls)
        gc.collect()
        self.assertIsNone(made[0]())
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.assertEqual(tls.getHandle().get_verify_mode(), mode)

    def test_aPlainConnectionIsIgnored(self):
        """remember() on a transport without TLS keeps nothing."""
        options = self.clientOptions()
        options.remember(Reader())
        self.assertIsNone(options.session)


class PlainRelayResumptionTests(ResumptionTests):
    """The same, with ``relay = plain``: no private name is used."""

    relay = "plain"
