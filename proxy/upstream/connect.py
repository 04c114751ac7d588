"""
Connecting to a provider's IMAP server within a time bound: the address it
last answered on (no name lookup per login), implicit TLS or STARTTLS with
the account's TLS options, and the login.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import CertificateRejected, ProxyError, Unavailable
from ..model import Upstream
from .auth import XOAUTH2Authenticator
from .imap import UpstreamProtocol
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


async def connectUpstream(
    reactor: Any,
    upstream: Upstream,
    user: str,
    accessToken: str,
    timeout: float,
    tlsCache: TLSOptionsCache | None = None,
    addresses: AddressCache | None = None,
) -> UpstreamProtocol:
    """
    Connect and log in within ``timeout`` seconds.

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
    proto = UpstreamProtocol(
        XOAUTH2Authenticator(user.encode("utf-8")),
        accessToken.encode("utf-8"),
        upstream.tls,
        tls,
        server=f"{upstream.host}:{upstream.port}",
    )
    factory = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    connecting = endpoint.connect(factory)
    finished: Deferred[UpstreamProtocol] = Deferred()

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
        if isinstance(result, UpstreamProtocol):
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
    return await connectUpstream(reactor, upstream, user, accessToken, timeout, tlsCache, addresses)
