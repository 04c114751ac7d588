"""A throw-away PKI for tests: one self-signed CA and one leaf certificate.

The leaf is valid for ``localhost``, ``127.0.0.1`` and ``::1``; servers under
test (the fake provider, Dovecot) present it and clients trust ``ca_cert``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["PKI", "make_pki"]

_VALIDITY = datetime.timedelta(days=3)
# Tolerate a little clock skew between writing and using the certificates.
_BACKDATE = datetime.timedelta(hours=1)


@attrs.frozen
class PKI:
    """Paths to PEM files: the CA certificate, the leaf certificate, its key."""

    ca_cert: str
    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imapproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask


def make_pki(directory: str, extra_ips: tuple[str, ...] = ()) -> PKI:
    """Create ``ca.pem``, ``cert.pem`` and ``key.pem`` (EC P-256) in *directory*.

    *extra_ips*: more addresses the leaf names (the SMTP submission fixture's
    own PKI names 127.0.0.2, an address the shared one must not name).

    Certificates are mode 0644, the private key 0600.
    """
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - _BACKDATE, now + _VALIDITY

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("imapproxy test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    x509.IPAddress(ipaddress.IPv6Address("::1")),
                    *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = PKI(
        ca_cert=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, "cert.pem"),
        key=os.path.join(directory, "key.pem"),
    )
    pem = serialization.Encoding.PEM
    _write(pki.ca_cert, ca_cert.public_bytes(pem), 0o644)
    _write(pki.cert, leaf_cert.public_bytes(pem), 0o644)
    _write(
        pki.key,
        leaf_key.private_bytes(
            pem,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    return pki
