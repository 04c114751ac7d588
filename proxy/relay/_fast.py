"""
The one module that uses private names of Twisted and pyOpenSSL; each
access says why beside it. Private names change without notice, so every
name and behaviour used here is probed once at start-up (:func:`configure`,
from ``makeService``) over an in-memory TLS pair and a socket pair. The fast
paths are on only when every probe passes; otherwise the whole process
relays through Twisted's public interfaces and says why in one log line.
The functions exported here never raise: off, or failing to hook, they do
what Twisted's public path does.

Twisted's PROXY-protocol parsers (not a fast path) are probed when the
listeners are checked: a ``haproxy:`` listener is refused without them.
"""

from __future__ import annotations

import contextlib
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

with contextlib.suppress(ImportError):  # pyOpenSSL's private bindings: else a probe fails
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

log = Logger(namespace="proxy.relay")

MODES = ("fast", "plain")

# TLS's largest record; the most decrypted records handed on at once; a TCP
# connection's read size with the fast paths on (fewer, larger reads and writes).
TLS_RECORD = 16384
SEND_RECORDS = 16
READ_SIZE = 262144


@attrs.frozen
class FastPaths:
    """
    :ivar enabled: whether this process uses eager TCP writes, direct TLS writes, batched TLS reads.
    :ivar reason: why they are off (or ``"all probes passed"``).
    """

    enabled: bool
    reason: str


# Twisted's public path until configure() says otherwise (unprobed: nothing private).
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
        with contextlib.suppress(BlockingIOError):  # nothing to read: as it should be
            _check(not b.recv(16), "a write after abortConnection was sent")
    finally:
        a.close()
        b.close()


def _check(condition: Any, problem: str) -> None:
    if not condition:
        raise AssertionError(problem)


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
    # Records are encrypted into the TLS connection and read out of its BIO
    # directly. (getHandle() may return something else one day: then this falls back.)
    if not isinstance(tls.getHandle(), SSL.Connection) or tls._tlsConnection is not tls.getHandle():
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
    conn = tls._tlsConnection  # private: getHandle() without the call
    sent, size = 0, len(data)
    try:
        if 0 < size <= TLS_RECORD:
            sent = conn.send(data)
        if sent < size:  # more than a record, or smaller records (max_fragment_length)
            view = memoryview(data)
            while sent < size:
                sent += conn.send(view[sent : sent + TLS_RECORD])
    except SSL.Error:
        # Let Twisted's own path buffer (WantRead) or fail the connection.
        TLSMemoryBIOProtocol.write(tls, data[sent:])
        return
    finally:
        # Room for all the records at once: the ciphertext of ``sent``
        # bytes, with each record's header and tag.
        room = sent + 64 * (sent // TLS_RECORD + 2)
        out = b""
        try:
            while True:
                chunk = conn.bio_read(room)
                out = out + chunk if out else chunk
                if len(chunk) < room:
                    break
        except SSL.WantReadError:
            pass
        if out:
            tls.transport.write(out)


def batchReads(transport: Any) -> None:
    """
    Make one read of ``transport``'s TLS layer one delivery, not one per
    16 KiB TLS record: a relayed 64 KiB read is one write on the other side,
    not four. Twisted's TLS layer does all the decrypting, error and shutdown
    handling; only the ``recv`` it calls is replaced. Public path: a no-op.
    """
    tls = _bufferingTLS(transport) if _paths.enabled else None
    if tls is not None:
        try:
            _batchReads(tls)
        except Exception:
            log.failure("batched TLS reads not hooked; this connection uses Twisted's reads")


def _batchReads(tls: Any) -> None:
    conn = tls.getHandle()
    if type(conn) not in (SSL.Connection, _BatchedConnection) or not tls._handshakeDone:  # private
        raise TypeError("not a plain OpenSSL connection past its handshake")
    # A class, not bound methods: no cycle holds OpenSSL's memory after the end.
    conn.__class__ = _BatchedConnection


class _BatchedConnection(SSL.Connection):
    """
    A TLS connection whose ``recv`` (Twisted's loop calls it until WantReadError)
    returns all the records of the last network read in one call; the next raises
    WantReadError without a failing SSL_read (a costly path, twice a round trip).
    An error after some records comes next call (OpenSSL has failed the
    connection by then: a reply to them fails, the reason Twisted then gives).
    """

    _imapproxyError: SSL.Error | None = None

    def recv(self, bufsiz: int, flags: Any = None) -> bytes:
        if self._imapproxyError is not None:
            try:
                raise self._imapproxyError  # no local: it would hold this frame
            finally:  # raised once, and the connection has ended: pyOpenSSL's reads again
                self._imapproxyError = None
                self.__class__ = SSL.Connection  # type: ignore[assignment]
        # Private: the SSL object, and the memory BIO Twisted writes into.
        ssl, incoming, null = self._ssl, self._into_ssl, _ffi.NULL
        # Nothing decrypted held, nothing to decrypt: SSL_read would say WantRead.
        if not (_lib.SSL_pending(ssl) or _lib.BIO_get_mem_data(incoming, null)):
            raise SSL.WantReadError()
        data = SSL.Connection.recv(self, bufsiz, flags)
        # More records to read? (What did not fit ``bufsiz``: the next call.)
        if not _lib.BIO_get_mem_data(incoming, null):
            return data
        records = [data]
        while len(records) < SEND_RECORDS and _lib.BIO_get_mem_data(incoming, null):
            try:
                records.append(SSL.Connection.recv(self, bufsiz, flags))
            except SSL.WantReadError:
                break  # a partial record: the rest comes with the next read
            except SSL.Error as e:
                self._imapproxyError = e.with_traceback(None)
                break
        return b"".join(records)

    def bio_shutdown(self) -> None:
        # The network's end (Twisted's connectionLost): pyOpenSSL's reads tell an
        # end without close_notify, or a cut record; a stored error says more.
        if self._imapproxyError is None:
            self.__class__ = SSL.Connection  # type: ignore[assignment]
        SSL.Connection.bio_shutdown(self)


def _bufferingTLS(transport: Any) -> Any:
    """The live ``BufferingTLSTransport`` that ``transport.write`` goes through, if any."""
    for t in transportChain(transport):
        if getattr(type(t), "TLS", None) is not None and vars(t).get("TLS"):
            # STARTTLS on a TCP connection: its protocol is the TLS layer.
            t = getattr(t, "protocol", None)
        if isinstance(t, BufferingTLSTransport):
            return t if t.getHandle() is not None else None
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
        # No public call for SSL_session_reused: the private bindings, _ssl.
        return bool(_lib.SSL_session_reused(connection._ssl))
    except Exception:
        return None


def _probeTLS() -> None:
    from ._probe import tlsPair

    pair = tlsPair()
    for tls in (pair.client, pair.server):
        _check(isinstance(tls, BufferingTLSTransport), "the TLS layer does not buffer")
        _check(type(tls.getHandle()) is SSL.Connection, "the TLS handle is not OpenSSL's")
        _check(tls._appSendBuffer == [] and tls._lostTLSConnection is False, "TLS layer state")
    # Direct writes: what is written arrives, in order, after what was aggregated.
    pair.client.write(b"first ")
    write = _directWriter(pair.client)
    write(b"x" * (3 * TLS_RECORD))
    pair.pump()
    _check(pair.serverReceived() == b"first " + b"x" * (3 * TLS_RECORD), "direct TLS writes")
    # Batched reads: three records read at once reach the protocol in one call.
    _batchReads(pair.server)
    write(b"y" * (3 * TLS_RECORD))
    pair.pump()
    _check(pair.serverApp.received == [b"y" * (3 * TLS_RECORD)], "batched TLS reads")
    _check(_lib.SSL_session_reused(pair.client.getHandle()._ssl) == 0, "SSL_session_reused")
    # Twisted's connectionLost calls bio_shutdown: pyOpenSSL's reads come back. (A
    # close_notify left unread ends it without a failure, which would be garbage.)
    conn = pair.server.getHandle()
    pair.client.loseConnection()
    pair.clock.advance(0)
    conn.bio_write(pair.clientWire.value())
    pair.server.connectionLost(None)
    _check(type(conn) is SSL.Connection, "the TLS layer's end does not go through bio_shutdown")


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
