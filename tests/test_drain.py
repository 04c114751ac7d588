"""
Tests for the graceful stop: where a spliced session may be ended with a
``* BYE`` / ``421`` of the proxy's own (``relay.boundary``, ``Splice.
closeWhenIdle``), the line a client reads when the provider's side is lost,
the registry's drain and the stop sequence (``proxy.drain``), over
``StringTransport`` and a ``task.Clock``.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from proxy.drain import Drain
from proxy.imap.sessions import SHUTDOWN_BYE, SessionRegistry
from proxy.relay import Splice
from proxy.startup import ProxyService

BYE = SHUTDOWN_BYE + b"\r\n"
SMTP_BYE = b"421 4.3.2 mx.example Service shutting down\r\n"
LOST_IMAP = b"* BYE [UNAVAILABLE] Connection to the provider lost\r\n"
LOST_SMTP = b"421 4.4.2 mx.example Connection to the provider lost\r\n"


class Side(Protocol):
    """One leg of the proxy, as ``ProxyServer``/``UpstreamProtocol`` behave once spliced."""

    hostname = b"mx.example"

    def __init__(self) -> None:
        self.sink: Any = None
        self.onLost: Any = None
        self.bytesReceived = 0
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        self.sink(data)

    def takeOver(self, sink: Any, onLost: Any) -> bytes:
        self.sink, self.onLost = sink, onLost
        return b""

    def connectionLost(self, reason: Any = None) -> None:
        if self.onLost is not None:
            self.onLost(reason)


class Pair:
    """A spliced session over two ``StringTransport``s: what each end reads, and its state."""

    def __init__(self, protocol: str = "imap", cls: type[Splice] = Splice) -> None:
        self.clock = task.Clock()
        self.client, self.upstream = Side(), Side()
        self.ct, self.ut = StringTransport(), StringTransport()
        self.client.makeConnection(self.ct)
        self.upstream.makeConnection(self.ut)
        self.ended: list[Splice] = []
        self.registry: SessionRegistry | None = None
        self.splice = cls(
            self.client,
            self.upstream,
            "test",
            self._ended,
            self.clock.callLater,
            {"protocol": protocol, "account": "alice", "token_id": "t", "client": "c"},
            self.clock.seconds,
            protocol=protocol,
        )
        self.client.onLost = lambda reason: self.splice.clientLost()
        self.splice.start(b"")

    def _ended(self, splice: Splice) -> None:
        self.ended.append(splice)
        if self.registry is not None:
            self.registry.discard(Session(), splice)

    def fromClient(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def fromProvider(self, data: bytes) -> None:
        self.upstream.dataReceived(data)

    def clientRead(self) -> bytes:
        return self.ct.value()

    @property
    def providerCut(self) -> bool:
        return bool(self.ut.disconnecting)

    def bothLost(self) -> None:
        """The transports report the closes the splice asked for."""
        self.upstream.connectionLost(None)
        self.client.connectionLost(None)


FETCH = b"a2 FETCH 1 BODY[]\r\n"
BODY = b"x" * 100
RESPONSE = b"* 1 FETCH (BODY[] {100}\r\n" + BODY + b")\r\n"


# -- IMAP: where the BYE goes ---------------------------------------------------


def test_idleSessionGetsByeAtOnce():
    """Between commands, the client reads the BYE at once and the provider's side is cut."""
    p = Pair()
    p.fromClient(b"a1 NOOP\r\n")
    p.fromProvider(b"a1 OK NOOP done\r\n")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert p.clientRead() == b"a1 OK NOOP done\r\n" + BYE
    assert p.providerCut and p.ct.disconnecting
    assert p.splice.closedBy == "shutdown"


def test_byeWaitsForTheLiteralAndTheTaggedAnswer():
    """Mid-literal nothing is added; the BYE follows the FETCH's tagged OK, right after it."""
    p = Pair()
    p.fromClient(FETCH)
    p.fromProvider(RESPONSE[:60])
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    p.fromProvider(RESPONSE[60:])
    assert BYE not in p.clientRead()  # a whole response, but the command is still in flight
    assert not p.providerCut
    p.fromProvider(b"a2 OK FETCH done\r\n")
    assert p.clientRead() == RESPONSE + b"a2 OK FETCH done\r\n" + BYE
    assert p.providerCut


def test_byeOnlyAtTheEndWhateverTheReads():
    """Cut into one-byte reads, a FETCH gets the BYE after its last byte, never before."""
    p = Pair()
    p.fromClient(FETCH)
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    stream = b"* 3 EXISTS\r\n" + RESPONSE + b"a2 OK FETCH done\r\n"
    for i in range(len(stream)):
        assert BYE not in p.clientRead(), i
        p.fromProvider(stream[i : i + 1])
    assert p.clientRead() == stream + BYE


def test_commandInFlightWaits():
    """A command sent and not answered yet (a slow SEARCH) is waited for; so is a pipelined one."""
    p = Pair()
    p.fromClient(b"a3 SEARCH ALL\r\na4 NOOP\r\n")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert p.clientRead() == b""
    p.fromProvider(b"* SEARCH 1 2\r\na3 OK done\r\n")
    assert BYE not in p.clientRead()
    p.fromProvider(b"a4 OK done\r\n")
    assert p.clientRead().endswith(b"a4 OK done\r\n" + BYE)


def test_clientMidCommandWaits():
    """A client sending an APPEND literal is not interrupted: the BYE waits for its answer."""
    p = Pair()
    p.fromClient(b"a5 APPEND INBOX {10}\r\n")
    p.fromProvider(b"+ go ahead\r\n")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    p.fromClient(b"12345")
    assert BYE not in p.clientRead()
    p.fromClient(b"67890\r\n")
    assert BYE not in p.clientRead()
    p.fromProvider(b"a5 OK APPEND done\r\n")
    assert p.clientRead().endswith(b"a5 OK APPEND done\r\n" + BYE)
    assert p.ut.value() == b"a5 APPEND INBOX {10}\r\n1234567890\r\n"


def test_idleIsIdle():
    """A client in IDLE reads the BYE at once, even before the server's continuation."""
    p = Pair()
    p.fromClient(b"a6 IDLE\r\n")
    p.fromProvider(b"+ idling\r\n* 4 EXISTS\r\n")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert p.clientRead() == b"+ idling\r\n* 4 EXISTS\r\n" + BYE
    q = Pair()
    q.fromClient(b"a6 IDLE\r\n")
    q.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert q.clientRead() == BYE


def test_idleEndedWaitsForItsAnswer():
    """After DONE the IDLE's tagged OK is in flight: the BYE comes after it."""
    p = Pair()
    p.fromClient(b"a7 idle\r\n")
    p.fromProvider(b"+ idling\r\n")
    p.fromClient(b"DONE\r\n")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert BYE not in p.clientRead()
    p.fromProvider(b"a7 OK IDLE terminated\r\n")
    assert p.clientRead() == b"+ idling\r\na7 OK IDLE terminated\r\n" + BYE


def test_untaggedUpdateMidLineWaits():
    """An untagged response cut in the middle of its line is finished first, in IDLE too."""
    p = Pair()
    p.fromClient(b"a8 IDLE\r\n")
    p.fromProvider(b"+ idling\r\n* 5 FETCH (FL")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert BYE not in p.clientRead()
    p.fromProvider(b"AGS (\\Seen))\r\n")
    assert p.clientRead().endswith(b"(\\Seen))\r\n" + BYE)


def test_trackingSeesWhatTheClientGets():
    """A subclass's sink (here: one read late) feeds the tracking, not the other way round."""

    class Late(Splice):
        held = b""

        def toClientSink(self, write: Any) -> Any:
            def late(data: bytes) -> None:
                if self.held:
                    write(self.held)
                self.held = data

            return late

    p = Pair(cls=Late)
    p.fromClient(b"a1 NOOP\r\n")
    p.fromProvider(b"a1 OK")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    p.fromProvider(b" done\r\n")
    assert p.clientRead() == b"a1 OK"  # the rest is still in the subclass's hands
    p.fromProvider(b"* 1 EXISTS\r\n")
    assert p.clientRead() == b"a1 OK done\r\n" + BYE


def test_commandsCountedAsTheClientSendsThem():
    """A command a subclass answers itself (a refusal) counts, and so does its answer."""

    class Refusing(Splice):
        def toClientSink(self, write: Any) -> Any:
            self.toClientWriter = write
            return write

        def toUpstreamSink(self, write: Any) -> Any:
            def refuse(data: bytes) -> None:
                if data.startswith(b"x "):
                    self.toClientWriter(b"x NO refused\r\n")
                else:
                    write(data)

            return refuse

    p = Pair(cls=Refusing)
    p.fromClient(FETCH)
    p.fromClient(b"x DELETE Trash\r\n")
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert p.clientRead() == b"x NO refused\r\n"  # the FETCH is still in flight
    p.fromProvider(RESPONSE + b"a2 OK done\r\n")
    assert p.clientRead() == b"x NO refused\r\n" + RESPONSE + b"a2 OK done\r\n" + BYE


def test_askedBeforeTheSpliceStarts():
    """A session asked to end before it starts (a login during the drain) ends right after."""
    p = Pair.__new__(Pair)
    p.clock = task.Clock()
    p.client, p.upstream = Side(), Side()
    p.ct, p.ut = StringTransport(), StringTransport()
    p.client.makeConnection(p.ct)
    p.upstream.makeConnection(p.ut)
    p.splice = Splice(p.client, p.upstream, "t", None, p.clock.callLater, None, p.clock.seconds)
    p.splice.closeWhenIdle(SHUTDOWN_BYE)
    assert p.clientRead() == b""
    p.splice.start(b"a1 NOOP\r\n")
    assert p.clientRead() == b"" and p.ut.value() == b"a1 NOOP\r\n"
    p.fromProvider(b"a1 OK\r\n")
    assert p.clientRead() == b"a1 OK\r\n" + BYE


# -- the provider's side lost ---------------------------------------------------


def test_providerLostBetweenResponses():
    """The provider gone between responses: the client reads a BYE, then the close."""
    p = Pair()
    p.fromClient(FETCH)
    p.fromProvider(RESPONSE)
    p.upstream.connectionLost(None)
    assert p.clientRead() == RESPONSE + LOST_IMAP
    assert p.ct.disconnecting and p.splice.closedBy == "provider"


def test_providerLostMidLiteral():
    """The provider gone mid-literal: a partial literal cannot be completed; closed as it is."""
    p = Pair()
    p.fromClient(FETCH)
    p.fromProvider(RESPONSE[:60])
    p.upstream.connectionLost(None)
    assert p.clientRead() == RESPONSE[:60]
    assert p.ct.disconnecting


def test_providerLostAfterItsOwnBye():
    """After a LOGOUT, the provider's close is its goodbye: no BYE of the proxy's after it."""
    p = Pair()
    p.fromClient(b"a9 LOGOUT\r\n")
    p.fromProvider(b"* BYE Logging out\r\na9 OK Logout completed.\r\n")
    p.upstream.connectionLost(None)
    assert p.clientRead() == b"* BYE Logging out\r\na9 OK Logout completed.\r\n"


def test_providerLostAfterItsOwnByeCutAcrossReads():
    """The provider's last response a BYE (in two reads): no BYE of the proxy's after it."""
    p = Pair()
    p.fromClient(b"a1 NOOP\r\n")
    p.fromProvider(b"a1 OK done\r\n* BY")
    p.fromProvider(b"E Server shutting down.\r\n")
    p.upstream.connectionLost(None)
    assert p.clientRead() == b"a1 OK done\r\n* BYE Server shutting down.\r\n"


def test_smtpProviderLost():
    """SMTP: the provider gone between replies gives 421; after its own 221, nothing more."""
    p = Pair("smtp")
    p.fromClient(b"NOOP\r\n")
    p.fromProvider(b"250 2.0.0 OK\r\n")
    p.upstream.connectionLost(None)
    assert p.clientRead() == b"250 2.0.0 OK\r\n" + LOST_SMTP
    q = Pair("smtp")
    q.fromClient(b"QUIT\r\n")
    q.fromProvider(b"221 2.0.0 Bye\r\n")
    q.upstream.connectionLost(None)
    assert q.clientRead() == b"221 2.0.0 Bye\r\n"
    r = Pair("smtp")
    r.fromClient(b"EHLO x\r\n")
    r.fromProvider(b"250-mx\r\n250-PIPEL")
    r.upstream.connectionLost(None)
    assert r.clientRead() == b"250-mx\r\n250-PIPEL"


# -- SMTP: where the 421 goes ---------------------------------------------------


def smtpLine() -> bytes:
    return SMTP_BYE.rstrip(b"\r\n")


def test_smtpIdleGets421AtOnce():
    """A logged-in SMTP session between transactions reads the 421 at once."""
    p = Pair("smtp")
    p.fromClient(b"EHLO x\r\n")
    p.fromProvider(b"250-mx\r\n250 PIPELINING\r\n")
    p.splice.closeWhenIdle(smtpLine())
    assert p.clientRead() == b"250-mx\r\n250 PIPELINING\r\n" + SMTP_BYE
    assert p.providerCut


def test_smtpTransactionWaits():
    """A message on its way (MAIL to the end of DATA) is let through, then 421."""
    p = Pair("smtp")
    p.fromClient(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    p.fromProvider(b"250 2.1.0 Ok\r\n")
    p.splice.closeWhenIdle(smtpLine())
    p.fromProvider(b"250 2.1.5 Ok\r\n")
    assert SMTP_BYE not in p.clientRead()  # the transaction is open
    p.fromClient(b"DATA\r\n")
    p.fromProvider(b"354 go ahead\r\n")
    p.fromClient(b"Subject: hi\r\n\r\nbody\r\n.")
    p.fromClient(b"..not the end\r\n")
    assert SMTP_BYE not in p.clientRead()
    p.fromClient(b".\r")
    p.fromClient(b"\n")
    assert SMTP_BYE not in p.clientRead()  # the content's reply is in flight
    p.fromProvider(b"250 2.0.0 queued\r\n")
    assert p.clientRead().endswith(b"250 2.0.0 queued\r\n" + SMTP_BYE)


def test_smtpRefusedMailAndRset():
    """A refused MAIL opens no transaction; RSET ends one."""
    p = Pair("smtp")
    p.fromClient(b"MAIL FROM:<a@x>\r\n")
    p.fromProvider(b"550 5.7.1 no\r\n")
    p.splice.closeWhenIdle(smtpLine())
    assert p.clientRead().endswith(SMTP_BYE)
    q = Pair("smtp")
    q.fromClient(b"MAIL FROM:<a@x>\r\n")
    q.fromProvider(b"250 Ok\r\n")
    q.splice.closeWhenIdle(smtpLine())
    q.fromClient(b"RSET\r\n")
    assert SMTP_BYE not in q.clientRead()
    q.fromProvider(b"250 Ok\r\n")
    assert q.clientRead().endswith(SMTP_BYE)


def test_smtpBdat():
    """BDAT chunks are counted bytes (a CRLF.CRLF inside is content); LAST ends the transaction."""
    p = Pair("smtp")
    p.fromClient(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    p.fromProvider(b"250 Ok\r\n250 Ok\r\n")
    p.splice.closeWhenIdle(smtpLine())
    chunk = b"a\r\n.\r\nQUIT\r\n"
    p.fromClient(b"BDAT %d\r\n" % len(chunk) + chunk[:4])
    p.fromClient(chunk[4:])
    p.fromProvider(b"250 2.0.0 chunk\r\n")
    assert SMTP_BYE not in p.clientRead()
    p.fromClient(b"BDAT 0 LAST\r\n")
    p.fromProvider(b"250 2.0.0 queued\r\n")
    assert p.clientRead().endswith(b"queued\r\n" + SMTP_BYE)


def test_smtpDataRefused():
    """DATA refused (no 354): the client's next line is a command again, not content."""
    p = Pair("smtp")
    p.fromClient(b"DATA\r\n")
    p.fromProvider(b"554 5.5.1 no valid recipients\r\n")
    p.fromClient(b"NOOP\r\n")
    p.splice.closeWhenIdle(smtpLine())
    assert SMTP_BYE not in p.clientRead()
    p.fromProvider(b"250 Ok\r\n")
    assert p.clientRead().endswith(SMTP_BYE)


# -- the registry and the drain -------------------------------------------------


class Session:
    account = "alice"
    tokenId = "t1"
    server = "mx.example:587"


@pytest.fixture
def events():
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def registered(reg: SessionRegistry, p: Pair) -> Pair:
    reg.add(Session(), p.splice)
    p.registry = reg
    return p


def test_drainEndsIdleSessionsAndWaitsForTheirClose(events):
    """Idle sessions get BYE at once; the drain ends once both sides are closed, no cut."""
    clock = task.Clock()
    reg = SessionRegistry(clock=clock)
    sessions = [registered(reg, Pair()) for _ in range(3)]
    drain = Drain(reg, 30.0, clock)
    done = drain.run()
    assert all(p.clientRead() == BYE for p in sessions)
    assert not done.called
    for p in sessions:
        p.bothLost()
    assert done.called and not clock.getDelayedCalls()
    ends = [e for e in events if e.get("event") == "session-end"]
    assert [e["closed_by"] for e in ends] == ["shutdown"] * 3
    (end,) = [e for e in events if e.get("event") == "drain" and e["phase"] == "end"]
    assert (end["sessions"], end["cut"]) == (3, 0)


def test_drainTimeoutCutsWhatRemains(events):
    """A transfer not done by the drain timeout is cut, without a BYE in its literal."""
    clock = task.Clock()
    reg = SessionRegistry(clock=clock)
    busy = registered(reg, Pair())
    busy.fromClient(FETCH)
    busy.fromProvider(RESPONSE[:60])
    done = Drain(reg, 30.0, clock).run()
    clock.advance(29.9)
    assert not done.called and not busy.providerCut
    clock.advance(0.1)
    assert done.called
    assert busy.clientRead() == RESPONSE[:60]
    assert busy.providerCut and busy.ct.disconnecting
    busy.bothLost()
    assert busy.splice.closedBy == "shutdown"
    (end,) = [e for e in events if e.get("event") == "drain" and e["phase"] == "end"]
    assert (end["sessions"], end["cut"]) == (0, 1)
    assert not [c for c in clock.getDelayedCalls() if c.active()][1:]  # only the 5s client cut


class ThreadedClock(task.Clock):
    """A clock that also runs what a signal handler hands the reactor."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_secondSignalCutsAtOnce():
    """While draining, a second SIGTERM cuts what is left at once; the handlers come back."""
    clock = ThreadedClock()
    reg = SessionRegistry(clock=clock)
    busy = registered(reg, Pair())
    busy.fromClient(FETCH)
    before = signal.getsignal(signal.SIGTERM)
    done = Drain(reg, 30.0, clock, signals=True).run()
    assert signal.getsignal(signal.SIGTERM) != before
    assert not done.called
    os.kill(os.getpid(), signal.SIGTERM)
    assert done.called and busy.providerCut
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGINT) is not None


def test_drainWithNothingToDo():
    """No session: the drain is done at once, with no timer left."""
    clock = task.Clock()
    done = Drain(SessionRegistry(clock=clock), 30.0, clock).run()
    assert done.called and not clock.getDelayedCalls()


def test_loginDuringTheDrainEndsAfterItsOk():
    """A session spliced while draining is asked at once, and counted by the drain."""
    clock = task.Clock()
    reg = SessionRegistry(clock=clock)
    drain = Drain(reg, 30.0, clock)
    first = registered(reg, Pair())
    first.fromClient(FETCH)
    done = drain.run()
    late = registered(reg, Pair())
    assert late.clientRead() == BYE
    late.bothLost()
    first.fromProvider(RESPONSE + b"a2 OK\r\n")
    assert first.clientRead().endswith(b"a2 OK\r\n" + BYE)
    assert not done.called
    first.bothLost()
    assert done.called


def test_smtpShutdownLine():
    """An SMTP session's last line is 421 4.3.2 with the front door's name."""
    clock = task.Clock()
    reg = SessionRegistry(clock=clock)
    p = Pair("smtp")
    from zope.interface import directlyProvides

    from proxy.realm import ISubmissionSession

    s = Session()
    directlyProvides(s, ISubmissionSession)
    reg.add(s, p.splice)
    Drain(reg, 30.0, clock).run()
    assert p.clientRead() == SMTP_BYE


# -- the stop sequence ------------------------------------------------------------


class Recorder(Service):
    def __init__(self, name: str, log: list[str], result: Any = None) -> None:
        self.name, self.log, self.result = name, log, result

    def stopService(self) -> Any:
        super().stopService()
        self.log.append(self.name)
        return self.result


def test_stopOrder():
    """Front doors first, then the drain (waited for), then the others in reverse order."""
    order: list[str] = []
    top = ProxyService()
    Recorder("store", order).setServiceParent(top)
    closing: Deferred[None] = Deferred()
    door = Recorder("imap", order, closing)
    for what, service in (("IMAP", door), ("API", Recorder("api", order))):
        service.setServiceParent(top)
        top.listenerServices.append((what, service))
    Recorder("smtp", order, succeed(None)).setServiceParent(top)
    top.listenerServices.append(("SMTP", top.services[-1]))

    class FakeDrain(Drain):
        def run(self) -> Deferred[None]:
            order.append("drain")
            self.ran = Deferred()
            return self.ran

    drain = FakeDrain(None, 30.0, task.Clock())
    top.drain = drain
    top.startService()
    stopped: list[Any] = []
    top.stopService().addBoth(stopped.append)
    assert order == ["imap", "smtp"]  # the front doors are closing
    closing.callback(None)
    assert order == ["imap", "smtp", "drain"]
    assert not stopped
    drain.ran.callback(None)
    assert order == ["imap", "smtp", "drain", "api", "store"]
    assert len(stopped) == 1


def test_healthSaysDraining():
    """While draining, /health answers 503 draining (a load balancer's HTTP check fails)."""
    from treq.testing import StubTreq

    from proxy.admin import Admin
    from proxy.web import TokenAPI

    class Store:
        """A store that answers: only the drain can make /health fail."""

        def getToken(self, tokenId: str) -> Deferred[None]:
            return succeed(None)

    clock = task.Clock()
    reg = SessionRegistry(clock=clock)
    api = TokenAPI(Admin(Store(), reg, clock), clock)
    stub = StubTreq(api.app.resource())

    def health() -> tuple[int, Any]:
        d = stub.get("http://127.0.0.1/health")
        response = _result(d)
        return response.code, json.loads(_result(stub.content(response)))

    assert health() == (200, {"status": "ok"})
    Drain(reg, 30.0, clock).run()
    assert health() == (503, {"status": "draining", "statusCode": 503})


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]
