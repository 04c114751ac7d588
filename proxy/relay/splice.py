"""
Relaying a logged-in session: bytes both ways, untouched, in order, with flow
control (each transport is the other's producer), until either side closes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

log = Logger()


def tuneSocket(transport: Any) -> None:
    """
    TCP_NODELAY (IMAP is small commands and replies: no waiting on Nagle) and
    keepalive (an IDLE session lasts hours; dead peers must show up). TLS and
    PROXY-protocol wrappers pass these through to the socket; other
    transports (UNIX sockets, test transports) simply lack them.
    """
    for name in ("setTcpNoDelay", "setTcpKeepAlive"):
        method = getattr(transport, name, None)
        if method is not None:
            try:
                method(True)
            except (OSError, AttributeError):
                pass
    eagerWrites(transport)


def eagerWrites(transport: Any) -> None:
    """
    Make the TCP connection under ``transport`` (below TLS and PROXY-protocol
    wrappers) send at once what it is given while nothing is queued, as
    asyncio's transports do, instead of queueing it until the reactor's next
    turn reports the socket writable. A relayed reply then leaves in the same
    turn it arrived in: one reactor turn and two epoll updates fewer per
    write, which is most of a proxy's added latency on a short command.
    Anything the socket does not take is queued as before, with the same flow
    control.
    """
    tcp: Any = transport
    # Wrappers forward unknown attributes to what they wrap: look at types.
    while tcp is not None and not isinstance(tcp, FileDescriptor):
        tcp = getattr(tcp, "transport", None)
    conn: Any = tcp
    sock = getattr(conn, "socket", None)
    if conn is None or sock is None or "_eager" in vars(conn):
        return
    queued = conn.write

    def write(data: bytes) -> None:
        if (
            not conn.TLS
            and conn.connected
            and not conn.disconnecting
            and not conn._aborting
            and not conn._writeDisconnected
            and not conn._tempDataLen
            and conn.offset == len(conn.dataBuffer)
            and type(data) is bytes
        ):
            try:
                sent = sock.send(data)
            except OSError:
                # Would block, or an error the queued write will report.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        queued(data)

    conn.write = write
    conn._eager = True
    # Read (and queue, before pausing the other side) up to this much at a
    # time: fewer, larger reads and writes for bulk transfers.
    conn.bufferSize = READ_SIZE


# TLS's largest record, and how much ciphertext is read out of OpenSSL at once.
TLS_RECORD = 16384
SEND_CHUNK = 262144
READ_SIZE = 262144


def directWriter(transport: Any) -> Callable[[bytes], None]:
    """
    ``transport.write``, minus Twisted's aggregation of small TLS writes,
    which holds each write until the reactor's next turn. A splice writes
    once per read, so there is nothing to aggregate, and the wait is added
    latency on every relayed command and reply. What was already aggregated
    is sent first, so nothing is reordered.
    """
    tls = _bufferingTLS(transport)
    if tls is None:
        return transport.write  # type: ignore[no-any-return]
    tls._aggregator.flush()
    conn = getattr(tls, "_tlsConnection", None)
    if conn is None or not hasattr(tls, "_appSendBuffer"):
        return functools.partial(TLSMemoryBIOProtocol.write, tls)
    slow = functools.partial(TLSMemoryBIOProtocol.write, tls)

    def write(data: bytes) -> None:
        # TLSMemoryBIOProtocol.write, but all the records of one chunk go to
        # the socket in one send, not one send per 16 KiB record.
        if tls._appSendBuffer or tls._lostTLSConnection or tls.disconnecting:
            slow(data)
            return
        sent, size = 0, len(data)
        view = memoryview(data)
        try:
            while sent < size:
                sent += conn.send(view[sent : sent + TLS_RECORD])
        except SSL.Error:
            # Let Twisted's own path buffer (WantRead) or fail the connection.
            slow(data[sent:])
            return
        finally:
            out = []
            # Room for all the records at once: the ciphertext of ``sent``
            # bytes, with each record's header and tag.
            room = sent + 64 * (sent // TLS_RECORD + 2)
            while True:
                try:
                    out.append(conn.bio_read(room))
                except SSL.WantReadError:
                    break
                if len(out[-1]) < room:
                    break
            if out:
                tls.transport.write(out[0] if len(out) == 1 else b"".join(out))

    return write


def batchReads(transport: Any) -> None:
    """
    Hand the protocol above ``transport``'s TLS layer everything one read
    decrypts to, at once, instead of one call per 16 KiB TLS record: a relayed
    64 KiB read is then one write (and one send) on the other side, not four.
    Errors and the end of TLS go to Twisted's own handling, after the data
    that came before them.
    """
    tls = _bufferingTLS(transport)
    conn = getattr(tls, "_tlsConnection", None)
    original = getattr(tls, "_flushReceiveBIO", None)
    if conn is None or original is None or not hasattr(tls, "_lostTLSConnection"):
        return

    def deliver(chunks: list[bytes]) -> None:
        if chunks and not tls._aborted:
            ProtocolWrapper.dataReceived(tls, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    intoSSL = getattr(conn, "_into_ssl", None)
    if intoSSL is None or not hasattr(_lib, "BIO_get_mem_data"):
        return

    def flushReceiveBIO() -> None:
        chunks: list[bytes] = []
        size = 0
        while not tls._lostTLSConnection:
            try:
                chunk = conn.recv(TLS_RECORD)
            except SSL.WantReadError:
                break
            except SSL.Error:
                deliver(chunks)
                original()  # the same error again, handled as Twisted does
                return
            chunks.append(chunk)
            size += len(chunk)
            if not conn.pending() and not _lib.BIO_get_mem_data(intoSSL, _ffi.NULL):
                # Nothing left to decrypt: skip the read that would only
                # raise WantReadError (a costly exception in pyOpenSSL).
                break
            if size >= SEND_CHUNK:
                deliver(chunks)
                chunks, size = [], 0
        deliver(chunks)
        tls._flushSendBIO()

    tls._flushReceiveBIO = flushReceiveBIO


def _bufferingTLS(transport: Any) -> Any:
    """The ``BufferingTLSTransport`` that ``transport.write`` goes through, if any."""
    t = transport
    for _ in range(3):
        if isinstance(t, BufferingTLSTransport):
            return t
        if getattr(type(t), "TLS", None) is not None and vars(t).get("TLS"):
            # STARTTLS on a TCP connection: its protocol is the TLS layer.
            protocol = getattr(t, "protocol", None)
            return protocol if isinstance(protocol, BufferingTLSTransport) else None
        if not isinstance(t, ProtocolWrapper):
            return None
        # A wrapper (PROXY protocol) writes to what it wraps.
        t = t.transport
    return None


class Splice:
    """
    Glue between the client's ``ProxyServer`` and the logged-in
    ``UpstreamProtocol``.

    :param onEnd: called once, with this splice, when both sides are done.
    :param callLater: ``IReactorTime.callLater``, for the close deadlines.
    """

    # A side being closed gets this long to take its last bytes (a BYE, the
    # end of a FETCH) before the connection is cut.
    CLOSE_GRACE = 30.0

    def __init__(
        self, client: Any, upstream: Any, label: str, onEnd: Any = None, callLater: Any = None
    ):
        self.client = client
        self.upstream = upstream
        self.label = label
        self._onEnd = onEnd
        self._ended = False
        if callLater is None:
            from twisted.internet import reactor

            callLater = reactor.callLater  # type: ignore[attr-defined]
        self._callLater = callLater
        self._released = False
        self._cuts: dict[str, Any] = {}
        self._lost: set[str] = set()

    def start(self, held: bytes) -> None:
        """
        :param held: what the client sent behind its login, not yet parsed;
            it goes upstream first, before anything read later.
        """
        ct = self.client.transport
        ut = self.upstream.transport
        toClient, toUpstream = directWriter(ct), directWriter(ut)
        batchReads(ct)
        batchReads(ut)
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
        if side in self._cuts or side in self._lost:
            return
        transport = self.client.transport if side == "client" else self.upstream.transport
        # Armed before closing: a transport may report the loss at once.
        self._cuts[side] = self._callLater(grace, transport.abortConnection)
        transport.loseConnection()

    def _sideLost(self, side: str) -> None:
        self._lost.add(side)
        cut = self._cuts.pop(side, None)
        if cut is not None and cut.active():
            cut.cancel()

    def close(self) -> None:
        """End the session from outside (shutdown, revocation): both sides."""
        self._release()
        if "upstream" not in self._lost:
            self.upstream.transport.abortConnection()
        self._closeSoon("client", 5.0)

    def clientLost(self) -> None:
        self._sideLost("client")
        self._release()
        self._closeSoon("upstream", self.CLOSE_GRACE)
        self._end()

    def _upstreamLost(self, reason: Any) -> None:
        self._sideLost("upstream")
        self._release()
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
        if self._onEnd is not None:
            self._onEnd(self)
