"""
TLS client options for a provider's server: verified against the system's
CAs or the account's CA file, built in a thread and cached, and resuming the
last TLS session to the same server.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import Unavailable
from ..model import Upstream
from ..pem import splitCertificates
from ..relay import sessionReused

MAX_CA_FILE = 1024 * 1024

log = Logger(namespace="proxy.upstream")

# Whether keeping a TLS session failed once already (said once).
_keepFailed = False


def tlsOptionsFor(host: str, caFile: str | None) -> Any:
    """
    Client TLS options that verify the server's certificate and host name,
    against the system's CAs or the account's CA file. Blocking (file reads,
    loading the system CA store): call from a thread.

    :raises ValueError: the CA file is not a readable regular file of PEM
        certificates of sensible size.
    """
    if caFile:
        try:
            st = os.stat(caFile)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CA_FILE:
                raise ValueError("not a regular file of sensible size")
            with open(caFile, "rb") as f:
                pem = f.read(MAX_CA_FILE)
            certs = [ssl.Certificate.loadPEM(c) for c in splitCertificates(pem)]
        except (OSError, ssl.SSL.Error, crypto.Error) as e:
            raise ValueError(str(e)) from None
        if not certs:
            raise ValueError("no certificate in the CA file")
        trust = ssl.trustRootFromCertificates(certs)
    else:
        trust = ssl.platformTrust()
    # This builds the OpenSSL context (loading the CAs) here, in this thread.
    return ResumingTLSOptions(ssl.optionsForClientTLS(host, trustRoot=trust))


@implementer(IOpenSSLClientConnectionCreator)
class ResumingTLSOptions:
    """
    Client TLS options that resume the last TLS session they saw (TLS 1.3
    session tickets): a login's upstream handshake then skips the key
    exchange and the certificate chain, which are most of its cost. The
    server's certificate was verified, host name included, when the session
    was made; a server that declines resumption gets a full, fully verified
    handshake.
    """

    def __init__(self, inner: Any):
        self._inner = inner
        self.session: Any = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        if self.session is not None:
            try:
                connection.set_session(self.session)
            except SSL.Error:
                self.session = None
        return connection

    def remember(self, transport: Any) -> None:
        """Keep the session of ``transport``'s TLS connection for the next one."""
        try:
            # A TLS transport's handle is its OpenSSL connection (STARTTLS
            # included); a plain one's is its socket.
            connection = transport.getHandle()
        except Exception:
            return
        if not isinstance(connection, SSL.Connection):
            return
        # A resumed connection's session is the one already kept. Without
        # the fast paths that is unknown: keep the newest, which resumes too.
        if not sessionReused(connection):
            self.session = connection.get_session()


def keepSession(options: Any, transport: Any) -> None:
    """
    At the end of a login, keep ``transport``'s TLS session in ``options``
    (when they resume): the server's session tickets, sent after the
    handshake, have arrived by then, and the next connection to the server
    resumes. Only an optimisation: its failure must not keep a login from
    ending (it would hang until the upstream timeout).
    """
    global _keepFailed
    remember = getattr(options, "remember", None)
    if remember is None:
        return
    try:
        remember(transport)
    except Exception:
        if not _keepFailed:
            # Once: it would fail the same way at every login.
            _keepFailed = True
            log.failure("keeping a TLS session for resumption failed")


class TLSOptionsCache:
    """
    TLS client options by (host, CA file), built in a thread and kept for a
    while: building them reads files and the system CA store, which must
    happen neither on the reactor thread nor at every login. Options a
    certificate was refused with are dropped (``forget``).
    """

    def __init__(self, reactor: Any, ttl: float = 3600.0, size: int = 1024):
        self._reactor = reactor
        self._ttl = ttl
        self._size = size
        self._entries: dict[tuple[str, str | None], tuple[float, Any]] = {}
        self._building: dict[tuple[str, str | None], list[Deferred[Any]]] = {}

    async def get(self, upstream: Upstream) -> Any:
        from twisted.internet.threads import deferToThreadPool

        key = (upstream.host, upstream.caFile)
        now = self._reactor.seconds()
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        waiters = self._building.get(key)
        if waiters is None:
            # One build per key however many logins ask at once.
            waiters = self._building[key] = []
            deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), tlsOptionsFor, *key
            ).addBoth(self._built, key, now)
        waiter: Deferred[Any] = Deferred()
        waiters.append(waiter)
        try:
            return await waiter
        except ValueError:
            raise Unavailable("upstream-ca-file") from None

    def forget(self, upstream: Upstream) -> None:
        """
        Drop the options for ``upstream`` (and the session they would
        resume): its certificate was refused with them, and the operator's
        fix (a corrected CA file, new system CAs) must count at the next
        login, not an hour later.
        """
        self._entries.pop((upstream.host, upstream.caFile), None)

    def _built(self, result: Any, key: tuple[str, str | None], now: float) -> None:
        waiters = self._building.pop(key)
        if not isinstance(result, Failure):
            if key not in self._entries and len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (now, result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
