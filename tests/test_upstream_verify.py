"""
Adversarial certificates against the upstream's TLS verification, over real
TLS on loopback: each must end in ``CertificateRejected`` after one attempt,
implicit TLS and STARTTLS alike, never in a logged-in connection. The
verify callback of ``ReportingTLSOptions`` replaces the context's for each
connection; these check that OpenSSL's chain verdict and the host-name
check still decide.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.trial.unittest import TestCase

from proxy.errors import CertificateRejected
from proxy.model import Upstream
from proxy.upstream import AddressCache, TLSOptionsCache, connectUpstream
from tests.test_upstream import TOKEN, ensuringDeferred, serveLoopback

NOW = datetime.datetime.now(datetime.UTC)


@attrs.frozen
class Issued:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def issue(
    cn: str,
    issuer: Issued | None,
    ca: bool,
    sans: tuple[str, ...] = (),
) -> Issued:
    """A certificate for ``cn``, signed by ``issuer`` (None: self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.name if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=3))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    signer = issuer.key if issuer else key
    return Issued(name, key, b.sign(signer, hashes.SHA256()))


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serverOptions(
    leaf: Issued, chain: tuple[Issued, ...] = (), tickets: bool = False
) -> ssl.CertificateOptions:
    keyPEM = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ssl.CertificateOptions(
        privateKey=ssl.KeyPair.load(keyPEM, crypto.FILETYPE_PEM).original,
        certificate=ssl.Certificate.loadPEM(pem(leaf.cert)).original,
        extraCertChain=[ssl.Certificate.loadPEM(pem(c.cert)).original for c in chain],
        enableSessionTickets=tickets,
    )


class AdversarialCertificateTests(TestCase):
    """Every bad chain or name is refused, after one attempt, before any login."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp()
        cls.root = issue("trusted root", None, ca=True)
        cls.caFile = os.path.join(cls.dir, "ca.pem")
        with open(cls.caFile, "wb") as f:
            f.write(pem(cls.root.cert))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def serve(self, options, starttls: bool) -> int:
        return serveLoopback(self, options, starttls)

    async def login(self, host: str, port: int, tls: str, tlsCache=None):
        from twisted.internet import reactor

        addresses = AddressCache(reactor)
        addresses.remember(host, port, "127.0.0.1")
        return await connectUpstream(
            reactor,
            Upstream(host=host, port=port, tls=tls, caFile=self.caFile),
            "alice@example.com",
            TOKEN.decode(),
            10.0,
            tlsCache=tlsCache,
            addresses=addresses,
        )

    async def refusedEitherWay(self, options, host: str = "imap.example.com") -> list[str]:
        """The login's refusal reasons, over implicit TLS then STARTTLS."""
        reasons = []
        for starttls in (False, True):
            port = self.serve(options, starttls)
            try:
                proto = await self.login(host, port, "starttls" if starttls else "implicit")
            except CertificateRejected as e:
                reasons.append(e.reason)
            else:
                proto.transport.abortConnection()
                reasons.append("logged in")
            self.assertEqual(self.servers.connections, 1, "not retried")
            await self.servers.allClosed()
        return reasons

    @ensuringDeferred
    async def test_theControlLogsIn(self):
        """A leaf from the trusted root for the right name logs in, both ways."""
        leaf = issue("imap.example.com", self.root, ca=False, sans=("imap.example.com",))
        for starttls in (False, True):
            port = self.serve(serverOptions(leaf), starttls)
            proto = await self.login(
                "imap.example.com", port, "starttls" if starttls else "implicit"
            )
            self.assertEqual(list(proto.capabilities), [b"IMAP4rev1", b"IDLE"])
            proto.transport.abortConnection()
            await self.servers.allClosed()

    @ensuringDeferred
    async def test_aNameFoundValidIsKeptForItsHostOnly(self):
        """
        A certificate found valid for a host is not checked again for that
        host (the check is kept by certificate and host: a login's full
        handshake sees the same certificate each time), and the same
        certificate presented for another host is still refused.
        """
        from proxy.upstream import verify

        leaf = issue("imap.example.com", self.root, ca=False, sans=("imap.example.com",))
        checked = []
        original = verify.verify_certificate_hostname

        def recording(certificate, host):
            checked.append(host)
            return original(certificate, host)

        self.patch(verify, "verify_certificate_hostname", recording)
        for _ in range(2):
            port = self.serve(serverOptions(leaf), starttls=False)
            proto = await self.login("imap.example.com", port, "implicit")
            proto.transport.abortConnection()
            await self.servers.allClosed()
        self.assertEqual(checked, ["imap.example.com"])
        reasons = await self.refusedEitherWay(serverOptions(leaf), host="other.example.com")
        self.assertEqual(reasons, ["certificate-hostname"] * 2)
        # Checked at each attempt: a refusal is never kept.
        self.assertEqual(checked, ["imap.example.com"] + ["other.example.com"] * 2)

    @ensuringDeferred
    async def test_aTrustedCertificateForAnotherName(self):
        """A valid certificate from the trusted root, for another host."""
        leaf = issue("evil.example.net", self.root, ca=False, sans=("evil.example.net",))
        reasons = await self.refusedEitherWay(serverOptions(leaf))
        self.assertEqual(reasons, ["certificate-hostname"] * 2)

    @ensuringDeferred
    async def test_aNameOnlyInTheCommonName(self):
        """The right name as CN but no subjectAltName: not valid for it (RFC 6125)."""
        leaf = issue("imap.example.com", self.root, ca=False)
        reasons = await self.refusedEitherWay(serverOptions(leaf))
        self.assertEqual(reasons, ["certificate-hostname"] * 2)

    @ensuringDeferred
    async def test_aSelfSignedImpostorOfTheRoot(self):
        """A self-signed certificate naming itself as the trusted root."""
        impostor = issue("trusted root", None, ca=True, sans=("imap.example.com",))
        reasons = await self.refusedEitherWay(serverOptions(impostor))
        self.assertEqual(reasons, ["certificate-untrusted"] * 2)

    @ensuringDeferred
    async def test_aSelfSignedLeaf(self):
        """A self-signed certificate for the right name."""
        leaf = issue("imap.example.com", None, ca=False, sans=("imap.example.com",))
        reasons = await self.refusedEitherWay(serverOptions(leaf))
        self.assertEqual(reasons, ["certificate-untrusted"] * 2)

    @ensuringDeferred
    async def test_anUntrustedIntermediate(self):
        """A chain through an intermediate of an untrusted root, sent along."""
        otherRoot = issue("other root", None, ca=True)
        intermediate = issue("other intermediate", otherRoot, ca=True)
        leaf = issue("imap.example.com", intermediate, ca=False, sans=("imap.example.com",))
        reasons = await self.refusedEitherWay(serverOptions(leaf, (intermediate,)))
        self.assertEqual(reasons, ["certificate-untrusted"] * 2)

    @ensuringDeferred
    async def test_aLeafUsedAsAnIntermediate(self):
        """A trusted root's end-entity certificate signing another: not a CA."""
        notACA = issue("evil.example.net", self.root, ca=False, sans=("evil.example.net",))
        leaf = issue("imap.example.com", notACA, ca=False, sans=("imap.example.com",))
        reasons = await self.refusedEitherWay(serverOptions(leaf, (notACA,)))
        self.assertEqual(reasons, ["certificate-untrusted"] * 2)

    @ensuringDeferred
    async def test_aSessionIsNeverResumedWithAnotherHost(self):
        """
        A resumed TLS session skips the certificate, and with it the
        verification: the session kept for one host name must not be offered
        when connecting as another, or a certificate never checked for that
        name would be accepted.
        """
        from twisted.internet import reactor

        leaf = issue("imap.example.com", self.root, ca=False, sans=("imap.example.com",))
        # The server issues session tickets (Twisted's default is not to).
        options = serverOptions(leaf, tickets=True)
        port = self.serve(options, starttls=False)
        tlsCache = TLSOptionsCache(reactor)
        for _ in range(2):
            # The second login resumes the first's session.
            proto = await self.login("imap.example.com", port, "implicit", tlsCache)
            proto.transport.abortConnection()
            await self.servers.allClosed()
        try:
            proto = await self.login("imap.example.net", port, "implicit", tlsCache)
        except CertificateRejected as e:
            self.assertEqual(e.reason, "certificate-hostname")
        else:
            proto.transport.abortConnection()
            await self.servers.allClosed()
            self.fail("logged in to imap.example.net with imap.example.com's session")

    @ensuringDeferred
    async def test_aFixedCAFileIsReadAtTheNextLogin(self):
        """
        After a refusal the operator fixes the account's CA file in place
        (as docs/operations.md advises): the next login reads it, rather
        than keep refusing with the options built from the old one.
        """
        from twisted.internet import reactor

        otherRoot = issue("other root", None, ca=True)
        leaf = issue("imap.example.com", otherRoot, ca=False, sans=("imap.example.com",))
        port = self.serve(serverOptions(leaf), starttls=False)
        caFile = os.path.join(self.dir, "account-ca.pem")
        self.patch(self, "caFile", caFile)
        with open(caFile, "wb") as f:
            f.write(pem(self.root.cert))
        tlsCache = TLSOptionsCache(reactor)
        with self.assertRaises(CertificateRejected):
            await self.login("imap.example.com", port, "implicit", tlsCache)
        await self.servers.allClosed()
        # The same path, now holding the CA that signs the server's certificate.
        with open(caFile, "wb") as f:
            f.write(pem(otherRoot.cert))
        proto = await self.login("imap.example.com", port, "implicit", tlsCache)
        proto.transport.abortConnection()
        await self.servers.allClosed()
