"""
The server's TLS certificate (``tls-certificate``/``tls-key``), reloaded
while running.

Certificates are renewed every 60 to 90 days (ACME). One
:class:`ReloadingCertificate` serves STARTTLS and every ``ssl:`` listener that
names no key of its own; each new TLS connection takes the newest good
certificate, and connections already open keep the context they started with,
so renewing never cuts an IDLE session. A renewed file that does not load
(half written, a key that does not match) keeps the certificate in use and is
logged once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import TimerService
from twisted.internet import endpoints, ssl, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from .endpoints import BACKLOG, HeaderFirstEndpoint
from .pem import splitCertificates

log = Logger()

# Seconds between looks at the certificate and key files.
CERT_RELOAD_INTERVAL = 5.0


class CertificateError(Exception):
    """The certificate or key cannot be read or do not go together."""


def loadCertificate(certPath: str, keyPath: str) -> ssl.CertificateOptions:
    """
    Read a PEM chain (leaf first) and its key; build and check the context.
    Blocking (files, key checks): from a worker thread once the reactor runs.

    :raises CertificateError: naming the file and what is wrong with it.
    """
    try:
        with open(certPath, "rb") as f:
            chain = f.read()
    except OSError as e:
        raise CertificateError(f"cannot read TLS certificate {certPath}: {e.strerror}") from None
    try:
        with open(keyPath, "rb") as f:
            key = f.read()
    except OSError as e:
        raise CertificateError(f"cannot read TLS key {keyPath}: {e.strerror}") from None
    certs = splitCertificates(chain)
    if not certs:
        raise CertificateError(f"TLS certificate {certPath} holds no PEM certificate")
    try:
        leaf = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + key)
        # The intermediates go out with the leaf: clients need them.
        options = ssl.CertificateOptions(
            privateKey=leaf.privateKey.original,
            certificate=leaf.original,
            extraCertChain=[ssl.Certificate.loadPEM(c).original for c in certs[1:]],
        )
        options.getContext()  # fails here, not at a client's handshake
    except Exception as e:  # pyOpenSSL, cryptography and Twisted each raise their own
        raise CertificateError(
            f"TLS certificate {certPath} and key {keyPath} do not load together: {e}"
        ) from None
    return options


def _stamp(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingCertificate:
    """
    A server TLS context factory whose certificate is always the newest good
    one. Usable wherever Twisted takes a context factory (``startTLS``,
    ``SSL4ServerEndpoint``).

    :param options: the certificate loaded at start-up (a bad file must stop
        the start, so the first load is the caller's).
    """

    def __init__(self, certPath: str, keyPath: str, options: ssl.CertificateOptions):
        self.certPath = certPath
        self.keyPath = keyPath
        self._options = options
        self._stamps = (_stamp(certPath), _stamp(keyPath))
        #: Runs a blocking callable off the reactor thread (tests: at once).
        self.runInThread: Callable[..., Deferred[Any]] | None = None

    @classmethod
    def fromFiles(cls, certPath: str, keyPath: str) -> ReloadingCertificate:
        """Load now (blocking: at start-up). :raises CertificateError:"""
        return cls(certPath, keyPath, loadCertificate(certPath, keyPath))

    # -- what TLS connections use ----------------------------------------------

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    # -- reloading ----------------------------------------------------------------

    def changedBlocking(self) -> ssl.CertificateOptions | None:
        """
        Blocking (a worker thread): the new certificate when a file changed
        since the last look and loads, else None.

        :raises CertificateError: a changed file that does not load (only once
            for the same files: the next change tries again).
        """
        stamps = (_stamp(self.certPath), _stamp(self.keyPath))
        if stamps == self._stamps:
            return None
        self._stamps = stamps
        return loadCertificate(self.certPath, self.keyPath)

    def reload(self, reactor: Any, force: bool = False) -> Deferred[bool]:
        """
        Look at the files in a worker thread and swap in a changed certificate.

        :param force: reload even when the files look unchanged (``SIGHUP``).
        :return: a Deferred firing with True when a new certificate is in use;
            it never fails (a bad file is logged and the old one kept).
        """
        if force:
            self._stamps = ((0, 0, 0, 0), (0, 0, 0, 0))
        run = self.runInThread or partial(
            threads.deferToThreadPool, reactor, reactor.getThreadPool()
        )
        d = run(self.changedBlocking)

        def swap(options: ssl.CertificateOptions | None) -> bool:
            if options is None:
                return False
            # One assignment: a handshake sees the old or the new, never a mix.
            self._options = options
            log.info("TLS certificate reloaded from {path}", path=self.certPath)
            return True

        def broken(failure: Any) -> bool:
            failure.trap(CertificateError)
            log.error(
                "TLS certificate not reloaded, keeping the one in use: {error}",
                error=failure.getErrorMessage(),
            )
            return False

        return d.addCallback(swap).addErrback(broken)


def certificateWatch(
    certificate: ReloadingCertificate, reactor: Any, interval: float = CERT_RELOAD_INTERVAL
) -> TimerService:
    """A service that looks at the certificate files every ``interval`` seconds."""
    watch = TimerService(interval, certificate.reload, reactor)
    watch.clock = reactor
    return watch


_SSL = re.compile(r"^(haproxy:)?ssl:")


def usesConfiguredCertificate(description: str) -> bool:
    """An ``ssl:`` (or ``haproxy:ssl:``) endpoint string that names no key of its own."""
    return bool(_SSL.match(description)) and not re.search(
        r"(^|:)(privateKey|certKey)=", description
    )


def _arguments(text: str) -> tuple[list[str], dict[str, str]]:
    # Endpoint-string syntax: ':' separates, '\:' is a colon inside a value.
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in re.split(r"(?<!\\):", text):
        part = part.replace("\\:", ":")
        if "=" in part:
            name, value = part.split("=", 1)
            named[name] = value
        else:
            positional.append(part)
    return positional, named


def configuredCertificateEndpoint(
    reactor: Any, description: str, certificate: ReloadingCertificate
) -> Any:
    """
    ``ssl:PORT[:interface=…][:backlog=…]`` (or ``haproxy:ssl:…``) served with
    the configured, reloading certificate.

    :raises ValueError: for arguments such a listener does not take.
    """
    proxied = description.startswith("haproxy:")
    text = description[len("haproxy:ssl:") :] if proxied else description[len("ssl:") :]
    positional, named = _arguments(text)
    port = named.pop("port", None) or (positional.pop(0) if positional else "")
    interface = named.pop("interface", "")
    backlog = int(named.pop("backlog", BACKLOG))
    if positional or named or not port.isdigit():
        raise ValueError(
            "an ssl: listener without privateKey= takes only a port, interface= and backlog="
        )
    if proxied:
        inner = endpoints.TCP4ServerEndpoint(reactor, int(port), backlog, interface)
        return HeaderFirstEndpoint(inner, reactor, certificate)
    return endpoints.SSL4ServerEndpoint(reactor, int(port), certificate, backlog, interface)
