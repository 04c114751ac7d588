"""
Relaying a logged-in session: bytes both ways, untouched, in order, with flow
control (each transport is the other's producer), until either side closes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .. import auditlog
from . import _fast, ending
from .boundary import ImapBoundaries, SmtpBoundaries
from .transports import keepDeclarations

_NOTHING_LOST: frozenset[str] = frozenset()
log = Logger(namespace="proxy.relay")


def tuneSocket(transport: Any) -> None:
    """
    TCP_NODELAY (IMAP is small commands and replies: no waiting on Nagle) and
    keepalive (an IDLE session lasts hours; dead peers must show up). TLS and
    PROXY-protocol wrappers pass these through to the socket; other
    transports (UNIX sockets, test transports) simply lack them. Eager
    writes too, when the fast paths are on.
    """
    for name in ("setTcpNoDelay", "setTcpKeepAlive"):
        method = getattr(transport, name, None)
        if method is not None:
            try:
                method(True)
            except (OSError, AttributeError):
                pass
    _fast.eagerWrites(transport)


def _discard(data: bytes) -> None:
    pass


class Splice:
    """
    Glue between the client's ``ProxyServer`` and the logged-in
    ``UpstreamProtocol``.

    :param onEnd: called once, with this splice, when both sides are done.
    :param callLater: ``IReactorTime.callLater``, for the close deadlines.
    :param audit: protocol, account, token_id and client, for the
        ``session-end`` audit event; None: no event.
    :param seconds: ``IReactorTime.seconds``, for the session's duration.
    :param protocol: ``imap`` or ``smtp``: how the streams are framed
        (``boundary``), to know where a last line of the proxy's own fits.
    """

    #: What the client reads when the provider's side is lost between
    #: responses; when lost within one, a partial literal or reply cannot be
    #: completed, and the client's connection is closed without a word.
    PROVIDER_LOST = {
        "imap": b"* BYE [UNAVAILABLE] Connection to the provider lost",
        "smtp": b"421 4.4.2 %s Connection to the provider lost",
    }

    # A side being closed gets this long to take its last bytes (a BYE, the
    # end of a FETCH) before the connection is cut.
    CLOSE_GRACE = 30.0

    # Made when first needed (most sessions never need them): whenClosed's
    # Deferreds, and the deadlines of sides being closed.
    _closedWaiters: list[Deferred[None]] | None = None
    _cuts: dict[str, Any] | None = None

    def __init__(
        self,
        client: Any,
        upstream: Any,
        label: str,
        onEnd: Any = None,
        callLater: Any = None,
        audit: dict[str, Any] | None = None,
        seconds: Any = None,
        *,
        protocol: str = "imap",
    ):
        self.client = client
        self.protocol = protocol
        self.boundaries = SmtpBoundaries() if protocol == "smtp" else ImapBoundaries()
        # closeWhenIdle's line, until it is sent.
        self._lastLine: bytes | None = None
        self._spliced = False
        self.upstream = upstream
        self.label = label
        self._onEnd = onEnd
        self._ended = False
        if callLater is None:
            from twisted.internet import reactor

            callLater = reactor.callLater  # type: ignore[attr-defined]
            seconds = seconds or reactor.seconds  # type: ignore[attr-defined]
        self._callLater = callLater
        self._audit = audit
        self._seconds = seconds
        self._started = seconds() if seconds is not None else 0.0
        # Who ended it: client, provider, operator or shutdown; the first wins.
        self.closedBy: str | None = None
        self._released = False
        # Frozen, starting from one shared empty set: a set per session is 216 bytes.
        self._lost: frozenset[str] = _NOTHING_LOST
        # The provider's last bytes, to tell a goodbye answered from its own close.
        self._tail = b""

    def start(self, held: bytes) -> None:
        """
        :param held: what the client sent behind its login, not yet parsed;
            it goes upstream first, before anything read later.
        """
        try:
            self._start(held)
        except Exception:
            # The client was told OK already: never leave it a dead session.
            log.failure("session {label} could not be spliced", label=self.label)
            # What the client sends now goes nowhere, not to the pre-auth parser.
            self.client.sink = _discard
            self.close()
            # Its loss may never be reported to this splice: no cut to wait for.
            self._sideLost("upstream")

    def _start(self, held: bytes) -> None:
        ct = self.client.transport
        ut = self.upstream.transport
        # The fast paths fall back to Twisted's public path rather than
        # raise: the client has been told OK already.
        # The boundary tracking follows the client's view of both streams:
        # what it gets (inside a subclass's sink, which may hold back or
        # answer for the provider) and what it sends (outside that sink,
        # which may answer a command itself through the client's writer).
        b = self.boundaries
        self._sendToClient = b.toClient(_fast.directWriter(ct))
        self._fromProvider = self.toClientSink(self._sendToClient)
        toClient = self._keepingTail if self._audit is not None else self._fromProvider
        toUpstream = b.toUpstream(self.toUpstreamSink(_fast.directWriter(ut)))
        _fast.batchReads(ut)
        _fast.batchReads(ct)
        leftover = self.upstream.takeOver(toClient, self._upstreamLost)
        self.client.sink = toUpstream
        ct.registerProducer(ut, True)
        ut.registerProducer(ct, True)
        if leftover:
            toClient(leftover)
        if held:
            self.client.bytesReceived += len(held)
            toUpstream(held)
        # The client's transport was paused while the login ran.
        self.client.paused = False
        ct.resumeProducing()
        ut.resumeProducing()
        self._spliced = True
        self._lastLineIfQuiet()
        keepDeclarations(ct)
        keepDeclarations(ut)

    # The relay's steps are bound methods, not closures: a held session is
    # fewer objects.
    def _keepingTail(self, data: bytes) -> Any:
        """The provider's bytes, their end kept (for the audit event's ``closed_by``)."""
        self._tail = ending.joinTail(self._tail, data)
        return self._fromProvider(data)

    def closeWhenIdle(self, line: bytes) -> None:
        """
        End the session with ``line`` (a ``* BYE``, a ``421``) as soon as it
        is quiet (``boundary``): at once when it is, else once what is in
        flight has been relayed. A session that never gets quiet is for the
        caller to ``close`` after its deadline.
        """
        if self._ended:
            return
        self._lastLine = line
        # Looked at after each write, in either direction, until sent.
        self.boundaries.afterWrite = self._lastLineIfQuiet
        if self._spliced:
            self._lastLineIfQuiet()

    def _lastLineIfQuiet(self) -> None:
        line = self._lastLine
        if line is not None and self.boundaries.quiet and not self._ended:
            self._lastLine = None
            self.boundaries.afterWrite = None
            self.closeWith(line, "shutdown")

    def whenClosed(self) -> Deferred[None]:
        """:return: a Deferred fired once both connections are closed."""
        d: Deferred[None] = Deferred()
        if {"client", "upstream"} <= self._lost:
            d.callback(None)
        else:
            waiters = self._closedWaiters
            if waiters is None:
                waiters = self._closedWaiters = []
            waiters.append(d)
        return d

    def toClientSink(self, write: Any) -> Any:
        """
        What the provider's bytes go through on their way to the client's
        ``write``: ``write`` itself here (bytes untouched); a relay that
        reads the stream (a policy, the drain's boundary tracking) wraps it.
        """
        return write

    def toUpstreamSink(self, write: Any) -> Any:
        """What the client's bytes go through on their way to the provider's ``write``."""
        return write

    def _release(self) -> None:
        """
        Undo the producer pairing before closing. A transport with a
        registered producer does not finish a TLS close, and one paused for
        flow control never reads the peer's close: either would keep the
        connection (and its file descriptor) forever.
        """
        if self._released:
            return
        self._released = True
        for t in (self.client.transport, self.upstream.transport):
            try:
                t.unregisterProducer()
            except Exception:
                pass
            try:
                t.resumeProducing()
            except Exception:
                pass

    def _closeSoon(self, side: str, grace: float) -> None:
        """Close one side after its pending bytes are sent, or cut it after ``grace``."""
        cuts = self._cuts
        if (cuts is not None and side in cuts) or side in self._lost:
            return
        transport = self.client.transport if side == "client" else self.upstream.transport
        # Armed before closing: a transport may report the loss at once.
        if cuts is None:
            cuts = self._cuts = {}
        cuts[side] = self._callLater(grace, transport.abortConnection)
        transport.loseConnection()

    def _sideLost(self, side: str) -> None:
        self._lost |= {side}
        cut = self._cuts.pop(side, None) if self._cuts else None
        if cut is not None and cut.active():
            cut.cancel()
        if {"client", "upstream"} <= self._lost:
            waiters, self._closedWaiters = self._closedWaiters, None
            for d in waiters or ():
                d.callback(None)

    def close(self, by: str = "operator") -> None:
        """
        End the session from outside: both sides.

        :param by: ``operator`` (a revocation, an account deleted, a session
            ended through the API) or ``shutdown``, for the audit event.
        """
        self.closedBy = self.closedBy or by
        self._release()
        if "upstream" not in self._lost:
            self.upstream.transport.abortConnection()
        self._closeSoon("client", 5.0)

    def closeWith(self, line: bytes, by: str = "operator") -> None:
        """
        End the session from outside with a last line to the client (an
        operator's ``* BYE`` or ``421``): the provider's side is cut first,
        so nothing it sends lands after that line. At a shutdown the client
        may still be reading a large response: it gets ``CLOSE_GRACE`` (the
        drain's own timeout bounds the stop), not 5 seconds.
        """
        self.closedBy = self.closedBy or by
        self._release()
        if "upstream" not in self._lost:
            self.upstream.transport.abortConnection()
        if "client" not in self._lost:
            self.client.transport.write(line + b"\r\n")
        self._closeSoon("client", self.CLOSE_GRACE if by == "shutdown" else 5.0)

    def clientLost(self) -> None:
        self.closedBy = self.closedBy or "client"
        self._sideLost("client")
        self._release()
        self._closeSoon("upstream", self.CLOSE_GRACE)
        self._end()

    def _upstreamLost(self, reason: Any) -> None:
        protocol = (self._audit or {}).get("protocol", "")
        self.closedBy = self.closedBy or ending.endedBy(protocol, self._tail)
        self._sideLost("upstream")
        self._release()
        b = self.boundaries
        if self.closedBy == "provider" and b.betweenResponses and not b.farewell:
            if "client" not in self._lost and "client" not in (self._cuts or ()):
                line = self.PROVIDER_LOST[self.protocol]
                if self.protocol == "smtp":  # the front door's name, as in its other 421s
                    line %= (getattr(self.client, "hostname", None) or b"imapproxy",)
                self.client.transport.write(line + b"\r\n")
        self._closeSoon("client", self.CLOSE_GRACE)
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        log.info(
            "session {label} ended: {up} bytes to the provider, {down} bytes to the client",
            label=self.label,
            up=self.client.bytesReceived,
            down=self.upstream.bytesReceived,
        )
        if self._audit is not None:
            elapsed = self._seconds() - self._started if self._seconds is not None else 0.0
            auditlog.sessionEnd(
                self._audit,
                self.client.bytesReceived,
                self.upstream.bytesReceived,
                elapsed,
                self.closedBy or "-",
            )
        if self._onEnd is not None:
            self._onEnd(self)
