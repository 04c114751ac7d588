"""
The upstream side: connect to the provider's IMAP server, log in with
XOAUTH2 (or OAUTHBEARER), learn its capabilities, and hand the connection to
the splice with nothing consumed past the login.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.mail.interfaces import IClientAuthentication
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import LimitReached, ProxyError, Unavailable, UpstreamRejectedToken
from ..model import Upstream
from ..pem import splitCertificates
from ..relay import sessionReused, tuneSocket

log = Logger()


@implementer(IClientAuthentication)
class XOAUTH2Authenticator:
    """
    Google's XOAUTH2 SASL mechanism. After a refusal the server sends an error
    challenge (base64 JSON); the client must answer it with an empty response.
    """

    def __init__(self, user: bytes):
        self.user = user

    def getName(self) -> bytes:
        return b"XOAUTH2"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if chal:
            return b""
        return b"user=" + self.user + b"\x01auth=Bearer " + secret + b"\x01\x01"


@implementer(IClientAuthentication)
class OAUTHBEARERAuthenticator:
    """RFC 7628 OAUTHBEARER; the error challenge is answered with ``%x01``."""

    def __init__(self, user: bytes):
        self.user = user

    def getName(self) -> bytes:
        return b"OAUTHBEARER"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if chal:
            return b"\x01"
        user = self.user.replace(b"=", b"=3D").replace(b",", b"=2C")
        return b"n,a=" + user + b",\x01auth=Bearer " + secret + b"\x01\x01"


_CODE = re.compile(rb"^\[([A-Za-z0-9-]+)(?: ([^\]]*))?\]")


def responseCode(text: bytes) -> tuple[bytes | None, bytes]:
    """``b"[CODE args] text"`` → ``(b"CODE", b"args")``; no code → ``(None, b"")``."""
    m = _CODE.match(text)
    if m is None:
        return None, b""
    return m.group(1).upper(), m.group(2) or b""


def parseCapabilities(text: bytes) -> list[bytes]:
    return text.split()


def hasCapability(caps: list[bytes], name: bytes) -> bool:
    name = name.upper()
    return any(c.upper() == name for c in caps)


class UpstreamProtocol(LineReceiver):
    """
    Drives the login as a small state machine fed one line at a time; once
    logged in it stops parsing and keeps what it has read (``_buffer``) for the
    splice, which then takes the transport over.

    :ivar ready: fires with this protocol once logged in, or errbacks with a
        ``ProxyError``.
    """

    MAX_LENGTH = 65536
    delimiter = b"\r\n"
    transport: Any

    def __init__(
        self,
        authenticator: Any,
        secret: bytes,
        mode: str,
        tlsOptions: Any = None,
    ):
        self.authenticator = authenticator
        self.secret = secret
        self.mode = mode
        self.tlsOptions = tlsOptions
        self.ready: Deferred[UpstreamProtocol] = Deferred()
        self.capabilities: list[bytes] = []
        self.sink: Callable[[bytes], Any] | None = None
        self.onLost: Callable[[Any], Any] | None = None
        self.bytesReceived = 0
        self._state = "greeting"
        self._tag = 0
        self._tlsStarted = False
        self._sentResponse = False
        self._errorChallenge = False
        # As a spare (logged in, no client yet): what arrived meanwhile.
        self._kept: list[bytes] = []
        self._keptSize = 0
        self._spareLost: Callable[[], Any] | None = None

    # -- plumbing -----------------------------------------------------------

    def _send(self, command: bytes) -> bytes:
        self._tag += 1
        tag = b"U%d" % self._tag
        self.sendLine(tag + b" " + command)
        return tag

    def _fail(self, error: ProxyError) -> None:
        if self._state in ("failed", "ready", "relay"):
            return
        self._state = "failed"
        self.transport.loseConnection()
        self.ready.errback(error)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._state == "spare":
            # Its pool hears of it through connectionLost.
            self.transport.abortConnection()
            return
        self._fail(Unavailable("upstream-protocol"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._state == "spare":
            self._state = "failed"
            if self._spareLost is not None:
                self._spareLost()
            return
        if self._state not in ("ready", "relay"):
            self._fail(Unavailable("upstream-closed"))
        elif self.onLost is not None:
            self.onLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self.sink is not None:
            self.bytesReceived += len(data)
            self.sink(data)
        else:
            LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        try:
            getattr(self, "_line_" + self._state)(line)
        except ProxyError as e:
            self._fail(e)
        except Exception:
            log.failure("unexpected upstream response handling error")
            self._fail(Unavailable("upstream-protocol"))

    def connectionMade(self) -> None:
        tuneSocket(self.transport)

    def _line_failed(self, line: bytes) -> None:
        pass

    def _tagged(self, line: bytes) -> tuple[bytes, bytes, bytes] | None:
        """``U3 OK text`` → ``(b"U3", b"OK", b"text")``; untagged lines → None."""
        if line.startswith((b"* ", b"+")):
            return None
        parts = line.split(b" ", 2)
        if len(parts) < 2:
            raise Unavailable("upstream-protocol")
        return parts[0], parts[1].upper(), parts[2] if len(parts) == 3 else b""

    def _untaggedCapability(self, line: bytes) -> bool:
        if line[:13].upper() == b"* CAPABILITY ":
            self.capabilities = parseCapabilities(line[13:])
            return True
        return False

    # -- states -------------------------------------------------------------

    def _line_greeting(self, line: bytes) -> None:
        upper = line.upper()
        if upper.startswith(b"* OK"):
            code, args = responseCode(line[5:])
            if code == b"CAPABILITY":
                self.capabilities = parseCapabilities(args)
                self._afterCapabilities()
            else:
                self._askCapabilities()
        elif upper.startswith(b"* BYE"):
            raise Unavailable("upstream-bye")
        else:
            # PREAUTH or garbage: not a server we can log in to.
            raise Unavailable("upstream-protocol")

    def _askCapabilities(self) -> None:
        self.capabilities = []
        self._capTag = self._send(b"CAPABILITY")
        self._state = "capability"

    def _line_capability(self, line: bytes) -> None:
        if self._untaggedCapability(line):
            return
        tagged = self._tagged(line)
        if tagged is None:
            return
        if tagged[1] != b"OK":
            raise Unavailable("upstream-capability")
        self._afterCapabilities()

    def _afterCapabilities(self) -> None:
        if self.mode == "starttls" and not self._tlsStarted:
            if not hasCapability(self.capabilities, b"STARTTLS"):
                raise Unavailable("upstream-no-starttls")
            self._send(b"STARTTLS")
            self._state = "starttls"
            return
        self._authenticate()

    def _line_starttls(self, line: bytes) -> None:
        tagged = self._tagged(line)
        if tagged is None:
            return
        if tagged[1] != b"OK":
            raise Unavailable("upstream-starttls")
        # Anything the server sent after its OK and before the handshake is
        # outside TLS: drop it rather than trust it.
        self._buffer = b""
        self.transport.startTLS(self.tlsOptions)
        self._tlsStarted = True
        self._askCapabilities()

    def _authenticate(self) -> None:
        name = self.authenticator.getName()
        if not hasCapability(self.capabilities, b"AUTH=" + name):
            if hasCapability(self.capabilities, b"AUTH=OAUTHBEARER") and name == b"XOAUTH2":
                self.authenticator = OAUTHBEARERAuthenticator(self.authenticator.user)
                name = b"OAUTHBEARER"
            else:
                raise Unavailable("upstream-no-xoauth2")
        saslIR = hasCapability(self.capabilities, b"SASL-IR")
        # Capabilities change with the login; collect them afresh.
        self.capabilities = []
        initial = base64.b64encode(self.authenticator.challengeResponse(self.secret, b""))
        if saslIR:
            self._authTag = self._send(b"AUTHENTICATE " + name + b" " + initial)
            self._sentResponse = True
        else:
            self._authTag = self._send(b"AUTHENTICATE " + name)
            self._initial = initial
        self._state = "auth"

    def _line_auth(self, line: bytes) -> None:
        if line.startswith(b"+"):
            if not self._sentResponse:
                self.sendLine(self._initial)
                self._sentResponse = True
            else:
                # The error challenge: answer as the mechanism says, then the
                # server sends the tagged NO.
                self._errorChallenge = True
                chal = base64.b64decode(line[2:] or b"", validate=False) or b"\x00"
                self.sendLine(
                    base64.b64encode(self.authenticator.challengeResponse(self.secret, chal))
                )
            return
        if self._untaggedCapability(line):
            return
        tagged = self._tagged(line)
        if tagged is None:
            return
        tag, status, text = tagged
        if tag != self._authTag:
            raise Unavailable("upstream-protocol")
        code, args = responseCode(text)
        if status == b"OK":
            if code == b"CAPABILITY":
                self.capabilities = parseCapabilities(args)
            if self.capabilities:
                self._loggedIn()
            else:
                self._send(b"CAPABILITY")
                self._state = "postcaps"
            return
        if code == b"UNAVAILABLE":
            raise Unavailable("upstream-unavailable")
        if code == b"LIMIT":
            raise LimitReached()
        raise UpstreamRejectedToken()

    def _line_postcaps(self, line: bytes) -> None:
        if self._untaggedCapability(line):
            return
        tagged = self._tagged(line)
        if tagged is None:
            return
        if tagged[1] != b"OK" or not self.capabilities:
            raise Unavailable("upstream-capability")
        self._loggedIn()

    def _loggedIn(self) -> None:
        # Logged in: the server's session tickets (sent after the handshake)
        # have arrived; the next connection to this server resumes.
        remember = getattr(self.tlsOptions, "remember", None)
        if remember is not None:
            remember(self.transport)
        self._state = "ready"
        # Stop parsing: what follows belongs to the client's session.
        self.pauseProducing()
        self.ready.callback(self)

    # -- kept as a spare ------------------------------------------------------

    MAX_KEPT = 65536

    def keepAsSpare(self, onLost: Callable[[], Any]) -> None:
        """
        Logged in, waiting for a client: keep reading, so that a close (the
        server's idle logout) is noticed, and keep what arrives for the client.
        """
        self._state = "spare"
        self._spareLost = onLost
        self.resumeProducing()

    def _line_spare(self, line: bytes) -> None:
        self._keptSize += len(line) + 2
        if self._keptSize > self.MAX_KEPT:
            self.transport.abortConnection()
            return
        self._kept.append(line + b"\r\n")

    def claim(self) -> bool:
        """Take a spare for a client; :return: False when it is closing."""
        if self._state != "spare" or getattr(self.transport, "disconnecting", False):
            return False
        self._state = "ready"
        self._spareLost = None
        self.pauseProducing()
        return True

    def discard(self) -> None:
        """Log out a spare nobody took (or one made after it was no longer wanted)."""
        if self._state in ("spare", "ready"):
            self._spareLost = None
            self._state = "failed"
            self._send(b"LOGOUT")
            self.transport.loseConnection()

    # -- the splice takes over ---------------------------------------------

    def takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        """
        From now on every byte read goes to ``sink``; ``onLost`` is called when
        the connection ends.

        :return: the bytes read after the login that were not parsed.
        """
        leftover, self._buffer = b"".join(self._kept) + self._buffer, b""
        self._kept = []
        self.sink = sink
        self.onLost = onLost
        self._state = "relay"
        self.paused = False
        self.setRawMode()
        return leftover

    def rawDataReceived(self, data: bytes) -> None:
        # Only reached in relay mode, through LineReceiver; dataReceived
        # normally bypasses the parser entirely once ``sink`` is set.
        if self.sink is not None:
            self.sink(data)


MAX_CA_FILE = 1024 * 1024


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


class TLSOptionsCache:
    """
    TLS client options by (host, CA file), built in a thread and kept for a
    while: building them reads files and the system CA store, which must
    happen neither on the reactor thread nor at every login.
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
        the token, ``UpstreamRejectedToken`` when the provider refused it.
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
    if upstream.tls == "implicit":
        assert tls is not None
        endpoint = endpoints.wrapClientTLS(tls, endpoint)
    proto = UpstreamProtocol(
        XOAUTH2Authenticator(user.encode("utf-8")),
        accessToken.encode("utf-8"),
        upstream.tls,
        tls,
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
