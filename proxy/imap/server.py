"""
The client side: an ``IMAP4Server`` that speaks IMAP only until the login.
It answers the few commands that make sense before authentication, parsing
their arguments itself (strictly, with fixed answers: ``syntax.py``), checks
the login through the portal, and from the tagged OK on hands both
connections to the splice.

Of ``IMAP4Server`` only the public response helpers, ``CAPABILITY`` and
``NOOP`` are used: its command dispatch, argument parsers and literal
handling (whose errors end in a logged traceback) are replaced here.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.mail.imap4 import IMAP4Server
from twisted.python.failure import Failure

from .. import limits
from ..cred import IUpstreamSession, TokenCredentials, loggableAccount
from ..errors import AccessDenied
from ..loginresult import auditLogin, clockOf, logBug, outcome, refusal, seconds
from ..relay import Splice, flushWrites, tuneSocket
from .reader import CommandReader
from .restricted import loginCapabilities, relayFor
from .sasl import SASLError, parsePlain
from .secure import SecureMixin
from .sessions import SessionRegistry

log = Logger(namespace="proxy.imap")

PLAINTEXT_POLICIES = ("allow", "loopback", "deny")
INTERNAL = b"NO [UNAVAILABLE] Internal error, try again later"


@attrs.frozen
class ServerPolicy:
    """
    The pre-authentication bounds. An idle or hostile peer is cut off by
    these before it costs anything lasting.

    :ivar loginTimeout: seconds from connect to a completed login.
    :ivar maxBadCommands: BAD responses before ``* BYE``.
    :ivar maxFailedLogins: refused logins before ``* BYE``.
    :ivar maxLineLength: longest command line before login.
    :ivar maxLiteral: largest literal (a LOGIN argument) before login.
    :ivar maxCommands: commands of any kind before login, then ``* BYE``.
    :ivar plaintextLogin: ``allow``, ``loopback`` or ``deny`` logins without TLS.
    """

    loginTimeout: float = 60.0
    maxBadCommands: int = 10
    maxFailedLogins: int = 3
    maxLineLength: int = 8192
    maxLiteral: int = 4096
    maxCommands: int = 100
    plaintextLogin: str = attrs.field(
        default="loopback", validator=attrs.validators.in_(PLAINTEXT_POLICIES)
    )

    @property
    def maxCommandSize(self) -> int:
        """Bytes one command may take with its literals (a LOGIN has two)."""
        return self.maxLineLength + 2 * self.maxLiteral


class ProxyServer(SecureMixin, CommandReader, IMAP4Server):
    """
    :ivar sink: after the splice starts, where client bytes go (the upstream
        transport's ``write``).
    """

    IDENT = b"imapproxy"
    # After * BYE, how long a peer has to let the connection close.
    BYE_GRACE = 5.0
    # Octets held behind a LOGIN while it runs before reading stops
    # (reading goes on below it, so that a client that leaves is seen).
    MAX_HELD = 65536
    _cut: Any = None
    # Attributes that only a few sessions change are class defaults: with
    # more than 30 attributes an instance no longer shares its dictionary's
    # keys (CPython 3.11), and each idle session holds 1.2 KiB more.
    _badCommands = 0
    _failedLogins = 0
    _held = 0
    # The transport paused past MAX_HELD (the splice or a refusal resumes it).
    _readingPaused = False
    transport: Any
    portal: Any

    def __init__(
        self, portal: Any, policy: ServerPolicy, contextFactory: Any = None, sessions: Any = None
    ):
        IMAP4Server.__init__(self, chal={}, contextFactory=contextFactory)
        self.portal = portal
        self.policy = policy
        self.MAX_LENGTH = policy.maxLineLength
        self._sessions = sessions
        self._phase = "preauth"
        self._account = ""
        self.sink: Any = None
        self.splice: Splice | None = None
        self.bytesReceived = 0
        self.address = "unknown"

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        tuneSocket(self.transport)
        peer = self.transport.getPeer()
        self.address = getattr(peer, "host", "unknown")
        self.canStartTLS = self.ctx is not None and hasattr(self.transport, "startTLS")
        self.setTimeout(self.policy.loginTimeout)
        self.sendLine(
            b"* OK imapproxy ready for requests from " + self.address.encode("ascii", "replace")
        )

    def resetTimeout(self) -> None:
        # The pre-auth timeout is a deadline for the whole login, not an idle
        # timer: a client cannot keep an unauthenticated connection alive.
        pass

    def timeoutConnection(self) -> None:
        self.bye(b"Login timeout, closing connection")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        phase, self._phase = self._phase, "closed"
        if phase == "spliced" and self.splice is not None:
            self.splice.clientLost()

    def dataReceived(self, data: bytes) -> None:
        if self._phase == "closed":
            return  # closing: nothing more is read into memory
        if self.sink is not None:
            self.bytesReceived += len(data)
            self.sink(data)
            return
        IMAP4Server.dataReceived(self, data)
        if self._phase == "login":
            self._held += len(data)
            if self._held > self.MAX_HELD and not self._readingPaused:
                self._readingPaused = True
                self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._readingPaused = False
        IMAP4Server.resumeProducing(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.bye(b"Command line too long")

    def reading(self) -> bool:
        """Whether commands are read (not while a login runs, nor after it)."""
        return self._phase == "preauth"

    def refuseEarly(self, name: bytes) -> Any:
        """:return: the refusal of command ``name`` decided before its arguments, or None."""
        if name == b"LOGIN" and not self.plaintextAllowed():
            # No continuation for a literal password that must not be sent
            # in the clear anyway.
            return self._privacyRequired
        return None

    def bye(self, text: bytes) -> None:
        if self._phase in ("spliced", "closed"):
            return
        self.sendLine(b"* BYE " + text)
        self._close()

    def _close(self) -> None:
        """Close for good: resume reading and cut a peer that does not go."""
        self._phase = "closed"
        self.clearLineBuffer()  # what a login held is dropped
        # Reading may be paused (a login was pending): a TLS close needs to
        # read the peer's close_notify, and a peer that never closes is cut.
        # The cut is armed first: a transport may report the loss at once.
        self._cut = self.callLater(self.BYE_GRACE, self.transport.abortConnection)
        self.paused = False
        self.transport.resumeProducing()
        self.transport.loseConnection()

    def sendBadResponse(self, tag: Any = None, message: bytes = b"") -> None:
        IMAP4Server.sendBadResponse(self, tag, message)
        self._badCommands += 1
        if self._badCommands >= self.policy.maxBadCommands:
            self.bye(b"Too many invalid commands")

    # -- capabilities -------------------------------------------------------

    def listCapabilities(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"SASL-IR", b"ID"]
        if not self.secure() and self.canStartTLS:
            caps.append(b"STARTTLS")
        if self.plaintextAllowed():
            caps.append(b"AUTH=PLAIN")
        else:
            caps.append(b"LOGINDISABLED")
        return caps

    # -- commands -----------------------------------------------------------

    def do_LOGOUT(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b"BYE imapproxy logging out")
        self.sendPositiveResponse(tag, b"LOGOUT completed")
        self._close()

    def do_ID(self, tag: bytes) -> None:
        # The client's ID is not needed before login; answer with ours.
        from .. import __version__

        self.sendUntaggedResponse(
            b'ID ("name" "imapproxy" "version" "' + __version__.encode("ascii") + b'")'
        )
        self.sendPositiveResponse(tag, b"ID completed")

    def do_STARTTLS(self, tag: bytes) -> None:
        if self.secure():
            self.sendBadResponse(tag, b"TLS already active")
        elif not self.canStartTLS:
            self.sendNegativeResponse(tag, b"[CANNOT] TLS not available")
        else:
            self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
            # Commands sent with STARTTLS in the clear must not be executed
            # inside TLS (RFC 3501, 11.1 / CVE-2011-0411 class of bugs).
            self.clearLineBuffer()
            limits.handshakeStarting(self.transport)
            self.transport.startTLS(self.ctx)
            self.startedTLS = True

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        self._login(tag, user, passwd)

    def do_AUTHENTICATE(  # type: ignore[override]
        self, tag: bytes, mechanism: bytes, initial: bytes | None
    ) -> None:
        if mechanism.upper() != b"PLAIN":
            self.sendNegativeResponse(tag, b"[CANNOT] Unsupported authentication mechanism")
            return
        if not self.plaintextAllowed():
            self._privacyRequired(tag)
            return
        if initial is not None:
            self._plain(tag, initial)
            return
        # The next line is the response (or "*" to cancel).
        self.sendLine(b"+ ")
        self.continuation = functools.partial(self._plain, tag)

    def _plain(self, tag: bytes, response: bytes) -> None:
        try:
            plain = parsePlain(response)
        except SASLError as e:
            self.sendBadResponse(tag, e.text)
            return
        if not plain.sameIdentity:
            auditLogin(self, "imap", "refused", "username", early=True)
            self._refused(tag, AccessDenied("username").imapResponse())
            return
        self._login(tag, plain.authcid, plain.password)

    def _privacyRequired(self, tag: bytes) -> None:
        # A refused login like any other: it counts toward maxFailedLogins.
        auditLogin(self, "imap", "refused", "privacy-required", early=True)
        self._refused(tag, b"NO [PRIVACYREQUIRED] Login without TLS is not allowed")

    # -- the login ----------------------------------------------------------

    def _login(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        if not self.plaintextAllowed():
            self._privacyRequired(tag)
            return
        try:
            account = user.decode("utf-8")
            token = passwd.decode("utf-8")
        except UnicodeDecodeError:
            auditLogin(self, "imap", "refused", "username", early=True)
            self._refused(tag, AccessDenied("username").imapResponse())
            return
        # Hold whatever the client pipelined behind its login, unparsed and
        # unanswered, until the login is decided. Reading goes on (up to
        # MAX_HELD): a paused connection would not see a client leave, and
        # its held commands would reach the provider after all.
        self._phase = "login"
        if self._held or self._readingPaused:  # left by an earlier refused login
            self._held, self._readingPaused = 0, False
        self.paused = True  # LineReceiver: no more lines parsed
        self._account = loggableAccount(account)
        self._loginStarted = seconds(self)
        creds = TokenCredentials(account=account, token=token, address=self.address)
        ticket = self._sessions.loginStarted() if self._sessions is not None else 0
        d = self.portal.login(creds, None, IUpstreamSession)
        d.addCallbacks(self._loggedIn, self._loginFailed, (tag, ticket), None, (tag, ticket), None)
        d.addErrback(self._completionFailed)

    def _completionFailed(self, failure: Any) -> None:
        """
        A bug while completing a login: one log line (no traceback, which
        might carry the token) and a BYE, not a client left waiting.
        """
        logBug(failure, log, "login", self._account, self.address)
        self.continuation = None
        if self.splice is None and self._phase != "closed":
            # Never spliced (even if marked so before the bug): still ours.
            self.sendLine(b"* BYE Internal error")
            self._close()

    def _loggedIn(self, result: Any, tag: bytes, ticket: int) -> None:
        _iface, session, logout = result
        try:
            self._complete(session, logout, tag, ticket)
        except Exception:
            if self.splice is None:
                logout()  # never spliced: nobody else will end it
            raise

    def _complete(self, session: Any, logout: Any, tag: bytes, ticket: int) -> None:
        revoked = self._sessions is not None and self._sessions.loginEnded(
            ticket, session.account, session.tokenId
        )
        if self._phase != "login":
            # The client left (or timed out) while we logged in upstream.
            auditLogin(self, "imap", "failed", "client-gone", session.tokenId)
            logout()
            return
        if revoked:
            # Its token was revoked with disconnect, or its account deleted,
            # after the check passed: as if the check had come later.
            logout()
            log.info(
                "login of {account} from {address} refused: closed while logging in",
                account=self._account,
                address=self.address,
            )
            auditLogin(self, "imap", "refused", "revoked", session.tokenId)
            self._phase = "preauth"
            self._refused(tag, AccessDenied("unknown-token").imapResponse())
            if self._phase == "preauth":
                self.resumeProducing()
            return
        self._phase = "spliced"
        self.setTimeout(None)
        # No longer a pre-auth connection for the connection limits.
        limits.loggedIn(self.transport)
        caps = b" ".join(loginCapabilities(session))
        self.sendLine(
            tag
            + b" OK [CAPABILITY "
            + caps
            + b"] "
            + session.account.encode("utf-8")
            + b" authenticated"
        )
        # The client has its answer before the rest of the splice is made.
        flushWrites(self.transport)
        label = f"{session.account}@{self.address}"
        audit = {
            "protocol": "imap",
            "account": session.account,
            "token_id": session.tokenId,
            "client": self.address,
        }
        splice = relayFor(
            session,
            self._sessions,
            self,
            label,
            self._spliceEnded,
            self.callLater,
            audit,
            clockOf(self),
        )
        if self._sessions is not None:
            self._sessions.add(session, splice)
        self._session = session
        held = self.clearLineBuffer()
        # Set last: until then a bug here leaves the connection ours to close.
        self.splice = splice
        log.info("session {label} spliced", label=label)
        auditLogin(self, "imap", "ok", "-", session.tokenId)
        splice.start(held)

    def _spliceEnded(self, splice: Splice) -> None:
        if self._sessions is not None:
            self._sessions.discard(self._session, splice)

    def _loginFailed(self, failure: Any, tag: bytes, ticket: int) -> None:
        if self._sessions is not None:
            self._sessions.loginEnded(ticket, None, None)
        auditLogin(self, "imap", *outcome(failure))
        if self._phase != "login":
            return
        error = refusal(failure, log, "login", self._account, self.address)
        response = INTERNAL if error is None else error.imapResponse()
        self._phase = "preauth"
        self._refused(tag, response)
        if self._phase == "preauth":
            self.resumeProducing()

    def _refused(self, tag: bytes, response: bytes) -> None:
        self.sendLine(tag + b" " + response)
        self._failedLogins += 1
        if self._failedLogins >= self.policy.maxFailedLogins:
            self.bye(b"Too many failed logins")


class ProxyFactory(Factory):
    """
    :param contextFactory: TLS server options for STARTTLS, or None.
    :param clock: ``IReactorTime`` for the servers' deadlines (the reactor by default).
    """

    protocol = ProxyServer  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        portal: Any,
        policy: ServerPolicy,
        contextFactory: Any = None,
        sessions: SessionRegistry | None = None,
        clock: Any = None,
    ):
        self.portal = portal
        self.policy = policy
        self.contextFactory = contextFactory
        self.sessions = sessions if sessions is not None else SessionRegistry()
        self.clock = clock

    def buildProtocol(self, addr: Any) -> ProxyServer:
        p = ProxyServer(self.portal, self.policy, self.contextFactory, self.sessions)
        p.factory = self
        if self.clock is not None:
            p.callLater = self.clock.callLater  # type: ignore[method-assign]
        return p
