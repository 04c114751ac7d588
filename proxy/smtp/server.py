"""
The client side of SMTP submission: a server that speaks SMTP only until
the AUTH (RFC 5321, 4954, 6409, 3207), checks the login through the portal,
and from the ``235`` on hands both connections to the splice, as the IMAP
side does (``proxy.imap.server``).

Lines are read here rather than by ``LineReceiver``: after a line that is
too long SMTP answers ``500`` and goes on with the next line, and whatever
follows an AUTH (a pipelined MAIL, RCPT, DATA or a binary BDAT chunk) must
be held unparsed, byte for byte, for the provider.
"""

from __future__ import annotations

import socket
import traceback
from typing import Any

from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from .. import limits
from ..imap import SecureMixin, ServerPolicy, SessionRegistry
from ..relay import Splice, tuneSocket
from . import syntax as S
from .extensions import ProviderExtensions
from .login import LoginMixin

log = Logger(namespace="proxy.smtp")

# Refused before AUTH, as Dovecot and the big providers do.
NEEDS_AUTH = frozenset({b"MAIL", b"RCPT", b"DATA", b"VRFY", b"EXPN", b"BURL", b"ETRN"})


class SubmissionServer(SecureMixin, LoginMixin, TimeoutMixin, Protocol):
    """
    :ivar sink: after the splice starts, where client bytes go.
    :ivar paused: reading stopped: past ``MAX_HELD`` during a login (the
        splice or a refusal resumes it), or by the splice's flow control.
    """

    # After a 421 or 221, how long a peer has to let the connection close.
    BYE_GRACE = 5.0
    # Octets held behind an AUTH while its login runs before reading stops
    # (reading goes on below it, so that a client that leaves is seen).
    MAX_HELD = 65536
    _cut: Any = None
    transport: Any

    def __init__(
        self,
        portal: Any,
        policy: ServerPolicy,
        contextFactory: Any,
        sessions: SessionRegistry,
        extensions: ProviderExtensions,
        hostname: bytes,
    ):
        self.portal = portal
        self.policy = policy
        self.ctx = contextFactory
        self._sessions = sessions
        self.extensions = extensions
        self.hostname = hostname
        self._phase = "preauth"
        self._buffer = b""
        self._draining = False
        # Skipping: the rest of a line too long; the data of a refused BDAT.
        self._skipLine = False
        self._skipBytes = 0
        self._ehlo: str | None = None
        self._esmtp = False
        # The extensions the last EHLO offered (what the client may use).
        self.offered: list[bytes] = []
        self.startedTLS = False
        self.canStartTLS = False
        self._commands = 0
        self._badCommands = 0
        self._faulted = False
        self.paused = False
        self.sink: Any = None
        self.splice: Splice | None = None
        self.bytesReceived = 0
        self.address = "unknown"
        self.continuation: Any = None
        LoginMixin.__init__(self)

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        tuneSocket(self.transport)
        peer = self.transport.getPeer()
        self.address = getattr(peer, "host", "unknown")
        self.canStartTLS = self.ctx is not None and hasattr(self.transport, "startTLS")
        # A deadline for the whole login, not an idle timer (nothing here
        # calls resetTimeout): a client cannot keep a connection alive unlogged.
        self.setTimeout(self.policy.loginTimeout)
        self.sendLine(
            b"220 "
            + self.hostname
            + b" imapproxy ESMTP ready for requests from "
            + self.address.encode("ascii", "replace")
        )

    def sendLine(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def timeoutConnection(self) -> None:
        self.bye(b"4.4.2", b"Login timeout")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        phase, self._phase = self._phase, "closed"
        if phase == "spliced" and self.splice is not None:
            self.splice.clientLost()

    def pauseProducing(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()
        self._drain()

    def bye(self, code: bytes, text: bytes) -> None:
        """``421`` with ``code`` and ``text``, then close."""
        if self._phase in ("spliced", "closed"):
            return
        self.sendLine(b"421 " + code + b" " + self.hostname + b" " + text)
        self._close()

    def _close(self) -> None:
        """Close for good: resume reading and cut a peer that does not go."""
        self._phase = "closed"
        self._buffer = b""
        # Armed first: a transport may report the loss at once.
        self._cut = self.callLater(self.BYE_GRACE, self.transport.abortConnection)
        self.paused = False
        self.transport.resumeProducing()
        self.transport.loseConnection()

    # -- reading ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._phase == "closed":
            return  # closing: nothing more is read into memory
        if self.sink is not None:
            self.bytesReceived += len(data)
            self.sink(data)
            return
        self._buffer += data
        if self._phase == "login":
            if len(self._buffer) > self.MAX_HELD and not self.paused:
                self.pauseProducing()
            return
        self._drain()

    def takeHeld(self) -> bytes:
        """What the client sent behind its AUTH, unparsed, now the splice's."""
        held, self._buffer = self._buffer, b""
        return held

    def _drain(self) -> None:
        """Run the complete lines read, while reading commands."""
        if self._draining:
            return  # the loop below goes on with the rest
        self._draining = True
        try:
            while self._buffer and self._phase == "preauth" and not self.paused:
                if not self._nextLine():
                    break
        finally:
            self._draining = False

    def _nextLine(self) -> bool:
        """Take one line (or skipped bytes) off the buffer; :return: whether to go on."""
        if self._skipBytes:
            taken = self._buffer[: self._skipBytes]
            self._buffer = self._buffer[len(taken) :]
            self._skipBytes -= len(taken)
            return True
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self._lineLimit(self._buffer) + 1:
                # No end in sight: say so now, and drop the line as it comes.
                self._buffer = b""
                if not self._skipLine:
                    self._skipLine = True
                    self._lineTooLong()
            return False
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        if self._skipLine:
            self._skipLine = False
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._lineLimit(line):
            self._lineTooLong()
            return True
        try:
            self._lineReceived(line)
        except Exception as e:
            self._internalError(e)
        return True

    def _lineLimit(self, line: bytes) -> int:
        """
        The longest ``line`` may be: the policy's, but RFC 4954 section 4
        lets an AUTH command and a SASL response be 12288 octets with CRLF.
        """
        if self.continuation is not None or line[:5].upper() == b"AUTH ":
            return max(self.policy.maxLineLength, S.MAX_AUTH_LINE - 2)
        return self.policy.maxLineLength  # type: ignore[no-any-return]

    def _lineTooLong(self) -> None:
        # An AUTH response cut short ends its exchange.
        self.continuation = None
        self.bad(S.TOO_LONG)

    def _lineReceived(self, line: bytes) -> None:
        if self.continuation is not None:
            respond, self.continuation = self.continuation, None
            respond(line)
            return
        self._commands += 1
        if self._commands > self.policy.maxCommands:
            self.bye(b"4.7.0", b"Too many commands")
            return
        verb, argument = S.splitCommand(line)
        if verb in NEEDS_AUTH:
            self.bad(S.AUTH_REQUIRED)
        else:
            name = verb.decode("ascii") if verb.isalpha() and verb.isascii() else ""
            handler = getattr(self, "smtp_" + name, None) if name else None
            if handler is None:
                self.bad(S.UNKNOWN)
            else:
                handler(argument)

    def bad(self, reply: bytes) -> None:
        """A reply to a command that should not have come: counted."""
        self.sendLine(reply)
        self._badCommands += 1
        if self._badCommands >= self.policy.maxBadCommands:
            self.bye(b"4.7.0", b"Too many invalid commands")

    def _internalError(self, error: Exception) -> None:
        """
        A bug, not an input: one log line without a traceback (which might
        carry the input), and the connection closes.
        """
        frame = traceback.extract_tb(error.__traceback__)[-1]
        if not self._faulted:
            self._faulted = True
            log.error(
                "internal error in a pre-auth SMTP command from {address}: {error} at {where}",
                address=self.address,
                error=type(error).__name__,
                where=f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}",
            )
        self.continuation = None
        self.bye(b"4.3.0", b"Internal error")

    # -- TLS and what is offered ---------------------------------------------

    def ehloLines(self) -> list[bytes]:
        """The keywords after the greeting line of the EHLO reply."""
        lines = list(self.offered)
        if not self.secure() and self.canStartTLS:
            lines.append(b"STARTTLS")
        if self.plaintextAllowed():
            lines.append(b"AUTH PLAIN LOGIN")
        return lines

    # -- commands -----------------------------------------------------------

    def smtp_EHLO(self, argument: bytes) -> None:
        name = S.heloName(argument)
        if name is None:
            self.bad(S.EHLO_SYNTAX)
            return
        self._ehlo, self._esmtp = name, True
        self.offered = self.extensions.offered()
        lines = [self._hello(), *self.ehloLines()]
        reply = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
        self.transport.write(reply + b"250 " + lines[-1] + b"\r\n")

    def smtp_HELO(self, argument: bytes) -> None:
        name = S.heloName(argument)
        if name is None:
            self.bad(S.HELO_SYNTAX)
            return
        # Plain SMTP: no extensions, so no AUTH until an EHLO.
        self._ehlo, self._esmtp, self.offered = name, False, []
        self.sendLine(b"250 " + self._hello())

    def _hello(self) -> bytes:
        return self.hostname + b" Hello " + self.address.encode("ascii", "replace")

    def smtp_NOOP(self, argument: bytes) -> None:
        self.sendLine(S.OK)

    def smtp_RSET(self, argument: bytes) -> None:
        self.sendLine(S.OK)

    def smtp_QUIT(self, argument: bytes) -> None:
        self.sendLine(S.BYE)
        self._close()

    def smtp_BDAT(self, argument: bytes) -> None:
        try:
            size = S.chunkSize(argument)
        except ValueError:
            # Where its data ends is unknown: the data will read as commands
            # and count as bad ones.
            self.bad(S.SYNTAX)
            return
        # Its data follows at once (RFC 3030): read past it, not as commands.
        self._skipBytes = size
        self.bad(S.AUTH_REQUIRED)

    def smtp_STARTTLS(self, argument: bytes) -> None:
        if argument:
            self.bad(S.SYNTAX)
        elif self.secure():
            self.bad(S.TLS_ACTIVE)
        elif not self.canStartTLS:
            self.sendLine(S.TLS_UNAVAILABLE)
        else:
            self.sendLine(S.READY_FOR_TLS)
            # Commands sent with STARTTLS in the clear must not run inside
            # TLS (RFC 3207 5, the CVE-2011-0411 class of bugs), and what the
            # client said before is forgotten: it must EHLO again.
            self._buffer = b""
            self._skipLine = False
            self._skipBytes = 0
            self._ehlo, self._esmtp, self.offered = None, False, []
            limits.handshakeStarting(self.transport)
            self.transport.startTLS(self.ctx)
            self.startedTLS = True


class SubmissionFactory(Factory):
    """
    :param portal: the SMTP portal (``TokenChecker`` with ``SMTP_SCOPE``).
    :param policy: the pre-auth bounds and plaintext policy (IMAP's).
    :param contextFactory: TLS server options for STARTTLS, or None.
    :param sessions: the registry of live sessions, shared with IMAP.
    :param extensions: what the EHLO offers, learned from each login.
    :param clock: ``IReactorTime`` for the deadlines (the reactor by default).
    :param hostname: the name in the greeting and replies (default: this
        machine's fully qualified name, looked up once, here).
    """

    protocol = SubmissionServer  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        portal: Any,
        policy: ServerPolicy,
        contextFactory: Any = None,
        sessions: SessionRegistry | None = None,
        extensions: ProviderExtensions | None = None,
        clock: Any = None,
        hostname: str | None = None,
    ):
        self.portal = portal
        self.policy = policy
        self.contextFactory = contextFactory
        self.sessions = sessions if sessions is not None else SessionRegistry()
        self.extensions = extensions if extensions is not None else ProviderExtensions()
        self.clock = clock
        name = hostname if hostname is not None else socket.getfqdn()
        self.hostname = name.encode("ascii", "replace")

    def buildProtocol(self, addr: Any) -> SubmissionServer:
        p = SubmissionServer(
            self.portal,
            self.policy,
            self.contextFactory,
            self.sessions,
            self.extensions,
            self.hostname,
        )
        p.factory = self
        if self.clock is not None:
            p.callLater = self.clock.callLater  # type: ignore[method-assign]
        return p
