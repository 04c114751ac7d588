"""
The splice over in-memory transports (``iosim``): bytes both ways untouched
and in order, flow control, closes from either side, with TLS on both legs
(Twisted's own TLS layer, real OpenSSL) or none; each under the fast paths
and under Twisted's public path. Also the start-up probes of the fast paths
and the eager TCP writes, over a real socket pair.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import tempfile
import weakref
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import ssl, task, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim

from proxy.relay import Splice, _fast, _probe, ending
from tests.relaypaths import relayFixture  # noqa: F401  (the relay fixture)
from tests.upstream.certs import make_pki

MB = 1024 * 1024


class Peer(Protocol):
    """A client or the provider: keeps what it reads."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class Side(Protocol):
    """One leg of the proxy, as ``ProxyServer``/``UpstreamProtocol`` behave once spliced."""

    def __init__(self) -> None:
        self.sink: Any = None
        self.onLost: Any = None
        self.kept = b""
        self.bytesReceived = 0
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        if self.sink is None:
            self.kept += data  # read after the login, before the splice
            return
        self.bytesReceived += len(data)
        self.sink(data)

    def takeOver(self, sink: Any, onLost: Any) -> bytes:
        self.sink, self.onLost = sink, onLost
        leftover, self.kept = self.kept, b""
        return leftover

    def connectionLost(self, reason: Any = None) -> None:
        if self.onLost is not None:
            self.onLost(reason)


class Wire(iosim.FakeTransport):
    """An in-memory connection end that stops reading while paused, as a socket does."""

    paused = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.held: list[bytes] = []
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        held, self.held = b"".join(self.held), []
        if held:
            self.protocol.dataReceived(held)

    def bufferReceived(self, buf: Any) -> None:
        if self.paused and isinstance(buf, bytes):
            self.held.append(buf)
        else:
            super().bufferReceived(buf)


@pytest.fixture(scope="module")
def pki():
    with tempfile.TemporaryDirectory() as d:
        yield make_pki(os.path.join(d, "pki"))


class Session:
    """A client, the proxy's two legs and the provider, connected in memory, then spliced."""

    def __init__(self, pki: Any, useTLS: bool):
        self.clock = task.Clock()
        self.client, self.provider = Peer(), Peer()
        self.clientSide, self.upstreamSide = Side(), Side()
        self.tls = useTLS
        if useTLS:
            with open(pki.key, "rb") as k, open(pki.cert, "rb") as c:
                # pyOpenSSL objects: the lowest allowed pyOpenSSL takes no others.
                self.serverTLS = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
            with open(pki.ca_cert) as f:
                ca = ssl.Certificate.loadPEM(f.read())
            self.clientTLS = ssl.optionsForClientTLS("localhost", trustRoot=ca)
        # The client's leg: the proxy accepts; the provider's: the proxy connects.
        self.clientLeg = self._leg(self.clientSide, self.client)
        self.upstreamLeg = self._leg(self.provider, self.upstreamSide)
        self.settle()
        self.ended: list[Splice] = []

    def _leg(self, server: Protocol, client: Protocol) -> iosim.IOPump:
        if self.tls:
            server = TLSMemoryBIOFactory(
                self.serverTLS, False, Factory.forProtocol(lambda: server), self.clock
            ).buildProtocol(None)
            client = TLSMemoryBIOFactory(
                self.clientTLS, True, Factory.forProtocol(lambda: client), self.clock
            ).buildProtocol(None)
        return iosim.connect(
            server,
            Wire(server, isServer=True),
            client,
            Wire(client, isServer=False),
            greet=False,
            clock=self.clock,
        )

    def settle(self) -> None:
        for _ in range(1000):
            moved = self.clientLeg.pump()
            if not self.upstreamLeg.pump() and not moved:
                return
        raise AssertionError("the session did not settle")

    def splice(self, held: bytes = b"", audit: dict[str, Any] | None = None) -> Splice:
        self.spliced = Splice(
            self.clientSide,
            self.upstreamSide,
            "test",
            self.ended.append,
            self.clock.callLater,
            audit=audit,
            seconds=self.clock.seconds,
        )
        self.clientSide.onLost = lambda reason: self.spliced.clientLost()
        self.spliced.start(held)
        return self.spliced

    # What each end writes on, and what the proxy's legs read from.
    def clientWrites(self, data: bytes) -> None:
        self.client.transport.write(data)

    def providerWrites(self, data: bytes) -> None:
        self.provider.transport.write(data)

    @property
    def clientWire(self) -> Wire:
        """The proxy's end of the client's connection (below TLS)."""
        return self.clientLeg.serverIO  # type: ignore[no-any-return]

    @property
    def upstreamWire(self) -> Wire:
        """The proxy's end of the provider's connection (below TLS)."""
        return self.upstreamLeg.clientIO  # type: ignore[no-any-return]


LEGS = [pytest.param(True, id="tls"), pytest.param(False, id="tcp")]


@pytest.mark.parametrize("useTLS", LEGS)
def test_bytesGoBothWaysUntouchedAndInOrder(relay, pki, useTLS):
    """Held and leftover bytes go first; every byte after them arrives unchanged, in order."""
    s = Session(pki, useTLS)
    s.providerWrites(b"* 1 EXISTS\r\n")  # read by the proxy before the splice
    s.settle()
    s.splice(held=b"a2 NOOP\r\n")
    payload = bytes(range(256)) * 4096 + b"\r\n"  # 1 MiB, every byte value
    s.clientWrites(b"a3 APPEND INBOX {%d}\r\n" % len(payload) + payload)
    s.providerWrites(b"* 2 FETCH (BODY[] {%d}\r\n" % len(payload) + payload + b")\r\n")
    s.settle()
    assert s.provider.received == b"a2 NOOP\r\na3 APPEND INBOX {%d}\r\n" % len(payload) + payload
    assert s.client.received == (
        b"* 1 EXISTS\r\n* 2 FETCH (BODY[] {%d}\r\n" % len(payload) + payload + b")\r\n"
    )
    assert s.clientSide.bytesReceived == len(s.provider.received)
    assert s.ended == []


def test_fastPathsHookOnlyWhenOn(relay, pki):
    """Fast: a reply leaves in the turn it arrived, in one write; plain: Twisted's writes."""
    s = Session(pki, True)
    s.splice()
    before = s.clientWire.writes
    s.providerWrites(b"x" * (3 * 16384))  # three TLS records
    s.clock.advance(0)  # the provider's TLS layer sends them
    # Deliver them to the proxy in one read, without another reactor turn.
    s.upstreamLeg.pump(advanceClock=False)
    hooked = [
        type(side.transport.getHandle()) is not SSL.Connection
        for side in (s.clientSide, s.upstreamSide)
    ]
    if relay == "fast":
        assert hooked == [True, True]
        assert s.clientWire.writes == before + 1
    else:
        assert hooked == [False, False]
        # Twisted's aggregation waits for the reactor's next turn.
        assert s.clientWire.writes == before
    s.settle()
    assert s.client.received == b"x" * (3 * 16384)


def test_aTLSConnectionThatTakesLessThanARecordStillSendsItAll(relay, pki):
    """Records smaller than 16 KiB (a client's max_fragment_length): every byte goes."""
    s = Session(pki, True)
    conn = s.clientSide.transport.getHandle()
    conn.send = lambda data: SSL.Connection.send(conn, bytes(data[:512]))
    s.splice()
    s.providerWrites(b"x" * 4000 + b"\r\n")
    s.settle()
    assert s.client.received == b"x" * 4000 + b"\r\n"


def test_aLostTLSLayerIsLeftToTwistedQuietly(relay, pki):
    """A leg lost before the splice hooks it: Twisted's own writes and reads, no failure logged."""
    s = Session(pki, True)
    tls = s.clientSide.transport
    tls.connectionLost(Failure(ConnectionDone()))
    failures: list[dict] = []
    observer = lambda event: "log_failure" in event and failures.append(event)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        assert _fast.directWriter(tls) == tls.write
        _fast.batchReads(tls)
        _fast.flushWrites(tls)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == []


def test_flushWritesSendsWhatTheTLSLayerHoldsNow(relay, pki):
    """Fast: a login's answer leaves in this turn; plain: at the next, as Twisted has it."""
    s = Session(pki, True)
    before = s.clientWire.writes
    s.clientSide.transport.write(b"a1 OK logged in\r\n")
    _fast.flushWrites(s.clientSide.transport)
    assert s.clientWire.writes == (before + 1 if relay == "fast" else before)
    s.clock.advance(0)
    assert s.clientWire.writes == before + 1
    s.settle()
    assert s.client.received == b"a1 OK logged in\r\n"


@pytest.mark.parametrize("useTLS", LEGS)
def test_aClientThatDoesNotReadPausesTheProvider(relay, pki, useTLS):
    """Flow control: the client's transport pauses the provider's; nothing is lost on resume."""
    s = Session(pki, useTLS)
    s.splice()
    # As a socket whose peer does not read: its producer is paused.
    s.clientWire.producer.pauseProducing()
    assert s.upstreamWire.paused
    s.providerWrites(b"y" * MB)
    s.settle()
    assert s.client.received == b""
    assert sum(map(len, s.upstreamWire.held)) > 0  # left unread, not buffered in the proxy
    s.clientWire.producer.resumeProducing()
    s.settle()
    assert s.client.received == b"y" * MB
    # And the other way round.
    s.upstreamWire.producer.pauseProducing()
    assert s.clientWire.paused
    s.upstreamWire.producer.resumeProducing()
    assert not s.clientWire.paused


@pytest.mark.parametrize("useTLS", LEGS)
def test_clientCloseClosesTheProviderAfterItsLastBytes(relay, pki, useTLS):
    """A client that sends LOGOUT and closes at once: LOGOUT reaches the provider, then EOF."""
    s = Session(pki, useTLS)
    s.splice()
    s.clientWrites(b"a9 LOGOUT\r\n")
    s.client.transport.loseConnection()
    s.settle()
    assert s.provider.received == b"a9 LOGOUT\r\n"
    assert s.provider.lost is not None
    assert s.ended == [s.spliced]
    assert s.clock.getDelayedCalls() == []


@pytest.mark.parametrize("useTLS", LEGS)
@pytest.mark.parametrize(
    "last, closedBy",
    [(b"a9 OK Logout completed\r\n", "client"), (b"* BYE going away\r\n", "provider")],
)
def test_whoClosedIsToldFromTheProvidersLastLine(relay, pki, useTLS, last, closedBy):
    """
    With an audit event to write, the provider's last line decides who ended
    the session, however its reads were gathered: here a response of many
    TLS records with the last line in the same read.
    """
    s = Session(pki, useTLS)
    s.splice(audit={"protocol": "imap", "account": "a", "token_id": "t", "client": "c"})
    s.clientWrites(b"a9 LOGOUT\r\n")
    body = b"* 1 FETCH (BODY[] {%d}\r\n" % MB + b"z" * MB + b")\r\n"
    s.providerWrites(body + last)
    s.provider.transport.loseConnection()
    s.settle()
    assert s.client.received == body + last
    assert s.spliced.closedBy == closedBy
    assert s.ended == [s.spliced]
    # Only the end of the stream is kept, however long the last read was.
    assert s.spliced._tail == (body + last)[-ending.TAIL :]


@pytest.mark.parametrize("useTLS", LEGS)
def test_providerCloseReachesTheClientAfterItsBye(relay, pki, useTLS):
    """The provider's last bytes (a BYE) reach the client before its connection closes."""
    s = Session(pki, useTLS)
    s.splice()
    s.providerWrites(b"* BYE shutting down\r\n")
    s.provider.transport.loseConnection()
    s.settle()
    assert s.client.received == b"* BYE shutting down\r\n"
    assert s.client.lost is not None
    assert s.ended == [s.spliced]
    assert s.clock.getDelayedCalls() == []


def test_closeFromOutsideCutsAClientThatDoesNotClose(relay, pki):
    """Splice.close(): the provider is cut at once; the client is cut after its grace."""
    s = Session(pki, True)
    splice = s.splice()
    s.clientWire.producer.pauseProducing()  # stalls: its close cannot finish
    splice.close()
    assert s.upstreamWire.disconnecting
    (cut,) = s.clock.getDelayedCalls()
    assert cut.getTime() == 5.0
    s.clock.advance(5.0)
    assert s.clientWire.disconnecting


def test_aFastPathThatCannotHookFallsBackAfterTheOK(pki):
    """
    With the fast paths on, a TLS layer that lacks what they use (here its
    write aggregator) is relayed through Twisted's public path: Splice.start
    does not raise after the client was told OK, and bytes still flow.
    """
    previous = _fast.current()
    try:
        assert _fast.configure("fast").enabled
        s = Session(pki, True)
        del s.clientSide.transport._aggregator
        s.splice()
        s.providerWrites(b"* OK still here\r\n")
        s.settle()
        assert s.client.received == b"* OK still here\r\n"
    finally:
        _fast._paths = previous


def test_aSpliceThatCannotStartClosesBothSides(pki):
    """Should starting fail anyway (a bug), the client is not left holding a dead session."""
    s = Session(pki, True)

    def broken(sink, onLost):
        raise RuntimeError("takeOver failed")

    s.upstreamSide.takeOver = broken  # type: ignore[method-assign]
    failures: list[dict] = []
    observer = lambda event: "log_failure" in event and failures.append(event)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        s.splice()  # does not raise
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [f["log_failure"].type for f in failures] == [RuntimeError]
    s.clientWrites(b"a3 LOGIN other token\r\n")
    s.settle()
    assert s.provider.lost is not None
    assert s.client.lost is not None
    assert s.ended == [s.spliced]
    assert s.clock.getDelayedCalls() == []
    # What the client sent after its OK was dropped, not parsed as a command.
    assert s.clientSide.kept == b""


# -- the start-up probes --------------------------------------------------------


def _relayEvents() -> tuple[list[dict], Any]:
    events: list[dict] = []

    def observe(event: dict) -> None:
        if str(event.get("log_format", "")).startswith("relay:"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    return events, observe


def test_aFailedProbeTurnsTheFastPathsOffWithOneLogLine(pki, monkeypatch):
    """
    A private name the fast paths rely on, gone (as after an upgrade): the
    probe fails at start-up, the whole process takes the public path, one log
    line says why, and sessions still relay.
    """
    previous = _fast.current()
    events, observer = _relayEvents()
    try:
        monkeypatch.delattr(FileDescriptor, "_writeDisconnected")
        paths = _fast.configure("fast")
        assert not paths.enabled
        assert "_writeDisconnected" in paths.reason
        assert len(events) == 1
        assert "probe failed" in events[0]["log_format"]
        s = Session(pki, True)
        s.splice(held=b"a2 SELECT INBOX\r\n")
        s.providerWrites(b"* 3 EXISTS\r\n")
        s.settle()
        assert s.provider.received == b"a2 SELECT INBOX\r\n"
        assert s.client.received == b"* 3 EXISTS\r\n"
        assert type(s.clientSide.transport.getHandle()) is SSL.Connection
    finally:
        globalLogPublisher.removeObserver(observer)
        _fast._paths = previous


@pytest.mark.parametrize("mode", ["fast", "plain"])
def test_configureSaysWhichPathInOneLine(mode):
    """Each mode logs exactly one line; plain runs no probe."""
    previous = _fast.current()
    events, observer = _relayEvents()
    try:
        paths = _fast.configure(mode)
        assert paths.enabled == (mode == "fast")
        assert len(events) == 1
    finally:
        globalLogPublisher.removeObserver(observer)
        _fast._paths = previous


def test_anUnknownModeIsRefused():
    with pytest.raises(ValueError):
        _fast.configure("turbo")


def test_proxyHeaderParsersAreProbed():
    """Twisted's PROXY-protocol parsers pass their probe on the tested versions."""
    assert _fast.proxyHeaderProblem() is None


# -- batched TLS reads ------------------------------------------------------------


def _readingPair(monkeypatch: Any) -> tuple[Any, list[int], list[Any]]:
    """A probe's TLS pair whose server reads in batches; counts its SSL reads, keeps its loss."""
    pair = _probe.tlsPair()
    _fast._batchReads(pair.server)
    reads = [0]
    recv = SSL.Connection.recv

    def counted(self: Any, *args: Any) -> bytes:
        reads[0] += 1
        return recv(self, *args)

    monkeypatch.setattr(SSL.Connection, "recv", counted)
    lost: list[Any] = []
    pair.serverApp.connectionLost = lost.append  # type: ignore[method-assign]
    return pair, reads, lost


def _sent(pair: Any, *chunks: bytes) -> bytes:
    """What the client's TLS layer puts on the wire for ``chunks``, taken off it."""
    for chunk in chunks:
        pair.client.write(chunk)
    pair.clock.advance(0)
    wire = pair.clientWire.value()
    pair.clientWire.clear()
    return wire  # type: ignore[no-any-return]


def test_oneRecordIsOneSSLRead(monkeypatch):
    """The read that would only fail with WantReadError is not made."""
    pair, reads, lost = _readingPair(monkeypatch)
    pair.server.dataReceived(_sent(pair, b"a1 NOOP\r\n"))
    assert pair.serverApp.received == [b"a1 NOOP\r\n"]
    assert reads == [1]
    assert lost == []


def test_anErrorAfterRecordsComesAfterThem(monkeypatch):
    """Records, then one that fails to decrypt, in one read: the good ones, then the loss."""
    pair, reads, lost = _readingPair(monkeypatch)
    good = _sent(pair, b"x" * 16384, b"y" * 16384)
    bad = bytearray(_sent(pair, b"z" * 100))
    bad[-1] ^= 1  # the last record's tag
    pair.server.dataReceived(good + bytes(bad))
    assert pair.serverApp.received == [b"x" * 16384 + b"y" * 16384]
    assert reads == [3]  # the third raised, and was raised again at the next call
    assert pair.serverWire.disconnecting
    pair.server.connectionLost(Failure(ConnectionDone()))
    (reason,) = lost
    assert reason.check(SSL.Error)


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
def test_anEndWithoutCloseNotifyIsToldAsTwistedTellsIt(monkeypatch, cut):
    """The connection lost without close_notify, its last record whole or cut: not a clean end."""
    pair, reads, lost = _readingPair(monkeypatch)
    wire = _sent(pair, b"a1 NOOP\r\n")
    pair.server.dataReceived(wire[:-5] if cut else wire)
    pair.server.connectionLost(Failure(ConnectionDone()))
    assert pair.serverApp.received == ([] if cut else [b"a1 NOOP\r\n"])
    (reason,) = lost
    assert reason.check(ConnectionLost)


def _endedWith(end: str, batched: bool) -> tuple[bool, Any]:
    """
    The server's TLS connection ended by ``end`` after a record: whether it
    is freed without the cycle collector, and the reason its protocol got.
    ``reply``: the protocol answers the records at once (the bad record after
    them has failed the connection already); ``raise``: it raises.
    """
    gc.collect()
    gc.disable()
    try:
        pair = _probe.tlsPair()
        if batched:
            _fast._batchReads(pair.server)
        conn = weakref.ref(pair.server.getHandle())
        lost: list[Any] = []
        pair.serverApp.connectionLost = lost.append  # type: ignore[method-assign]
        if end == "reply":
            # At once, not at the next turn as the TLS layer's aggregated writes go.
            pair.serverApp.sink = lambda data, tls=pair.server: TLSMemoryBIOProtocol.write(
                tls, b"a1 OK\r\n"
            )
        elif end == "raise":
            pair.serverApp.sink = lambda data: 1 / 0
        wire = _sent(pair, b"* BYE\r\n", b"a1 OK LOGOUT\r\n")
        if end == "close_notify":
            pair.client.loseConnection()
            wire += _sent(pair)
        else:
            bad = bytearray(_sent(pair, b"x" * 100))
            bad[-1] ^= 1
            wire += bytes(bad)
        with contextlib.suppress(ZeroDivisionError):
            pair.server.dataReceived(wire)
        pair.server.connectionLost(Failure(ConnectionDone()))
        (reason,) = lost
        del pair, lost
        return conn() is None, reason.type
    finally:
        gc.enable()


@pytest.mark.parametrize("end", ["close_notify", "reply", "raise"])
def test_anEndedConnectionIsFreedAndToldAsTwistedDoes(end):
    """
    However a batched TLS connection ends, its protocol is told the reason
    Twisted tells (but for a reply that fails first), and nothing of the
    batching keeps the connection (and OpenSSL's buffers) until a collection:
    no cycle through it, and a stored error never raised keeps no traceback.
    """
    freed, reason = _endedWith(end, batched=True)
    if end != "reply":  # (the reply fails first: OpenSSL read the bad record with the rest)
        assert reason == _endedWith(end, batched=False)[1]
    if end != "raise":  # (Twisted's own failure then keeps it, in its frames)
        assert freed


def test_theEndOfTLSAfterRecordsComesAfterThem(monkeypatch):
    """Records and the client's close_notify in one read: the records, then a clean end."""
    pair, reads, lost = _readingPair(monkeypatch)
    pair.client.write(b"a1 LOGOUT\r\n")
    pair.client.loseConnection()
    pair.server.dataReceived(_sent(pair))
    assert pair.serverApp.received == [b"a1 LOGOUT\r\n"]
    assert pair.serverWire.disconnecting
    pair.server.connectionLost(Failure(ConnectionDone()))
    (reason,) = lost
    assert reason.check(ConnectionDone)


# -- eager TCP writes -------------------------------------------------------------


def test_nothingIsSentAfterAbortConnection(relay):
    """
    ``abortConnection`` sets ``_aborting``, not ``disconnecting``, and cuts the
    connection on the next reactor turn: a write in between (a client's
    command relayed in the same turn as Splice.close()'s abort of a plain
    upstream) must not reach the peer, on either path.
    """
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        b.setblocking(False)
        conn = tcp.Connection(a, Protocol(), MemoryReactorClock())
        conn.connected = 1
        _fast.eagerWrites(conn)
        assert bool(vars(conn).get("_imapproxyEager")) == (relay == "fast")
        conn.write(b"a1 NOOP\r\n")
        if relay == "fast":
            assert b.recv(100) == b"a1 NOOP\r\n"  # sent at once, no reactor turn
        conn.abortConnection()
        conn.write(b"A1 DELETE INBOX\r\n")
        with pytest.raises(BlockingIOError):
            b.recv(1000)
    finally:
        a.close()
        b.close()
