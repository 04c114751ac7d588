"""
Connecting to a provider's IMAP or SMTP server within a time bound: the
address it last answered on (no name lookup per login), implicit TLS or
STARTTLS with the account's TLS options (a refused certificate reported as
such), and the login. ``connectWith`` is that, for any login protocol;
``connectUpstream`` (IMAP), ``connectSMTP`` and ``probeSMTP`` name the
protocol, and ``UpstreamConnector`` binds them to one reactor, time bound,
address cache and TLS cache for the realm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import CertificateRejected, ProxyError, Unavailable
from ..model import Upstream
from .auth import XOAUTH2Authenticator
from .imap import UpstreamProtocol
from .smtp import SMTPUpstreamProtocol
from .smtpreplies import DEFAULT_EHLO_NAME
from .tls import TLSOptionsCache
from .verify import ReportingTLSOptions

log = Logger(namespace="proxy.upstream")


class AddressCache:
    """
    The address each provider host:port last answered on, kept for a
    while: a login then connects without a name lookup (a trip through the
    thread pool). An address that fails to connect is forgotten, so the next
    login looks the name up again.
    """

    def __init__(self, clock: Any, ttl: float = 60.0, size: int = 4096):
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._entries: dict[tuple[str, int], tuple[float, str]] = {}

    def get(self, host: str, port: int) -> str | None:
        entry = self._entries.get((host, port))
        if entry is None or self._clock.seconds() > entry[0]:
            return None
        return entry[1]

    def remember(self, host: str, port: int, address: str) -> None:
        if address == host:
            return  # an address already
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[(host, port)] = (self._clock.seconds() + self._ttl, address)

    def forget(self, host: str, port: int) -> None:
        self._entries.pop((host, port), None)


# Makes the login protocol of one attempt from its TLS options (None
# without TLS) and its server's ``host:port``. It has ``ready`` (fires with
# itself once logged in, or with a ``ProxyError``) and ``transport``.
ProtocolMaker = Callable[[Any, str], Any]


async def connectUpstream(
    reactor: Any,
    upstream: Upstream,
    user: str,
    accessToken: str,
    timeout: float,
    tlsCache: TLSOptionsCache | None = None,
    addresses: AddressCache | None = None,
) -> UpstreamProtocol:
    """Connect to an IMAP server and log in: ``connectWith`` an ``UpstreamProtocol``."""

    def imap(tls: Any, server: str) -> UpstreamProtocol:
        return UpstreamProtocol(
            XOAUTH2Authenticator(user.encode("utf-8")),
            accessToken.encode("utf-8"),
            upstream.tls,
            tls,
            server=server,
        )

    return await connectWith(reactor, upstream, timeout, imap, tlsCache, addresses)  # type: ignore[no-any-return]


async def connectSMTP(
    reactor: Any,
    upstream: Upstream,
    user: str,
    accessToken: str,
    timeout: float,
    ehloName: str = DEFAULT_EHLO_NAME,
    tlsCache: TLSOptionsCache | None = None,
    addresses: AddressCache | None = None,
) -> SMTPUpstreamProtocol:
    """Connect to an SMTP submission server and log in (an ``SMTPUpstreamProtocol``)."""

    def smtp(tls: Any, server: str) -> SMTPUpstreamProtocol:
        return SMTPUpstreamProtocol(
            XOAUTH2Authenticator(user.encode("utf-8")),
            accessToken.encode("utf-8"),
            upstream.tls,
            tls,
            server=server,
            ehloName=ehloName,
        )

    return await connectWith(reactor, upstream, timeout, smtp, tlsCache, addresses)  # type: ignore[no-any-return]


async def probeSMTP(
    reactor: Any,
    upstream: Upstream,
    timeout: float,
    tlsCache: TLSOptionsCache | None = None,
    addresses: AddressCache | None = None,
) -> list[bytes]:
    """
    What an SMTP submission server offers, without logging in: greeting,
    EHLO (and STARTTLS, EHLO again), QUIT.

    :return: its EHLO keywords with their parameters (``b"SIZE 35882577"``),
        as offered over TLS when there is TLS.
    :raises ProxyError: as ``connectWith``.
    """

    def probe(tls: Any, server: str) -> SMTPUpstreamProtocol:
        return SMTPUpstreamProtocol(None, b"", upstream.tls, tls, server=server)

    proto = await connectWith(reactor, upstream, timeout, probe, tlsCache, addresses)
    extensions = list(proto.extensions)
    proto.quit()
    # The server closes after its reply to QUIT; one that does not is cut.
    cut = reactor.callLater(timeout, proto.transport.abortConnection)
    proto.notifyClosed().addCallback(lambda _: cut.cancel() if cut.active() else None)
    return extensions


async def connectWith(
    reactor: Any,
    upstream: Upstream,
    timeout: float,
    makeProtocol: ProtocolMaker,
    tlsCache: TLSOptionsCache | None = None,
    addresses: AddressCache | None = None,
) -> Any:
    """
    Connect and log in within ``timeout`` seconds.

    :param makeProtocol: the login protocol, made afresh for each attempt.
    :raises ProxyError: ``Unavailable`` for anything that is not a refusal of
        the token, ``UpstreamRejectedToken`` when the provider refused it,
        ``CertificateRejected`` when its certificate failed verification
        (not retried: the same certificate would be refused again).
    """
    if tlsCache is None:
        tlsCache = TLSOptionsCache(reactor)
    tls = await tlsCache.get(upstream) if upstream.tls != "plain" else None
    known = addresses.get(upstream.host, upstream.port) if addresses is not None else None
    endpoint: Any
    if known is None:
        endpoint = endpoints.HostnameEndpoint(
            reactor, upstream.host, upstream.port, timeout=timeout
        )
    elif ":" in known:
        endpoint = endpoints.TCP6ClientEndpoint(reactor, known, upstream.port, timeout=timeout)
    else:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, known, upstream.port, timeout=timeout)
    if tls is not None:
        # This connection's own options: a refused certificate is reported
        # as CertificateRejected, naming this server.
        tls = ReportingTLSOptions(tls, upstream.host, upstream.port)
    if upstream.tls == "implicit":
        assert tls is not None
        endpoint = endpoints.wrapClientTLS(tls, endpoint)
    proto = makeProtocol(tls, f"{upstream.host}:{upstream.port}")
    factory = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    connecting = endpoint.connect(factory)
    finished: Deferred[Any] = Deferred()

    def timedOut() -> None:
        # Decided first: cancelling the attempt must not read as "unreachable".
        if not finished.called:
            finished.errback(Unavailable("upstream-timeout"))
        connecting.cancel()
        if proto.transport is not None:
            proto.transport.abortConnection()

    timer = reactor.callLater(timeout, timedOut)

    def connected(_: Any) -> None:
        proto.ready.addBoth(done)

    def connectFailed(failure: Any) -> None:
        if addresses is not None:
            addresses.forget(upstream.host, upstream.port)
        if timer.active():
            timer.cancel()
        if not finished.called:
            if failure.check(ProxyError):
                finished.errback(failure)
            else:
                finished.errback(Unavailable("upstream-unreachable"))

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if finished.called:
            # Timed out meanwhile: a late success must not leak a connection.
            if result is proto:
                proto.transport.abortConnection()
            return
        if isinstance(result, Failure) and result.check(CertificateRejected):
            tlsCache.forget(upstream)
        if result is proto:
            if addresses is not None:
                peer = getattr(proto.transport.getPeer(), "host", None)
                if peer:
                    addresses.remember(upstream.host, upstream.port, peer)
            finished.callback(result)
        else:
            finished.errback(result)

    connecting.addCallbacks(connected, connectFailed)
    connecting.addErrback(lambda f: log.failure("upstream connect handling failed", f))
    try:
        return await finished
    except Unavailable as e:
        if known is None or e.reason != "upstream-unreachable":
            raise
    # The remembered address is gone (forgotten above): look the name up.
    return await connectWith(reactor, upstream, timeout, makeProtocol, tlsCache, addresses)


class UpstreamConnector:
    """
    The realm's way to the providers, IMAP and SMTP alike, sharing one time
    bound, one address cache and one TLS options cache (and so the TLS
    sessions they resume): called, it logs in to an IMAP server.

    :param reactor: connects and tells time.
    :param timeout: seconds a connection and its login may take.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        tlsCache: TLSOptionsCache | None = None,
        addresses: AddressCache | None = None,
    ):
        self._reactor = reactor
        self.timeout = timeout
        self.tlsCache = tlsCache if tlsCache is not None else TLSOptionsCache(reactor)
        self.addresses = addresses if addresses is not None else AddressCache(reactor)

    def __call__(
        self, upstream: Upstream, user: str, accessToken: str
    ) -> Deferred[UpstreamProtocol]:
        return ensureDeferred(
            connectUpstream(
                self._reactor,
                upstream,
                user,
                accessToken,
                self.timeout,
                self.tlsCache,
                self.addresses,
            )
        )

    def smtp(
        self, upstream: Upstream, user: str, accessToken: str, ehloName: str = DEFAULT_EHLO_NAME
    ) -> Deferred[SMTPUpstreamProtocol]:
        """A logged-in SMTP connection (``connectSMTP``)."""
        return ensureDeferred(
            connectSMTP(
                self._reactor,
                upstream,
                user,
                accessToken,
                self.timeout,
                ehloName,
                self.tlsCache,
                self.addresses,
            )
        )

    def probeSMTP(self, upstream: Upstream) -> Deferred[list[bytes]]:
        """What an SMTP server offers (``probeSMTP``)."""
        return ensureDeferred(
            probeSMTP(self._reactor, upstream, self.timeout, self.tlsCache, self.addresses)
        )
