"""
The IMAP front door while a login runs: the client is still read (so a
client that leaves is seen), what it pipelined behind LOGIN is held
unparsed up to ``MAX_HELD``, and a client gone before the provider's
answer gets no splice: its held commands never reach the provider.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from proxy.cred import IUpstreamSession
from proxy.imap import ProxyServer
from tests.test_imap import TOKEN, FakeSession, FakeUpstream, ProxyServerTestCase


class HeldWhileLoggingInTests(ProxyServerTestCase):
    def clientCloses(self) -> None:
        """
        The client closes its end: the reactor reports it only while it
        reads the connection (a paused transport is not read).
        """
        if self.transport.producerState == "producing":
            self.server.connectionLost(Failure(ConnectionDone()))

    def test_clientGoneBeforeTheAnswer(self):
        """A client gone while the provider login runs: no splice, the session logged out."""
        self.greeted()
        pipelined = b"b SELECT INBOX\r\nc STORE 1 +FLAGS (\\Deleted)\r\n"
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n" + pipelined)
        _, d = self.lastLogin()
        self.clientCloses()
        upstream = FakeUpstream()
        session = self.succeed(d, upstream)
        self.assertEqual(session.loggedOut, 1)
        self.assertIsNone(self.server.splice)
        self.assertEqual(upstream.transport.value(), b"")
        self.assertEqual(self.output(), b"")
        self.assertEqual(len(self.sessions), 0)

    def test_pausedPastTheHoldLimit(self):
        """Past ``MAX_HELD`` octets behind the LOGIN reading stops; all of it goes upstream."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        _, d = self.lastLogin()
        sent = b"b NOOP\r\n"
        chunk = b"c APPEND x {4096+}\r\n" + b"y" * 4075 + b"\r\n"
        while self.transport.producerState == "producing":
            self.send(chunk)
            sent += chunk
            self.assertLessEqual(len(sent), ProxyServer.MAX_HELD + 2 * len(chunk))
        self.assertGreater(len(sent), ProxyServer.MAX_HELD)
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(upstream.transport.value(), sent)
        self.assertEqual(self.transport.producerState, "producing")

    def test_heldParsedAfterARefusal(self):
        """After a refusal the held commands are parsed in order, and reading goes on."""
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\nb NOOP\r\n")
        _, d = self.lastLogin()
        self.send(b"c NOOP\r\n")
        self.assertEqual(self.output(), b"")
        d.errback(RuntimeError("a bug"))
        self.assertEqual(
            self.lines(),
            [
                b"a NO [UNAVAILABLE] Internal error, try again later",
                b"b OK NOOP No operation performed",
                b"c OK NOOP No operation performed",
            ],
        )
        self.assertEqual(self.transport.producerState, "producing")

    def test_unexpectedErrorOneLine(self):
        """A bug while logging in: one error line naming it, no traceback, no token."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        self.lastLogin()[1].errback(RuntimeError("the token was " + TOKEN))
        self.assertEqual(self.flushLoggedErrors(), [])
        errors = [e for e in events if e["log_level"].name in ("error", "critical")]
        self.assertEqual(len(errors), 1, errors)
        self.assertNotIn("log_failure", errors[0])
        self.assertEqual(errors[0]["error"], "RuntimeError")
        self.assertNotIn(TOKEN, repr(events))

    def test_bugWhileCompletingOneLine(self):
        """A bug after the provider's answer: one log line, BYE, the session logged out."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        session = BrokenSession(FakeUpstream())
        d.callback((IUpstreamSession, session, session.logout))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.lines(), [b"* BYE Internal error"])
        self.assertEqual(session.loggedOut, 1)
        self.assertIsNone(self.server.splice)
        errors = [e for e in events if e["log_level"].name in ("error", "critical")]
        self.assertEqual([e["error"] for e in errors], ["RuntimeError"])
        self.assertNotIn("log_failure", errors[0])
        self.clock.advance(ProxyServer.BYE_GRACE)


class BrokenSession(FakeSession):
    @property
    def capabilities(self) -> list[bytes]:
        raise RuntimeError("a bug")
