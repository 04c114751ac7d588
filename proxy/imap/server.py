"""
The client side: an ``IMAP4Server`` that speaks IMAP only until the login.
It answers the few commands that make sense before authentication, checks the
login through the portal, and from the tagged OK on hands both connections to
the splice.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter, deque
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import INegotiated
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.mail.imap4 import IllegalClientResponse, IMAP4Server
from twisted.python.failure import Failure

from ..cred import IUpstreamSession, TokenCredentials, loggableAccount
from ..errors import AccessDenied, ProxyError, Unavailable
from ..relay import Splice, tuneSocket
from ..store import StoreUnavailable
from ..tokens import clientAddress

log = Logger()

PLAINTEXT_POLICIES = ("allow", "loopback", "deny")


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


def isLoopback(address: str) -> bool:
    ip = clientAddress(address)
    return ip is not None and ip.is_loopback


# Twisted's argument parser explains itself; some of its messages quote the
# client's input (which may hold a token), so only these fixed texts are
# ever sent back.
_PARSER_ERRORS = (
    ("Too many arguments", b"Too many arguments"),
    ("Missing argument", b"Missing argument"),
    ("Unmatched quotes", b"Unmatched quotes"),
    ("Malformed literal", b"Malformed literal"),
    ("Bad literal size", b"Bad literal size"),
    ("Literal too long", b"Literal too long"),
    ("Malformed ATOM", b"Malformed atom"),
)


def _fixedBad(error: Exception) -> bytes:
    text = str(error)
    for prefix, fixed in _PARSER_ERRORS:
        if text.startswith(prefix):
            return b"Syntax error: " + fixed
    return b"Syntax error"


class ProxyServer(IMAP4Server):
    """
    :ivar sink: after the splice starts, where client bytes go (the upstream
        transport's ``write``).
    """

    IDENT = b"imapproxy"
    # After * BYE, how long a peer has to let the connection close.
    BYE_GRACE = 5.0
    _cut: Any = None
    transport: Any
    portal: Any

    def __init__(
        self, portal: Any, policy: ServerPolicy, contextFactory: Any = None, sessions: Any = None
    ):
        IMAP4Server.__init__(self, chal={}, contextFactory=contextFactory)
        self.portal = portal
        self.policy = policy
        self.MAX_LENGTH = policy.maxLineLength
        self._literalStringLimit = policy.maxLiteral
        self._sessions = sessions
        self._phase = "preauth"
        self._account = ""
        self._badCommands = 0
        self._failedLogins = 0
        self._commands = 0
        self.sink: Any = None
        self.splice: Splice | None = None
        self.bytesReceived = 0
        self.address = "unknown"

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.tags = {}
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
        self._bye(b"Login timeout, closing connection")

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
        else:
            IMAP4Server.dataReceived(self, data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._bye(b"Command line too long")

    def _bye(self, text: bytes) -> None:
        if self._phase in ("spliced", "closed"):
            return
        self.sendLine(b"* BYE " + text)
        self._close()

    def _close(self) -> None:
        """Close for good: resume reading and cut a peer that does not go."""
        self._phase = "closed"
        # Reading may be paused (a login was pending): a TLS close needs to
        # read the peer's close_notify, and a peer that never closes is cut.
        # The cut is armed first: a transport may report the loss at once.
        self._cut = self.callLater(self.BYE_GRACE, self.transport.abortConnection)
        self.paused = False
        self.transport.resumeProducing()
        self.transport.loseConnection()

    # -- parsing ------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._phase != "preauth":
            return
        f = getattr(self, "parse_" + self.parseState)
        try:
            f(line)
        except Exception:
            log.failure("error handling a pre-auth command")
            self.sendBadResponse(None, b"Internal error")

    def parse_command(self, line: bytes) -> None:
        self._commands += 1
        if self._commands > self.policy.maxCommands:
            # Even valid commands are bounded: a peer that never logs in (or
            # never reads) cannot make us queue answers until the timeout.
            self._bye(b"Too many commands before login")
            return
        args = line.split(None, 2)
        if len(args) < 2:
            self.sendBadResponse(args[0] if args else None, b"Missing command")
            return
        tag, cmd = args[0], args[1].upper()
        rest = args[2] if len(args) == 3 else None
        try:
            self.dispatchCommand(tag, cmd, rest)
        except IllegalClientResponse as e:
            self.sendBadResponse(tag, _fixedBad(e))

    def _IMAP4Server__ebDispatch(self, failure: Any, tag: bytes) -> None:
        # Errors of arguments parsed after a literal arrive here.
        if failure.check(IllegalClientResponse):
            self.sendBadResponse(tag, _fixedBad(failure.value))
        else:
            log.failure("error handling a pre-auth command", failure)
            self.sendBadResponse(tag, b"Internal error")

    def lookupCommand(self, cmd: bytes) -> Any:
        if self._phase != "preauth":
            return None
        return getattr(self, "unauth_" + cmd.decode("ascii", "replace").upper(), None)

    def dispatchCommand(self, tag: bytes, cmd: bytes, rest: Any, uid: Any = None) -> None:
        if self.lookupCommand(cmd) is None:
            self.sendBadResponse(tag, b"Command unknown or not valid before login")
            return
        if cmd == b"LOGIN" and not self.plaintextAllowed():
            # Before parsing: no continuation for a literal password that
            # must not be sent in the clear anyway.
            self._privacyRequired(tag)
            return
        IMAP4Server.dispatchCommand(self, tag, cmd, rest, uid)

    def sendBadResponse(self, tag: Any = None, message: bytes = b"") -> None:
        IMAP4Server.sendBadResponse(self, tag, message)
        self._badCommands += 1
        if self._badCommands >= self.policy.maxBadCommands:
            self._bye(b"Too many invalid commands")

    # -- capabilities -------------------------------------------------------

    def secure(self) -> bool:
        """Whether this connection runs over TLS (implicit or STARTTLS)."""
        if self.startedTLS:
            return True
        t = self.transport
        while t is not None:
            if INegotiated.providedBy(t) or getattr(t, "TLS", False):
                return True
            t = getattr(t, "transport", None)
        return False

    def plaintextAllowed(self) -> bool:
        if self.secure() or self.policy.plaintextLogin == "allow":
            return True
        return self.policy.plaintextLogin == "loopback" and isLoopback(self.address)

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

    unauth_LOGOUT = (do_LOGOUT,)  # type: ignore[assignment]

    def do_ID(self, tag: bytes, args: Any) -> None:
        # The client's ID is not needed before login; answer with ours.
        from .. import __version__

        self.sendUntaggedResponse(
            b'ID ("name" "imapproxy" "version" "' + __version__.encode("ascii") + b'")'
        )
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = (do_ID, IMAP4Server.arg_line)

    def do_STARTTLS(self, tag: bytes) -> None:
        if self.secure():
            self.sendBadResponse(tag, b"TLS already active")
        elif not self.canStartTLS:
            self.sendNegativeResponse(tag, b"[CANNOT] TLS not available")
        else:
            self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
            # Commands sent with STARTTLS in the clear must not be executed
            # inside TLS (RFC 3501, 11.1 / CVE-2011-0411 class of bugs).
            self._buffer = b""
            self.transport.startTLS(self.ctx)
            self.startedTLS = True

    unauth_STARTTLS = (do_STARTTLS,)  # type: ignore[assignment]

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        self._login(tag, user, passwd)

    unauth_LOGIN = (  # type: ignore[assignment]
        do_LOGIN,
        IMAP4Server.arg_astring,
        IMAP4Server.arg_finalastring,
    )

    def do_AUTHENTICATE(  # type: ignore[override]
        self, tag: bytes, mechanism: bytes, initial: Any
    ) -> None:
        if mechanism.upper() != b"PLAIN":
            self.sendNegativeResponse(tag, b"[CANNOT] Unsupported authentication mechanism")
            return
        if not self.plaintextAllowed():
            self._privacyRequired(tag)
            return
        if initial:
            self._plain(tag, initial.strip())
            return
        self.sendLine(b"+ ")
        from twisted.internet.defer import Deferred

        self.parseState = "pending"
        pending: Deferred[bytes] = Deferred()
        self._pendingLiteral = pending  # type: ignore[assignment]
        pending.addCallback(lambda line: self._plain(tag, line.strip()))
        pending.addErrback(lambda f: log.failure("AUTHENTICATE continuation failed", f))

    unauth_AUTHENTICATE = (  # type: ignore[assignment]
        do_AUTHENTICATE,
        IMAP4Server.arg_atom,
        IMAP4Server.arg_line,
    )

    def _plain(self, tag: bytes, response: bytes) -> None:
        if response == b"*":
            self.sendBadResponse(tag, b"Authentication cancelled")
            return
        try:
            decoded = base64.b64decode(b"" if response == b"=" else response, validate=True)
        except (binascii.Error, ValueError):
            self.sendBadResponse(tag, b"Invalid base64 in SASL response")
            return
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            self.sendBadResponse(tag, b"Malformed SASL PLAIN response")
            return
        authzid, authcid, passwd = parts
        if authzid and authzid != authcid:
            self._refused(tag, AccessDenied("username").imapResponse())
            return
        self._login(tag, authcid, passwd)

    def _privacyRequired(self, tag: bytes) -> None:
        # A refused login like any other: it counts toward maxFailedLogins.
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
            self._refused(tag, AccessDenied("username").imapResponse())
            return
        # Hold whatever the client pipelined behind its login, unparsed and
        # unanswered, and stop reading until the login is decided.
        self._phase = "login"
        self.pauseProducing()
        self._account = loggableAccount(account)
        creds = TokenCredentials(account=account, token=token, address=self.address)
        ticket = self._sessions.loginStarted() if self._sessions is not None else 0
        d = self.portal.login(creds, None, IUpstreamSession)
        d.addCallbacks(self._loggedIn, self._loginFailed, (tag, ticket), None, (tag, ticket), None)
        d.addErrback(lambda f: log.failure("login completion failed", f))

    def _loggedIn(self, result: Any, tag: bytes, ticket: int) -> None:
        _iface, session, logout = result
        revoked = self._sessions is not None and self._sessions.loginEnded(
            ticket, session.account, session.tokenId
        )
        if self._phase != "login":
            # The client left (or timed out) while we logged in upstream.
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
            self._phase = "preauth"
            self._refused(tag, AccessDenied("unknown-token").imapResponse())
            if self._phase == "preauth":
                self.resumeProducing()
            return
        self._phase = "spliced"
        self.setTimeout(None)
        caps = b" ".join(session.capabilities)
        self.sendLine(
            tag
            + b" OK [CAPABILITY "
            + caps
            + b"] "
            + session.account.encode("utf-8")
            + b" authenticated"
        )
        label = f"{session.account}@{self.address}"
        self.splice = Splice(self, session.protocol, label, self._spliceEnded, self.callLater)
        if self._sessions is not None:
            self._sessions.add(session, self.splice)
        self._session = session
        held, self._buffer = self._buffer, b""
        log.info("session {label} spliced", label=label)
        self.splice.start(held)

    def _spliceEnded(self, splice: Splice) -> None:
        if self._sessions is not None:
            self._sessions.discard(self._session, splice)

    def _loginFailed(self, failure: Any, tag: bytes, ticket: int) -> None:
        if self._sessions is not None:
            self._sessions.loginEnded(ticket, None, None)
        if self._phase != "login":
            return
        error = failure.value
        if isinstance(error, (AccessDenied, ProxyError)):
            response = error.imapResponse()
            if isinstance(error, ProxyError):
                log.warn(
                    "login of {account} from {address} failed upstream: {reason}",
                    account=self._account,
                    address=self.address,
                    reason=error.reason,
                )
        elif isinstance(error, UnauthorizedLogin):
            response = AccessDenied("unknown-token").imapResponse()
        elif isinstance(error, StoreUnavailable):
            log.warn(
                "login of {account} from {address} failed: the store is unavailable",
                account=self._account,
                address=self.address,
            )
            response = Unavailable().imapResponse()
        else:
            log.failure("unexpected error during login", failure)
            response = b"NO [UNAVAILABLE] Internal error, try again later"
        self._phase = "preauth"
        self._refused(tag, response)
        if self._phase == "preauth":
            self.resumeProducing()

    def _refused(self, tag: bytes, response: bytes) -> None:
        self.sendLine(tag + b" " + response)
        self._failedLogins += 1
        if self._failedLogins >= self.policy.maxFailedLogins:
            self._bye(b"Too many failed logins")


class SessionRegistry:
    """
    The live spliced sessions, by account and by token id, and the close
    requests that logins still under way must not slip past: a login whose
    token was checked just before a revocation (here or, through the store's
    bus, on another instance) is refused when it completes, not spliced.
    """

    def __init__(self, spares: Any = None) -> None:
        """:param spares: ``WarmUpstreams``: a closed account's spare goes too."""
        self._splices: dict[Splice, Any] = {}
        self._spares = spares
        # Close requests as (number, account, token id), oldest first, kept
        # while a login that began before them is still under way.
        self._closes: deque[tuple[int, str | None, str | None]] = deque()
        self._requests = 0
        # Logins under way, by the number of close requests seen when each began.
        self._pending: Counter[int] = Counter()

    def add(self, session: Any, splice: Splice) -> None:
        self._splices[splice] = session

    def discard(self, session: Any, splice: Splice) -> None:
        self._splices.pop(splice, None)

    def __len__(self) -> int:
        return len(self._splices)

    def loginStarted(self) -> int:
        """:return: a ticket for ``loginEnded``, taken before the token is checked."""
        self._pending[self._requests] += 1
        return self._requests

    def loginEnded(self, ticket: int, account: str | None, tokenId: str | None) -> bool:
        """
        :return: whether a close request matching the account or token came
            after ``ticket`` was taken: the login must then be refused.
        """
        self._pending[ticket] -= 1
        if not self._pending[ticket]:
            del self._pending[ticket]
        closed = any(
            n > ticket and _matches(account, tokenId, a, t) for n, a, t in reversed(self._closes)
        )
        self._prune()
        return closed

    def _prune(self) -> None:
        oldest = min(self._pending, default=self._requests)
        while self._closes and self._closes[0][0] <= oldest:
            self._closes.popleft()

    def close(self, account: str | None = None, tokenId: str | None = None) -> int:
        """Close the matching sessions (all, with neither); :return: how many."""
        if account is not None and self._spares is not None:
            self._spares.discard(account)
        if account is not None or tokenId is not None:
            self._requests += 1
            if self._pending:
                self._closes.append((self._requests, account, tokenId))
        matched = [
            sp
            for sp, s in self._splices.items()
            if _matches(s.account, s.tokenId, account, tokenId)
        ]
        for sp in matched:
            sp.close()
        return len(matched)


def _matches(
    account: str | None, tokenId: str | None, wantAccount: str | None, wantToken: str | None
) -> bool:
    return (wantAccount is None or account == wantAccount) and (
        wantToken is None or tokenId == wantToken
    )


class ProxyFactory(Factory):
    """
    :param contextFactory: TLS server options for STARTTLS, or None.
    """

    protocol = ProxyServer  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        portal: Any,
        policy: ServerPolicy,
        contextFactory: Any = None,
        sessions: SessionRegistry | None = None,
    ):
        self.portal = portal
        self.policy = policy
        self.contextFactory = contextFactory
        self.sessions = sessions if sessions is not None else SessionRegistry()

    def buildProtocol(self, addr: Any) -> ProxyServer:
        p = ProxyServer(self.portal, self.policy, self.contextFactory, self.sessions)
        p.factory = self
        return p
