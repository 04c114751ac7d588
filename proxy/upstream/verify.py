"""
Why a provider's certificate was refused. OpenSSL's handshake error says
only "certificate verify failed", and Twisted's host-name check only that
the name did not match; an operator needs to know which server, which
certificate and what was wrong with it. So each upstream connection's TLS
layer gets a verify callback (public pyOpenSSL API) that keeps OpenSSL's
verdict on the chain, checks the host name with ``service_identity`` as
Twisted does, and on a refusal ends the connection with a
``CertificateRejected`` naming the server, the verifier's words, and the
certificate's subject and issuer.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import CertificateRejected

log = Logger(namespace="proxy.upstream")

# OpenSSL's X509_V_ERR_* codes an operator meets, in OpenSSL's own words
# (pyOpenSSL has no public way to turn a code into its text).
X509_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}
# Outside its validity period: the operator looks at dates (or the clock),
# not at the trust store.
VALIDITY_ERRORS = frozenset({9, 10})

# A detail is for a log line and the account's state: bounded and printable
# whatever a server puts in its certificate.
MAX_NAME = 200
# Certificates whose names were found valid for a host, by (host, SHA-256 of
# the certificate): a login's full handshake sees the same certificate as the
# last one, and the name check is the same pure function of the two each
# time. Only the names: OpenSSL judges the chain and the dates at every
# handshake. Emptied when full (a provider has a handful of certificates).
_NAMES_VALID: set[tuple[str, bytes]] = set()
_NAMES_KEPT = 1024


def printable(text: str, limit: int = MAX_NAME) -> str:
    """``text`` with anything but printable ASCII replaced by ``?``, cut to ``limit``."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def describeCertificate(certificate: Any) -> str:
    """``subject …, issuer …`` of a pyOpenSSL ``X509`` (RFC 4514 names)."""
    try:
        c = certificate.to_cryptography()
        return (
            f"subject {printable(c.subject.rfc4514_string())}, "
            f"issuer {printable(c.issuer.rfc4514_string())}"
        )
    except Exception:
        return "certificate unreadable"


def chainRejection(server: str, errno: int, depth: int, certificate: Any) -> CertificateRejected:
    """The error for OpenSSL's refusal of the chain (code ``errno`` at ``depth``)."""
    words = X509_ERRORS.get(errno, f"verify error {errno}")
    reason = "certificate-expired" if errno in VALIDITY_ERRORS else "certificate-untrusted"
    where = "server certificate" if depth == 0 else f"chain depth {depth}"
    return CertificateRejected(
        reason,
        detail=f"{server}: {words} ({where}); {describeCertificate(certificate)}",
    )


def nameRejection(
    server: str, host: str, certificate: Any, error: Exception
) -> CertificateRejected:
    """The error for a certificate that is not valid for ``host``."""
    words = (
        f"certificate is not valid for {printable(host)}"
        if isinstance(error, VerificationError)
        else f"certificate names unusable: {printable(str(error))}"
    )
    described = describeCertificate(certificate) if certificate is not None else ""
    return CertificateRejected(
        "certificate-hostname",
        detail=f"{server}: {words}" + (f"; {described}" if described else ""),
    )


@functools.lru_cache(maxsize=1024)
def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class ReportingTLSOptions:
    """
    TLS client options for one upstream connection: the shared options
    (``inner``, which verify and resume) make the connection, then this sets
    a verify callback that decides as Twisted's does (OpenSSL's verdict on
    the chain, ``service_identity`` on the name) and reports a refusal as
    ``CertificateRejected`` through the TLS layer's ``failVerification``:
    the application protocol's ``connectionLost`` receives it.

    :param inner: the shared ``IOpenSSLClientConnectionCreator`` for the
        server (``tlsOptionsFor``), verifying ``host``.
    :param host: the name (or address) the certificate must be valid for.
    :param port: the server's port, for the report.
    """

    def __init__(self, inner: Any, host: str, port: int):
        self._inner = inner
        self.host = host
        self.port = port
        self._address = _isAddress(host)

    @property
    def server(self) -> str:
        """``host:port`` as a report shows it."""
        return f"{printable(self.host)}:{self.port}"

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._callback(tlsProtocol)
        )
        return connection

    def remember(self, transport: Any) -> None:
        """
        At the end of a login: session resumption is the shared options'
        business (passed on); and the handshake this connection's verify
        callback judged is over, so the callback is let go (with pyOpenSSL's
        helper for it, about 1 KiB a session). OpenSSL goes on verifying any
        later handshake of the connection with the same mode, Twisted its
        host name; only this report's detail is lost.
        """
        remember = getattr(self._inner, "remember", None)
        if remember is not None:
            remember(transport)
        try:
            connection = transport.getHandle()
        except Exception:
            return
        if isinstance(connection, SSL.Connection):
            connection.set_verify(connection.get_verify_mode(), None)

    def _callback(self, tlsProtocol: Any) -> Any:
        reported = False

        def refuse(error: CertificateRejected) -> bool:
            nonlocal reported
            if not reported:
                reported = True
                tlsProtocol.failVerification(Failure(error))
            return False

        def verify(connection: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
            # An exception must not escape into OpenSSL: it would be lost,
            # or re-raised from the handshake where nothing expects it.
            try:
                if not ok:
                    return refuse(chainRejection(self.server, errno, depth, certificate))
                if depth == 0:
                    self._checkName(certificate)
                return True
            except (VerificationError, CertificateError) as e:
                return refuse(nameRejection(self.server, self.host, certificate, e))
            except Exception:
                log.failure("checking the certificate of {server} failed", server=self.server)
                return refuse(
                    CertificateRejected(
                        "certificate-untrusted", detail=f"{self.server}: certificate unreadable"
                    )
                )

        return verify

    def _checkName(self, certificate: Any) -> None:
        # The DER dump is a few calls; pyOpenSSL's digest() formats hex in Python.
        key = (
            self.host,
            hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)).digest(),
        )
        if key in _NAMES_VALID:
            return
        c = certificate.to_cryptography()
        if self._address:
            verify_certificate_ip_address(c, self.host)
        else:
            verify_certificate_hostname(c, self.host)
        if len(_NAMES_VALID) >= _NAMES_KEPT:
            _NAMES_VALID.clear()
        _NAMES_VALID.add(key)


def rejectionFor(reason: Failure, server: str) -> CertificateRejected | None:
    """
    The ``CertificateRejected`` a lost connection's ``reason`` stands for,
    if it is a certificate refusal: ours (``ReportingTLSOptions``), or
    Twisted's own host-name check (``VerificationError``, without the
    certificate's names).
    """
    if reason.check(CertificateRejected):
        return reason.value  # type: ignore[return-value]
    if reason.check(VerificationError):
        return nameRejection(server, server.rsplit(":", 1)[0], None, reason.value)  # type: ignore[arg-type]
    return None
