"""
The AUTH half of ``SubmissionServer``: AUTH PLAIN and AUTH LOGIN (RFC 4954,
4616 and the LOGIN draft), the login through the portal, and from the
provider's ``235`` the splice, with whatever the client pipelined behind
its AUTH passed on first, unparsed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from .. import limits
from ..cred import ISubmissionSession, TokenCredentials, loggableAccount
from ..errors import AccessDenied
from ..imap import SASLError, parsePlain
from ..loginresult import auditLogin, clockOf, logBug, outcome, refusal, seconds
from ..relay import Splice, flushWrites
from . import syntax as S
from .extensions import Features

log = Logger(namespace="proxy.smtp")


class LoginMixin:
    """
    Provided by the server: ``policy``, ``portal``, ``_sessions``,
    ``extensions``, ``address``, ``transport``, ``_phase``, ``_ehlo``,
    ``_esmtp``, ``continuation``, ``sendLine``, ``bad``, ``bye``, ``_close``,
    ``plaintextAllowed``, ``offered``, ``resumeProducing``,
    ``setTimeout``, ``callLater`` and ``takeHeld``.
    """

    policy: Any
    portal: Any
    _sessions: Any
    extensions: Any
    address: str
    transport: Any
    _phase: str
    _ehlo: str | None
    _esmtp: bool
    continuation: Callable[[bytes], None] | None
    sendLine: Callable[[bytes], None]
    bad: Callable[[bytes], None]
    bye: Callable[[bytes, bytes], None]
    _close: Callable[[], None]
    plaintextAllowed: Callable[[], bool]
    resumeProducing: Callable[[], None]
    setTimeout: Any
    callLater: Any
    takeHeld: Callable[[], bytes]
    splice: Splice | None
    offered: list[bytes]

    def __init__(self) -> None:
        self._account = ""
        self._failedLogins = 0
        self._session: Any = None

    def smtp_AUTH(self, argument: bytes) -> None:
        if not self._esmtp:
            self.bad(S.EHLO_FIRST)
            return
        parts = argument.split()
        if not 1 <= len(parts) <= 2:
            self.bad(S.SYNTAX)
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism not in (b"PLAIN", b"LOGIN"):
            self.bad(S.MECHANISM)
            return
        if not self.plaintextAllowed():
            # A refused login like any other: it counts toward maxFailedLogins.
            auditLogin(self, "smtp", "refused", "privacy-required", early=True)
            self._refused(S.STARTTLS_FIRST)
            return
        if mechanism == b"PLAIN":
            if initial is None:
                self._challenge(S.EMPTY_CHALLENGE, self._plain)
            else:
                self._plain(initial)
        elif initial is None:
            self._challenge(S.USERNAME, self._loginUser)
        else:
            self._loginUser(initial)

    def _challenge(self, line: bytes, respond: Callable[[bytes], None]) -> None:
        """Ask; the client's next line goes to ``respond``."""
        self.sendLine(line)
        self.continuation = respond

    def _plain(self, response: bytes) -> None:
        try:
            plain = parsePlain(response)
        except SASLError as e:
            self.bad(S.saslReply(e))
            return
        if not plain.sameIdentity:
            auditLogin(self, "smtp", "refused", "username", early=True)
            self._refused(AccessDenied("username").smtpResponse())
            return
        self._login(plain.authcid, plain.password)

    def _loginUser(self, response: bytes) -> None:
        try:
            user = S.decodeResponse(response)
        except SASLError as e:
            self.bad(S.saslReply(e))
            return
        self._challenge(S.PASSWORD, lambda line: self._loginPassword(user, line))

    def _loginPassword(self, user: bytes, response: bytes) -> None:
        try:
            password = S.decodeResponse(response)
        except SASLError as e:
            self.bad(S.saslReply(e))
            return
        self._login(user, password)

    # -- the login ----------------------------------------------------------

    def _login(self, user: bytes, passwd: bytes) -> None:
        try:
            account = user.decode("utf-8")
            token = passwd.decode("utf-8")
        except UnicodeDecodeError:
            auditLogin(self, "smtp", "refused", "username", early=True)
            self._refused(AccessDenied("username").smtpResponse())
            return
        # Hold whatever the client pipelined behind its AUTH, unparsed and
        # unanswered, until the login is decided. Reading goes on (up to the
        # server's MAX_HELD): a paused connection would not see a client
        # leave, and its held commands would reach the provider after all.
        self._phase = "login"
        self._account = loggableAccount(account)
        self._loginStarted = seconds(self)
        creds = TokenCredentials(
            account=account, token=token, address=self.address, protocol="smtp"
        )
        ticket = self._sessions.loginStarted()
        try:
            d = self.portal.login(creds, self._ehlo, ISubmissionSession)
        except Exception:
            self._sessions.loginEnded(ticket, None, None)
            raise
        d.addCallbacks(self._loggedIn, self._loginFailed, (ticket,), None, (ticket,), None)
        d.addErrback(self._completionFailed)

    def _completionFailed(self, failure: Any) -> None:
        """
        A bug while completing a login: one log line (no traceback, which
        might carry the token) and a 421, not a client left waiting.
        """
        self._logBug(failure)
        self.continuation = None
        if self.splice is None and self._phase != "closed":
            # Never spliced (even if marked so before the bug): still ours.
            self._phase = "login"
            self.bye(b"4.3.0", b"Internal error")

    def _logBug(self, failure: Any) -> None:
        logBug(failure, log, "smtp login", self._account, self.address)

    def _loggedIn(self, result: Any, ticket: int) -> None:
        _iface, session, logout = result
        try:
            self._complete(session, logout, ticket)
        except Exception:
            if self.splice is None:
                logout()  # never spliced: nobody else will end it
            raise

    def _complete(self, session: Any, logout: Callable[[], None], ticket: int) -> None:
        revoked = self._sessions.loginEnded(ticket, session.account, session.tokenId)
        if self._phase != "login":
            # The client left (or timed out) while we logged in upstream.
            auditLogin(self, "smtp", "failed", "client-gone", session.tokenId)
            logout()
            return
        if revoked:
            # Its token was revoked with disconnect, or its account deleted,
            # after the check passed: as if the check had come later.
            logout()
            log.info(
                "smtp login of {account} from {address} refused: closed while logging in",
                account=self._account,
                address=self.address,
            )
            auditLogin(self, "smtp", "refused", "revoked", session.tokenId)
            self._retry(AccessDenied("unknown-token").smtpResponse())
            return
        if not self._offerKept(session):
            logout()
            auditLogin(self, "smtp", "failed", "offer-changed", session.tokenId)
            # Not a failed login: the client did nothing wrong.
            self._phase = "preauth"
            self.sendLine(S.OFFER_CHANGED)
            self.resumeProducing()
            return
        self._phase = "spliced"
        self.setTimeout(None)
        # No longer a pre-auth connection for the connection limits.
        limits.loggedIn(self.transport)
        self.sendLine(S.AUTH_OK)
        flushWrites(self.transport)  # the answer first, then the splice
        label = f"{session.account}@{self.address}/smtp"
        audit = {
            "protocol": "smtp",
            "account": session.account,
            "token_id": session.tokenId,
            "client": self.address,
        }
        splice = Splice(
            self,
            session.protocol,
            label,
            self._spliceEnded,
            self.callLater,
            audit,
            clockOf(self),
            protocol="smtp",
        )
        self._sessions.add(session, splice)
        self._session = session
        held = self.takeHeld()
        # Set last: until then a bug here leaves the connection ours to close.
        self.splice = splice
        log.info("session {label} spliced", label=label)
        auditLogin(self, "smtp", "ok", "-", session.tokenId)
        splice.start(held)

    def _offerKept(self, session: Any) -> bool:
        """
        Learn the provider's EHLO; :return: whether the EHLO this client
        was given promised nothing that provider lacks. It can have: a
        server added while the proxy runs is unknown until its account's
        first login or the primer's next round, and the client would send
        its MAIL with extensions the provider refuses (or mis-handles).
        """
        self.extensions.learn(session.server, session.extensions)
        if Features.parse(self.offered).within(Features.parse(session.extensions)):
            return True
        log.info(
            "smtp login of {account} from {address}: {server} lacks what its EHLO "
            "offered ({offered}); asked to EHLO again",
            account=self._account,
            address=self.address,
            server=session.server,
            offered=b" ".join(self.offered).decode("ascii", "replace"),
        )
        return False

    def _spliceEnded(self, splice: Splice) -> None:
        self._sessions.discard(self._session, splice)

    def _loginFailed(self, failure: Any, ticket: int) -> None:
        self._sessions.loginEnded(ticket, None, None)
        auditLogin(self, "smtp", *outcome(failure))
        if self._phase != "login":
            return
        error = refusal(failure, log, "smtp login", self._account, self.address)
        response = S.INTERNAL if error is None else error.smtpResponse()
        if response.startswith(b"421 "):
            # A 421 (the account at its connection cap) closes the connection.
            self.sendLine(response)
            self._close()
            return
        self._retry(response)

    def _retry(self, response: bytes) -> None:
        """Refuse the login; commands (a new AUTH) are read again."""
        self._phase = "preauth"
        self._refused(response)
        if self._phase == "preauth":
            self.resumeProducing()

    def _refused(self, response: bytes) -> None:
        self.sendLine(response)
        self._failedLogins += 1
        if self._failedLogins >= self.policy.maxFailedLogins:
            self.bye(b"4.7.0", b"Too many failed authentications")
