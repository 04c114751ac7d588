"""
Tests for ``proxy.certs``: loading the configured certificate, reloading it
for new connections, and ``ssl:`` listeners that name no key of their own.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from OpenSSL import SSL
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy.certs import (
    CertificateError,
    ReloadingCertificate,
    certificateWatch,
    configuredCertificateEndpoint,
    loadCertificate,
    usesConfiguredCertificate,
)
from proxy.endpoints import HeaderFirstEndpoint
from tests.upstream.certs import make_pki


def leafOf(certificate: ReloadingCertificate) -> bytes:
    """The DER of the certificate a new connection would be offered."""
    from cryptography.hazmat.primitives.serialization import Encoding

    local = certificate.serverConnectionForTLS(None).get_certificate()
    assert local is not None
    return local.to_cryptography().public_bytes(Encoding.DER)


def der(path: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)


class CertificateTestCase(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.first = make_pki(os.path.join(self.dir, "first"))
        self.second = make_pki(os.path.join(self.dir, "second"))
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        self.install(self.first)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def install(self, pki, cert: bool = True, key: bool = True) -> None:
        """Put ``pki``'s files in place the way a renewal does: a new file renamed over."""
        for wanted, source, target in ((cert, pki.cert, self.cert), (key, pki.key, self.key)):
            if wanted:
                shutil.copyfile(source, target + ".tmp")
                os.replace(target + ".tmp", target)

    def loaded(self) -> ReloadingCertificate:
        certificate = ReloadingCertificate.fromFiles(self.cert, self.key)
        certificate.runInThread = maybeDeferred
        return certificate

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


class LoadTests(CertificateTestCase):
    def test_missingCertificateNamed(self):
        """A missing certificate file is named in the error."""
        missing = os.path.join(self.dir, "nope.pem")
        e = self.assertRaises(CertificateError, loadCertificate, missing, self.key)
        self.assertEqual(
            str(e), f"cannot read TLS certificate {missing}: No such file or directory"
        )

    def test_keyOfAnotherCertificate(self):
        """A key that does not match the certificate is refused at load, not at a handshake."""
        e = self.assertRaises(CertificateError, loadCertificate, self.cert, self.second.key)
        self.assertIn("do not load together", str(e))

    def test_notPEM(self):
        """A certificate file without a PEM certificate says so."""
        with open(self.cert, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(CertificateError, loadCertificate, self.cert, self.key)
        self.assertIn("holds no PEM certificate", str(e))


class ReloadTests(CertificateTestCase):
    def test_newConnectionsGetRenewedCertificate(self):
        """After the files change, a new connection is offered the new certificate."""
        certificate = self.loaded()
        self.assertEqual(leafOf(certificate), der(self.first.cert))
        self.install(self.second)
        self.assertTrue(self.successResultOf(certificate.reload(None)))
        self.assertEqual(leafOf(certificate), der(self.second.cert))
        self.assertIn(f"TLS certificate reloaded from {self.cert}", self.logged())

    def test_openConnectionKeepsItsContext(self):
        """A connection made before the renewal keeps the context it started with."""
        certificate = self.loaded()
        before = certificate.serverConnectionForTLS(None)
        self.install(self.second)
        self.successResultOf(certificate.reload(None))
        self.assertIsNot(before.get_context(), certificate.getContext())
        self.assertIsInstance(before.get_context(), SSL.Context)

    def test_unchangedFilesNotReloaded(self):
        """Without a change nothing is read again."""
        certificate = self.loaded()
        self.assertFalse(self.successResultOf(certificate.reload(None)))
        self.assertEqual(self.logged(), [])

    def test_halfRenewedKeepsOldCertificate(self):
        """A new certificate whose key is not there yet keeps the old one, logged once."""
        certificate = self.loaded()
        self.install(self.second, key=False)
        self.assertFalse(self.successResultOf(certificate.reload(None)))
        self.assertFalse(self.successResultOf(certificate.reload(None)))
        self.assertEqual(leafOf(certificate), der(self.first.cert))
        errors = [line for line in self.logged() if "not reloaded" in line]
        self.assertEqual(len(errors), 1, errors)
        # The key arrives: the next look takes both.
        self.install(self.second, cert=False)
        self.assertTrue(self.successResultOf(certificate.reload(None)))
        self.assertEqual(leafOf(certificate), der(self.second.cert))

    def test_forcedReload(self):
        """A forced reload (SIGHUP) reads the files even when they look unchanged."""
        certificate = self.loaded()
        self.assertTrue(self.successResultOf(certificate.reload(None, force=True)))

    def test_watchPollsTheFiles(self):
        """The watch service looks every few seconds and picks a renewal up."""
        certificate = self.loaded()
        clock = Clock()
        watch = certificateWatch(certificate, clock, interval=5)
        watch.startService()
        self.install(self.second)
        self.assertEqual(leafOf(certificate), der(self.first.cert))
        clock.advance(5)
        self.assertEqual(leafOf(certificate), der(self.second.cert))
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class EndpointTests(CertificateTestCase):
    def test_which(self):
        """Only ssl: strings without privateKey=/certKey= use the configured certificate."""
        self.assertTrue(usesConfiguredCertificate("ssl:2993"))
        self.assertTrue(usesConfiguredCertificate("haproxy:ssl:993:interface=127.0.0.1"))
        self.assertFalse(usesConfiguredCertificate("ssl:2993:privateKey=k.pem"))
        self.assertFalse(usesConfiguredCertificate("ssl:2993:certKey=c.pem"))
        self.assertFalse(usesConfiguredCertificate("tcp:2143"))

    def test_sslEndpoint(self):
        """ssl:PORT:interface=… listens with the reloading certificate."""
        reactor = MemoryReactorClock()
        certificate = self.loaded()
        endpoint = configuredCertificateEndpoint(
            reactor, "ssl:1993:interface=\\:\\:1:backlog=7", certificate
        )
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        endpoint.listen(Factory())
        [(port, _f, contextFactory, backlog, interface)] = reactor.sslServers
        self.assertEqual((port, backlog, interface), (1993, 7, "::1"))
        self.assertIs(contextFactory, certificate)

    def test_haproxyEndpoint(self):
        """haproxy:ssl:PORT reads the PROXY header in the clear, then TLS with the certificate."""
        reactor = MemoryReactorClock()
        endpoint = configuredCertificateEndpoint(reactor, "haproxy:ssl:993", self.loaded())
        self.assertIsInstance(endpoint, HeaderFirstEndpoint)
        endpoint.listen(Factory())
        self.assertEqual([p for p, *_ in reactor.tcpServers], [993])

    def test_unknownArgument(self):
        """Arguments such a listener does not take are refused."""
        for description in ("ssl:1993:sslmethod=TLSv1", "ssl:port", "ssl:"):
            self.assertRaises(
                ValueError,
                configuredCertificateEndpoint,
                MemoryReactorClock(),
                description,
                self.loaded(),
            )
