"""
Review findings in the SMTP front door, each pinned by a test over a
``StringTransport``: the EHLO a client was given must not promise what its
account's provider lacks (a provider new to the proxy), and an AUTH line
of RFC 4954's 12288 octets is read.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy.cred import ISubmissionSession
from proxy.errors import AccessDenied
from proxy.imap import ServerPolicy
from proxy.limits import SMTP, ConnectionLimiter, LimitedFactory, Limits
from proxy.smtp import Features, ProviderExtensions, SubmissionFactory, SubmissionServer
from tests.test_imap import TOKEN, FakePortal, FakeUpstream
from tests.test_smtp import FakeSubmission, SMTPTestCase, b64

KNOWN = [b"SIZE 35882577", b"8BITMIME", b"PIPELINING", b"CHUNKING", b"SMTPUTF8"]
# A server added while the proxy runs, not probed yet: fewer extensions, a smaller SIZE.
NEW = [b"SIZE 1000", b"8BITMIME", b"PIPELINING", b"AUTH XOAUTH2"]


class FeaturesWithinTests(SMTPTestCase):
    def test_within(self):
        """An offer is within a server's features when it promises nothing more."""
        known = Features.parse(KNOWN)
        new = Features.parse(NEW)
        self.assertTrue(new.within(known))
        self.assertFalse(known.within(new))
        self.assertTrue(Features.parse([]).within(new))
        # SIZE: a larger limit, or none stated, promises more than a stated one.
        self.assertFalse(Features.parse([b"SIZE 2000"]).within(Features.parse([b"SIZE 1000"])))
        self.assertFalse(Features.parse([b"SIZE"]).within(Features.parse([b"SIZE 1000"])))
        self.assertTrue(Features.parse([b"SIZE 1000"]).within(Features.parse([b"SIZE"])))


class NewProviderTests(SMTPTestCase):
    def connectKnowing(self) -> None:
        extensions = ProviderExtensions()
        extensions.learn("smtp.known:465", KNOWN)
        self.greeted(ehlo=False, extensions=extensions, policy=ServerPolicy(maxFailedLogins=1))
        self.send(b"EHLO client.example\r\n")
        self.assertIn(b"250-SMTPUTF8", self.output())

    def test_offerBeyondNewProviderRefusedOnce(self):
        """
        A client offered SMTPUTF8, CHUNKING and a larger SIZE than its
        account's server (new to the proxy) has is not spliced to it: 454,
        the upstream session is logged out, the server is learned, and the
        next EHLO and AUTH on the same connection go through.
        """
        self.connectKnowing()
        d = self.authPlain()
        first = self.succeed(d, server="smtp.new:587", extensions=list(NEW))
        reply = self.lines()
        self.assertEqual(len(reply), 1)
        self.assertTrue(reply[0].startswith(b"454 4.7.0 "), reply)
        self.assertEqual(first.loggedOut, 1)
        self.assertEqual(len(self.sessions), 0)
        self.assertIsNone(self.server.splice)
        # Not a failed login: maxFailedLogins=1 would have closed the connection.
        self.assertEqual(self.server._phase, "preauth")
        self.assertEqual(self.extensions.offered(), [b"SIZE 1000", b"8BITMIME", b"PIPELINING"])
        self.send(b"EHLO client.example\r\n")
        self.assertNotIn(b"SMTPUTF8", self.output())
        upstream = FakeUpstream()
        second = self.succeed(self.authPlain(), upstream, server="smtp.new:587", extensions=NEW)
        self.assertEqual(self.lines(), [b"235 2.7.0 Authentication successful"])
        self.assertEqual(second.loggedOut, 0)
        self.assertIsNotNone(self.server.splice)

    def test_heldBytesNotSpliced(self):
        """What was pipelined behind that AUTH is not sent to the provider."""
        self.connectKnowing()
        upstream = FakeUpstream()
        d = self.authPlain(b"MAIL FROM:<a@example.com> SMTPUTF8\r\n")
        self.succeed(d, upstream, server="smtp.new:587", extensions=list(NEW))
        self.assertEqual(upstream.transport.value(), b"")
        lines = self.lines()
        self.assertTrue(lines[0].startswith(b"454 4.7.0 "), lines)
        self.assertEqual(lines[1:], [b"530 5.7.0 Authentication required"])

    def test_offerWithinSpliced(self):
        """A server with all that was offered (and a larger SIZE) is spliced at once."""
        self.connectKnowing()
        bigger = [*KNOWN, b"DSN"]
        bigger[0] = b"SIZE 157286400"
        self.succeed(self.authPlain(), server="smtp.other:587", extensions=bigger)
        self.assertEqual(self.lines(), [b"235 2.7.0 Authentication successful"])


class AuthLineLengthTests(SMTPTestCase):
    def test_authLineOf12288Octets(self):
        """RFC 4954 section 4: an AUTH command line may be 12288 octets, CRLF included."""
        self.greeted(policy=ServerPolicy(maxLineLength=8192))
        head = b"AUTH PLAIN "
        # 9204 octets are 12272 in base64: the line is 12285 octets with its CRLF.
        raw = b"\0alice\0" + TOKEN.encode()
        raw += b"x" * (9204 - len(raw))
        line = head + b64(raw)
        self.assertEqual(len(line) + 2, 12285)
        self.send(line + b"\r\n")
        self.assertEqual(self.output(), b"")
        self.assertEqual(len(self.portal.logins), 1)

    def test_longerStillRefused(self):
        """A line past that is still too long."""
        self.greeted(policy=ServerPolicy(maxLineLength=8192))
        self.send(b"AUTH PLAIN " + b"A" * 12290 + b"\r\n")
        self.assertEqual(self.lines(), [b"500 5.5.6 Line too long"])
        self.assertEqual(self.portal.logins, [])

    def test_loginContinuation(self):
        """AUTH LOGIN's password response line may be as long."""
        self.greeted(policy=ServerPolicy(maxLineLength=8192))
        self.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
        self.output()
        self.send(b64(b"t" * 9000) + b"\r\n")
        self.assertEqual(self.output(), b"")
        self.assertEqual(len(self.portal.logins), 1)


class LimiterCountTests(SynchronousTestCase):
    def test_preauthUntil235(self):
        """
        The limiter counts the connection as pre-auth through the login and
        a 454 for a changed offer, and no longer once the 235 is sent.
        """
        clock = task.Clock()
        extensions = ProviderExtensions()
        extensions.learn("smtp.known:465", KNOWN)
        factory = SubmissionFactory(
            FakePortal(), ServerPolicy(), extensions=extensions, hostname="mx.test", clock=clock
        )
        limiter = ConnectionLimiter(Limits(), clock, "SMTP")
        front = LimitedFactory(factory, limiter, SMTP)
        addr = IPv4Address("TCP", "127.0.0.1", 1)
        wrapper = front.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        wrapper.makeConnection(transport)
        server = wrapper.wrappedProtocol
        login = b"AUTH PLAIN " + b64(b"\0alice\0" + TOKEN.encode()) + b"\r\n"
        wrapper.dataReceived(b"EHLO client.example\r\n" + login)
        self.assertEqual(limiter.preauth, 1)
        first = FakeSubmission(FakeUpstream(), server="smtp.new:587", extensions=list(NEW))
        factory.portal.logins[-1][3].callback((ISubmissionSession, first, first.logout))
        self.assertEqual(limiter.preauth, 1)
        wrapper.dataReceived(b"EHLO client.example\r\n" + login)
        second = FakeSubmission(FakeUpstream(), server="smtp.new:587", extensions=list(NEW))
        factory.portal.logins[-1][3].callback((ISubmissionSession, second, second.logout))
        self.assertTrue(transport.value().endswith(b"235 2.7.0 Authentication successful\r\n"))
        self.assertEqual(limiter.preauth, 0)
        self.assertEqual(limiter.open, 1)
        server.connectionLost(Failure(ConnectionDone()))
        wrapper.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(limiter.open, 0)
        for call in clock.getDelayedCalls():
            call.cancel()


class ReadingDuringLoginTests(SMTPTestCase):
    def test_readsOnWhileLoggingIn(self):
        """
        Reading goes on during the provider login (so a client that leaves
        is seen, and its held bytes never reach the provider), held unparsed.
        """
        self.greeted()
        d = self.authPlain(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"RCPT TO:<b@example.com>\r\n")
        self.assertEqual(self.output(), b"")
        self.server.connectionLost(Failure(ConnectionDone()))
        upstream = FakeUpstream()
        session = self.succeed(d, upstream)
        self.assertEqual(session.loggedOut, 1)
        self.assertEqual(upstream.transport.value(), b"")

    def test_pausedPastTheHoldLimit(self):
        """Past ``MAX_HELD`` octets behind the AUTH reading stops; all of it goes upstream."""
        self.greeted()
        d = self.authPlain()
        chunk = b"x" * 4096
        sent = b""
        while self.transport.producerState == "producing":
            self.send(chunk)
            sent += chunk
            self.assertLessEqual(len(sent), SubmissionServer.MAX_HELD + len(chunk))
        self.assertGreater(len(sent), SubmissionServer.MAX_HELD)
        upstream = FakeUpstream()
        self.succeed(d, upstream)
        self.assertEqual(upstream.transport.value(), sent)
        self.assertEqual(self.transport.producerState, "producing")

    def test_refusedThenParsed(self):
        """After a refusal what was held is read as commands, reading on."""
        self.greeted()
        d = self.authPlain(b"NOOP\r\n")
        d.errback(AccessDenied("scope"))
        self.assertEqual(self.lines()[1:], [b"250 2.0.0 Ok"])
        self.assertEqual(self.transport.producerState, "producing")


class CompletionErrorTests(SMTPTestCase):
    def test_bugAfterLoginClosesAndLogsOut(self):
        """
        A bug while completing a login (here learning the provider's EHLO):
        421 at once rather than a client left waiting for the login timeout,
        the provider session logged out, one log line without a traceback.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.greeted()

        def broken(server: str, extensions: object) -> None:
            raise RuntimeError("broken " + TOKEN)

        self.extensions.learn = broken  # type: ignore[method-assign]
        session = self.succeed(self.authPlain())
        self.assertEqual(self.lines(), [b"421 4.3.0 mx.test Internal error"])
        self.assertEqual(session.loggedOut, 1)
        self.assertEqual(len(self.sessions), 0)
        errors = [
            e
            for e in events
            if e.get("log_level") is not None and e["log_level"].name in ("error", "critical")
        ]
        self.assertEqual(len(errors), 1, errors)
        self.assertNotIn("log_failure", errors[0])
        self.assertNotIn(TOKEN, repr(events))

    def test_bugAfterMarkedSplicedClosesAndLogsOut(self):
        """
        A bug after the connection was marked spliced but before the splice
        exists (here the registry refusing it): still a 421 and a close, not
        a client left with no answer and no login timer.
        """
        self.greeted()

        def broken(session: object, splice: object) -> None:
            raise RuntimeError("broken")

        self.sessions.add = broken  # type: ignore[method-assign]
        session = self.succeed(self.authPlain())
        lines = self.lines()
        self.assertEqual(lines[-1], b"421 4.3.0 mx.test Internal error")
        self.assertEqual(session.loggedOut, 1)
        self.assertTrue(self.transport.disconnecting)
