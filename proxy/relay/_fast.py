"""
The one module that uses private names of Twisted and pyOpenSSL; each
access says why beside it.

Private names change without notice, so every name and behaviour used here
is probed once at start-up (:func:`configure`, from ``makeService``) over an
in-memory TLS pair and a socket pair. The fast paths are on only when every
probe passes; otherwise the whole process relays through Twisted's public
interfaces and says why in one log line. The functions exported here never
raise: off, or failing to hook, they do what Twisted's public path does.

Twisted's PROXY-protocol parsers (not a fast path) are probed when the
listeners are checked: a ``haproxy:`` listener is refused without them.
"""

from __future__ import annotations

import functools
import socket
import types
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

from .transports import transportChain

log = Logger(namespace="proxy.relay")

MODES = ("fast", "plain")

# TLS's largest record; the most decrypted records handed on at once; how much
# a TCP connection reads at a time with the fast paths on (fewer, larger reads
# and writes for bulk transfers).
TLS_RECORD = 16384
SEND_RECORDS = 16
READ_SIZE = 262144


@attrs.frozen
class FastPaths:
    """
    :ivar enabled: whether this process uses eager TCP writes, direct TLS
        writes and batched TLS reads.
    :ivar reason: why they are off (or ``"all probes passed"``).
    """

    enabled: bool
    reason: str


# Twisted's public path until configure() says otherwise: nothing private
# runs in a process (or a test) that never probed.
_paths = FastPaths(False, "not probed")


def current() -> FastPaths:
    return _paths


def configure(mode: str = "fast") -> FastPaths:
    """
    Decide, once for the whole process, which path the relay takes, and say
    so in one log line.

    :param mode: ``fast`` (when every probe passes) or ``plain`` (Twisted's
        public path whatever the probes say).
    """
    global _paths
    if mode not in MODES:
        raise ValueError(f"relay must be one of {', '.join(MODES)}")
    if mode == "plain":
        _paths = FastPaths(False, "relay = plain")
        log.info("relay: Twisted's public path (relay = plain)")
        return _paths
    _paths = probe()
    if _paths.enabled:
        log.info("relay: fast paths on (eager TCP writes, direct TLS writes, batched TLS reads)")
    else:
        log.warn("relay: Twisted's public path, a probe failed: {reason}", reason=_paths.reason)
    return _paths


def probe() -> FastPaths:
    """Try every private name and behaviour the fast paths rely on."""
    for name, check in (("eager TCP writes", _probeEagerWrites), ("TLS layer", _probeTLS)):
        try:
            check()
        except Exception as e:
            return FastPaths(False, f"{name}: {type(e).__name__}: {e}")
    return FastPaths(True, "all probes passed")


# -- eager TCP writes ----------------------------------------------------------


def eagerWrites(transport: Any) -> None:
    """
    Make the TCP connection under ``transport`` send at once while nothing
    is queued (as asyncio does), not at the reactor's next turn: one turn
    and two epoll updates fewer per relayed reply. What the socket does not
    take is queued as before. A no-op on the public path.
    """
    if not _paths.enabled:
        return
    try:
        # Wrappers forward unknown attributes to what they wrap: look at types.
        for tcp in transportChain(transport):
            if isinstance(tcp, FileDescriptor):
                if getattr(tcp, "socket", None) is not None:
                    _eager(tcp)
                break
    except Exception:
        log.failure("eager writes not hooked; this connection uses Twisted's writes")


def _eager(conn: Any) -> None:
    if "_imapproxyEager" in vars(conn) or "write" in vars(conn):
        return  # hooked already (by this or by something else)
    # Bound to the connection, not a closure: one object a connection.
    conn.write = types.MethodType(_eagerWrite, conn)
    conn._imapproxyEager = True
    conn.bufferSize = READ_SIZE


def _eagerWrite(conn: Any, data: bytes) -> None:
    # tcp.Connection.write queues; sending directly is safe only when it
    # would send these bytes next and nothing ends the connection. Those
    # states are private: _aborting (abortConnection does not set
    # ``disconnecting``), _writeDisconnected (half-close), _tempDataLen
    # and dataBuffer/offset (bytes queued before these).
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
            sent = conn.socket.send(data)
        except OSError:
            # Would block, or an error the queued write will report.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    type(conn).write(conn, data)  # queued, as Twisted writes


def _probeEagerWrites() -> None:
    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactorClock

    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        # A reactor that is never run: the probe's connection is never read
        # and its abort never completes.
        conn = tcp.Connection(a, Protocol(), MemoryReactorClock())
        conn.connected = 1
        state = (conn._aborting, conn._writeDisconnected, conn._tempDataLen, conn.TLS)
        _check(state == (False, False, 0, False), "unexpected connection state")
        _check(conn.offset == len(conn.dataBuffer), "unexpected write buffer")
        _eager(conn)
        conn.write(b"probe")
        _check(b.recv(16) == b"probe", "an eager write was not sent at once")
        conn.abortConnection()
        _check(conn._aborting, "abortConnection does not set _aborting")
        conn.write(b"late")
        _check(_recv(b) == b"", "a write after abortConnection was sent")
    finally:
        a.close()
        b.close()


def _check(condition: Any, problem: str) -> None:
    if not condition:
        raise AssertionError(problem)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(16)
    except BlockingIOError:
        return b""


# -- direct TLS writes and batched TLS reads -----------------------------------


def directWriter(transport: Any) -> Callable[[bytes], None]:
    """
    ``transport.write``, minus Twisted's aggregation of small TLS writes,
    which holds each write until the reactor's next turn: a splice writes once
    per read, so there is nothing to aggregate, and the wait is added latency
    on every relayed command and reply. What was already aggregated is sent
    first, so nothing is reordered. ``transport.write`` on the public path.
    """
    tls = _bufferingTLS(transport) if _paths.enabled else None
    if tls is None:
        return transport.write  # type: ignore[no-any-return]
    try:
        return _directWriter(tls)
    except Exception:
        log.failure("direct TLS writes not hooked; this connection uses Twisted's writes")
        return transport.write  # type: ignore[no-any-return]


def flushWrites(transport: Any) -> None:
    """Send now what ``transport``'s TLS layer holds for the next turn (a login's answer)."""
    try:
        if (tls := _bufferingTLS(transport) if _paths.enabled else None) is not None:
            tls._aggregator.flush()  # private: it holds this turn's writes
    except Exception:
        log.failure("a TLS write not sent at once; it goes at the reactor's next turn")


def _directWriter(tls: Any) -> Callable[[bytes], None]:
    # The aggregator (private) holds what was written in this turn, e.g. the
    # login's tagged OK: it goes first.
    tls._aggregator.flush()
    # The TLS connection: records are encrypted into it and read out of its
    # memory BIO directly. (getHandle() warns that it may return something
    # else one day: then this falls back.)
    if not isinstance(tls.getHandle(), SSL.Connection):
        raise TypeError("the TLS layer's connection is not an OpenSSL connection")
    return types.MethodType(_directWrite, tls)


def _directWrite(tls: Any, data: bytes) -> None:
    # TLSMemoryBIOProtocol.write, but all the records of one chunk go to the
    # socket in one send, not one send per 16 KiB record. Writes held for a
    # renegotiation (_appSendBuffer) and a closed or closing TLS layer
    # (_lostTLSConnection) are left to Twisted.
    if tls._appSendBuffer or tls._lostTLSConnection or tls.disconnecting:
        TLSMemoryBIOProtocol.write(tls, data)
        return
    conn = tls.getHandle()
    sent, size = 0, len(data)
    view = memoryview(data)
    try:
        while sent < size:
            sent += conn.send(view[sent : sent + TLS_RECORD])
    except SSL.Error:
        # Let Twisted's own path buffer (WantRead) or fail the connection.
        TLSMemoryBIOProtocol.write(tls, data[sent:])
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


def batchReads(transport: Any, sink: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """
    ``sink``, fed everything one read of ``transport``'s TLS layer decrypts
    to at once instead of one call per 16 KiB TLS record: a relayed 64 KiB
    read is then one write (and one send) on the other side, not four.
    Twisted's TLS layer does all the decrypting and all the error and
    shutdown handling, unchanged; only its deliveries are gathered. ``sink``
    itself on the public path.

    :param sink: where the protocol above the TLS layer sends what it reads.
    :return: what that protocol should send it to instead.
    """
    tls = _bufferingTLS(transport) if _paths.enabled else None
    if tls is None:
        return sink
    try:
        return _batchReads(tls, sink)
    except Exception:
        log.failure("batched TLS reads not hooked; this connection uses Twisted's reads")
        return sink


def _batchReads(tls: Any, sink: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # Public names only, but it relies on a behaviour the probe checks: the
    # TLS layer hands on every record of one read within its dataReceived.
    batch = _Batch(tls.dataReceived, sink)
    tls.dataReceived = batch.dataReceived
    return batch.gather


class _Batch:
    """One TLS layer's deliveries of one read, gathered for ``sink`` (slots: one a direction)."""

    __slots__ = ("original", "sink", "pending", "gathering")

    def __init__(self, original: Callable[[bytes], None], sink: Callable[[bytes], Any]):
        self.original = original
        self.sink = sink
        self.pending: list[bytes] = []
        self.gathering = False

    def flush(self) -> None:
        pending = self.pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.sink(data)

    def dataReceived(self, data: bytes) -> None:
        self.gathering = True
        try:
            self.original(data)
        finally:
            self.gathering = False
            if self.pending:
                self.flush()

    def gather(self, data: bytes) -> Any:
        if not self.gathering:
            return self.sink(data)
        pending = self.pending
        pending.append(data)
        if len(pending) >= SEND_RECORDS:  # each at most one record
            self.flush()
        return None


def _bufferingTLS(transport: Any) -> Any:
    """The ``BufferingTLSTransport`` that ``transport.write`` goes through, if any."""
    for t in transportChain(transport):
        if isinstance(t, BufferingTLSTransport):
            return t
        if getattr(type(t), "TLS", None) is not None and vars(t).get("TLS"):
            # STARTTLS on a TCP connection: its protocol is the TLS layer.
            protocol = getattr(t, "protocol", None)
            return protocol if isinstance(protocol, BufferingTLSTransport) else None
        if not isinstance(t, ProtocolWrapper):
            return None
        # A wrapper (connection limits, PROXY protocol) writes to what it wraps.
    return None


def sessionReused(connection: Any) -> bool | None:
    """
    Whether ``connection`` (an ``OpenSSL.SSL.Connection``) resumed an earlier
    TLS session; ``None`` when that cannot be known (the public path).
    """
    if not _paths.enabled:
        return None
    try:
        # pyOpenSSL has no public call for SSL_session_reused: its private
        # bindings (_util.lib) and the connection's SSL pointer (_ssl).
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except Exception:
        return None


def _probeTLS() -> None:
    from ._probe import tlsPair

    pair = tlsPair()
    for tls in (pair.client, pair.server):
        _check(isinstance(tls, BufferingTLSTransport), "the TLS layer does not buffer")
        _check(isinstance(tls.getHandle(), SSL.Connection), "the TLS handle is not OpenSSL's")
        _check(tls._appSendBuffer == [] and tls._lostTLSConnection is False, "TLS layer state")
    # Direct writes: what is written arrives, in order, after what was
    # aggregated before.
    pair.client.write(b"first ")
    write = _directWriter(pair.client)
    write(b"x" * (3 * TLS_RECORD))
    pair.pump()
    _check(pair.serverReceived() == b"first " + b"x" * (3 * TLS_RECORD), "direct TLS writes")
    # Batched reads: three records read at once reach the sink in one call.
    got: list[bytes] = []
    pair.serverApp.sink = _batchReads(pair.server, got.append)
    write(b"y" * (3 * TLS_RECORD))
    pair.pump()
    _check(got == [b"y" * (3 * TLS_RECORD)], "batched TLS reads did not gather one read")
    from OpenSSL._util import lib

    reused = lib.SSL_session_reused(pair.client.getHandle()._ssl)
    _check(reused == 0, "SSL_session_reused is wrong on a fresh session")


# -- PROXY-protocol headers ----------------------------------------------------


class ProxyHeaderReader:
    """
    Reads one PROXY-protocol header (v1 or v2) with Twisted's parsers, which
    its public API does not export. :meth:`feed` returns ``(info, rest)``
    once the header is whole (``info``: a ``ProxyInfo``), ``(None, b"")``
    before, and raises ``ValueError`` for anything that is not a header.
    """

    def __init__(self) -> None:
        self._parser: Any = None

    def feed(self, data: bytes) -> tuple[Any, bytes]:
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
        from twisted.protocols.haproxy._v1parser import V1Parser
        from twisted.protocols.haproxy._v2parser import V2Parser

        if self._parser is None:
            if len(data) >= 16 and data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif len(data) >= 8 and data[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            else:
                raise ValueError("not a PROXY header")
        try:
            info, rest = self._parser.feed(data)
        except InvalidProxyHeader:
            raise ValueError("invalid PROXY header") from None
        return (None, b"") if info is None else (info, rest or b"")


@functools.cache
def proxyHeaderProblem() -> str | None:
    """Why PROXY headers cannot be read with this Twisted, or ``None``."""
    # 192.0.2.1:1111 -> 198.51.100.2:143, in each version.
    v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\xc6\x33\x64\x02\x04\x57\x00\x8f"
    try:
        for header in (b"PROXY TCP4 192.0.2.1 198.51.100.2 1111 143\r\n", v2):
            reader = ProxyHeaderReader()
            _check(reader.feed(header[:20]) == (None, b""), "a partial header was accepted")
            info, left = reader.feed(header[20:] + b"rest")
            got = (info.source.host, info.source.port, left)
            _check(got == ("192.0.2.1", 1111, b"rest"), "the header was misread")
        try:
            ProxyHeaderReader().feed(b"PROXY BOGUS\r\n")
            raise AssertionError("a bad header passed")
        except ValueError:
            pass
    except Exception as e:
        return f"Twisted's PROXY-protocol parsers: {type(e).__name__}: {e}"
    return None
