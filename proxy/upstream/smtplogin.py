"""
The login to a provider's SMTP submission server as an explicit state
machine (Automat), the sibling of ``login.UpstreamLogin``: greeting, EHLO,
STARTTLS and EHLO again, AUTH with XOAUTH2 (or OAUTHBEARER) and its initial
response, the error challenge, the final reply.

It never touches a socket. The protocol (``smtp.py``) forwards each line;
``SMTPLogin.lineReceived`` gathers lines into whole replies and sorts each,
by its code alone, into one input; the machine decides from its state what
to send and how the login ends, through an ``ILoginIO``. Without an
authenticator it only reads what the server offers (``probeSMTP``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from automat import MethodicalMachine
from twisted.python.failure import Failure

from ..errors import (
    AuthenticationFailed,
    ProxyError,
    SMTPAuthDisabled,
    Unavailable,
    UpstreamRejectedToken,
)
from .auth import OAUTHBEARERAuthenticator
from .smtpreplies import (
    DEFAULT_EHLO_NAME,
    MalformedReply,
    Reply,
    ReplyReader,
    authMechanisms,
    extensionsOf,
    hasExtension,
)
from .throttling import smtpThrottling
from .verify import rejectionFor

# RFC 4954 section 4: an AUTH command line may be this long (CRLF included);
# a longer initial response is sent after the server's empty challenge.
MAX_AUTH_LINE = 12288


class SMTPLogin:
    """
    One login (or, without an authenticator, one look at the server).

    :param io: the connection, an ``ILoginIO``.
    :param authenticator: an ``IClientAuthentication`` (XOAUTH2; swapped for
        OAUTHBEARER when the server offers only that), or None to stop after
        the EHLO that counts (over TLS when there is TLS).
    :param secret: the access token.
    :param startTLS: upgrade with STARTTLS before logging in.
    :param ehloName: the name to say EHLO with (``smtpreplies.ehloName``).
    :param server: ``host:port``, for reports of a refused certificate.
    :ivar extensions: what the last EHLO reply offered; once logged in,
        what it offered over TLS before AUTH.
    """

    _machine = MethodicalMachine()

    def __init__(
        self,
        io: Any,
        authenticator: Any,
        secret: bytes,
        startTLS: bool,
        ehloName: str = DEFAULT_EHLO_NAME,
        server: str = "",
    ):
        self._io = io
        self.authenticator = authenticator
        self._secret = secret
        self._ehlo = b"EHLO " + ehloName.encode("ascii")
        self._server = server
        self._reader = ReplyReader()
        self._initial = b""
        self.extensions: list[bytes] = []
        if startTLS:
            self.startWithTLS()
        else:
            self.start()

    # -- sorting lines into inputs ----------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """Feed one line of the server's (without its CRLF) to the machine."""
        try:
            reply = self._reader.feed(line)
        except MalformedReply:
            self.malformed()
            return
        if reply is not None:
            self.replyReceived(reply)

    def replyReceived(self, reply: Reply) -> None:
        if reply.code == 220:
            self.ready()
        elif reply.code == 250:
            self.ok(reply)
        elif reply.code == 235:
            self.accepted()
        elif reply.code == 334:
            self.challenge(reply.text)
        elif 400 <= reply.code < 500:
            self.transient(reply)
        elif reply.code >= 500:
            self.permanent(reply)
        else:
            self.unexpected()

    # -- inputs ----------------------------------------------------------------

    @_machine.input()
    def start(self) -> None: ...
    @_machine.input()
    def startWithTLS(self) -> None: ...
    # 220: the greeting, or STARTTLS's go-ahead.
    @_machine.input()
    def ready(self) -> None: ...
    # 250: the EHLO reply.
    @_machine.input()
    def ok(self, reply: Reply) -> None: ...
    # 235: logged in.
    @_machine.input()
    def accepted(self) -> None: ...
    # 334: a SASL challenge, its base64 payload.
    @_machine.input()
    def challenge(self, payload: bytes) -> None: ...
    # 4xx, 5xx.
    @_machine.input()
    def transient(self, reply: Reply) -> None: ...
    @_machine.input()
    def permanent(self, reply: Reply) -> None: ...
    # Any other reply: never an answer to what the login sends.
    @_machine.input()
    def unexpected(self) -> None: ...
    # A line that is no reply line, or a reply beyond the bounds.
    @_machine.input()
    def malformed(self) -> None: ...
    # The connection cannot be read on (a line too long, a bug).
    @_machine.input()
    def unusable(self) -> None: ...
    @_machine.input()
    def connectionLost(self, reason: Failure) -> None: ...
    # Internal: decisions on what the server offers.
    @_machine.input()
    def _offersStartTLS(self) -> None: ...
    @_machine.input()
    def _lacksStartTLS(self) -> None: ...
    @_machine.input()
    def _withInitialResponse(self) -> None: ...
    @_machine.input()
    def _withoutInitialResponse(self) -> None: ...
    @_machine.input()
    def _noMechanism(self) -> None: ...
    @_machine.input()
    def _onlyProbing(self) -> None: ...

    # -- states ------------------------------------------------------------------

    @_machine.state(initial=True)
    def idle(self) -> None: ...
    # Waiting for the greeting (TLS already, or none to come).
    @_machine.state()
    def greeting(self) -> None: ...
    # Waiting for the greeting; STARTTLS comes first.
    @_machine.state()
    def greetingBeforeTLS(self) -> None: ...
    # EHLO sent before STARTTLS.
    @_machine.state()
    def ehloBeforeTLS(self) -> None: ...
    # Deciding whether the server offers STARTTLS.
    @_machine.state()
    def checkingStartTLS(self) -> None: ...
    # STARTTLS sent.
    @_machine.state()
    def startingTLS(self) -> None: ...
    # EHLO sent: its reply is the one that counts.
    @_machine.state()
    def ehlo(self) -> None: ...
    # Deciding how to authenticate.
    @_machine.state()
    def choosingMechanism(self) -> None: ...
    # AUTH sent without an initial response: waiting for the empty 334.
    @_machine.state()
    def awaitingChallenge(self) -> None: ...
    # Credentials sent: waiting for the verdict.
    @_machine.state()
    def authenticating(self) -> None: ...
    # The error challenge answered: only a refusal can follow.
    @_machine.state()
    def refusing(self) -> None: ...
    # Done: the connection belongs to whoever takes it.
    @_machine.state()
    def loggedIn(self) -> None: ...
    # Done: the connection is being closed.
    @_machine.state()
    def failed(self) -> None: ...

    # -- outputs -----------------------------------------------------------------

    @_machine.output()
    def _sendEHLO(self) -> None:
        self.extensions = []
        self._io.sendLine(self._ehlo)

    @_machine.output()
    def _setExtensions(self, reply: Reply) -> None:
        self.extensions = extensionsOf(reply)

    @_machine.output()
    def _checkStartTLS(self, reply: Reply) -> None:
        if hasExtension(self.extensions, b"STARTTLS"):
            self._offersStartTLS()
        else:
            self._lacksStartTLS()

    @_machine.output()
    def _sendStartTLS(self) -> None:
        self._io.sendLine(b"STARTTLS")

    @_machine.output()
    def _upgrade(self) -> None:
        # What was offered in the clear is void; the next EHLO says anew.
        self.extensions = []
        self._io.upgradeToTLS()

    @_machine.output()
    def _chooseMechanism(self, reply: Reply) -> None:
        if self.authenticator is None:
            self._onlyProbing()
            return
        offered = authMechanisms(self.extensions)
        name = self.authenticator.getName()
        if name not in offered:
            if name == b"XOAUTH2" and b"OAUTHBEARER" in offered:
                self.authenticator = OAUTHBEARERAuthenticator(self.authenticator.user)
            else:
                self._noMechanism()
                return
        self._initial = base64.b64encode(self.authenticator.challengeResponse(self._secret, b""))
        if len(self._authCommand()) + len(self._initial) + 3 <= MAX_AUTH_LINE:
            self._withInitialResponse()
        else:
            self._withoutInitialResponse()

    def _authCommand(self) -> bytes:
        return b"AUTH " + self.authenticator.getName()

    @_machine.output()
    def _authenticateWithInitialResponse(self) -> None:
        self._io.sendLine(self._authCommand() + b" " + self._initial)

    @_machine.output()
    def _authenticate(self) -> None:
        self._io.sendLine(self._authCommand())

    @_machine.output()
    def _sendInitialResponse(self, payload: bytes) -> None:
        self._io.sendLine(self._initial)

    @_machine.output()
    def _answerErrorChallenge(self, payload: bytes) -> None:
        # The mechanism's answer (XOAUTH2: an empty line); the refusal follows.
        # The payload's content does not matter, nor whether it is base64.
        try:
            challenge = base64.b64decode(payload, validate=False)
        except binascii.Error:
            challenge = b""
        answer = self.authenticator.challengeResponse(self._secret, challenge or b"\x00")
        self._io.sendLine(base64.b64encode(answer))

    @_machine.output()
    def _succeed(self) -> None:
        self._io.loginSucceeded()

    def _fail(self, error: ProxyError) -> None:
        self._io.loginFailed(error)

    @_machine.output()
    def _failProtocol(self) -> None:
        self._fail(Unavailable("upstream-protocol"))

    @_machine.output()
    def _failGreeting(self, reply: Reply) -> None:
        self._fail(smtpThrottling(reply) or Unavailable("upstream-refused"))

    @_machine.output()
    def _failEHLO(self, reply: Reply) -> None:
        self._fail(smtpThrottling(reply) or Unavailable("upstream-ehlo"))

    @_machine.output()
    def _failNoStartTLS(self) -> None:
        self._fail(Unavailable("upstream-no-starttls"))

    @_machine.output()
    def _failStartTLS(self, reply: Reply) -> None:
        self._fail(Unavailable("upstream-starttls"))

    @_machine.output()
    def _failNoMechanism(self) -> None:
        self._fail(Unavailable("upstream-no-xoauth2"))

    @_machine.output()
    def _failLater(self, reply: Reply) -> None:
        self._fail(smtpThrottling(reply) or Unavailable("upstream-unavailable"))

    @_machine.output()
    def _failLogin(self, reply: Reply) -> None:
        if reply.enhanced == b"5.7.139":
            self._fail(SMTPAuthDisabled())
        elif reply.code == 535:
            # Bad or expired token (Gmail 5.7.8, Microsoft 5.7.3): refresh it.
            self._fail(UpstreamRejectedToken())
        else:
            # Refused for another reason (504 no such mechanism, 530 TLS
            # needed, 534 weak mechanism): a new token would not help.
            self._fail(AuthenticationFailed())

    @_machine.output()
    def _failLost(self, reason: Failure) -> None:
        # A refused certificate ends the connection too; say so, not "closed".
        self._fail(rejectionFor(reason, self._server) or Unavailable("upstream-closed"))

    # -- transitions ---------------------------------------------------------------

    idle.upon(start, enter=greeting, outputs=[])
    idle.upon(startWithTLS, enter=greetingBeforeTLS, outputs=[])

    # The greeting: 220, or a refusal (421 busy, 554 no service for you).
    greeting.upon(ready, enter=ehlo, outputs=[_sendEHLO])
    greetingBeforeTLS.upon(ready, enter=ehloBeforeTLS, outputs=[_sendEHLO])
    for _s in (greeting, greetingBeforeTLS):
        _s.upon(transient, enter=failed, outputs=[_failGreeting])
        _s.upon(permanent, enter=failed, outputs=[_failGreeting])
        for _i in (ok, accepted, challenge, unexpected):
            _s.upon(_i, enter=failed, outputs=[_failProtocol])

    # EHLO: its reply says what is offered; only 250 will do.
    ehloBeforeTLS.upon(ok, enter=checkingStartTLS, outputs=[_setExtensions, _checkStartTLS])
    ehlo.upon(ok, enter=choosingMechanism, outputs=[_setExtensions, _chooseMechanism])
    for _s in (ehloBeforeTLS, ehlo):
        _s.upon(transient, enter=failed, outputs=[_failEHLO])
        _s.upon(permanent, enter=failed, outputs=[_failEHLO])
        for _i in (ready, accepted, challenge, unexpected):
            _s.upon(_i, enter=failed, outputs=[_failProtocol])

    checkingStartTLS.upon(_offersStartTLS, enter=startingTLS, outputs=[_sendStartTLS])
    checkingStartTLS.upon(_lacksStartTLS, enter=failed, outputs=[_failNoStartTLS])

    # STARTTLS: 220, then upgrade and say EHLO again.
    startingTLS.upon(ready, enter=ehlo, outputs=[_upgrade, _sendEHLO])
    startingTLS.upon(transient, enter=failed, outputs=[_failStartTLS])
    startingTLS.upon(permanent, enter=failed, outputs=[_failStartTLS])
    for _i in (ok, accepted, challenge, unexpected):
        startingTLS.upon(_i, enter=failed, outputs=[_failProtocol])

    choosingMechanism.upon(
        _withInitialResponse, enter=authenticating, outputs=[_authenticateWithInitialResponse]
    )
    choosingMechanism.upon(
        _withoutInitialResponse, enter=awaitingChallenge, outputs=[_authenticate]
    )
    choosingMechanism.upon(_noMechanism, enter=failed, outputs=[_failNoMechanism])
    choosingMechanism.upon(_onlyProbing, enter=loggedIn, outputs=[_succeed])

    # AUTH without the initial response: the empty 334 asks for it.
    awaitingChallenge.upon(challenge, enter=authenticating, outputs=[_sendInitialResponse])
    # Credentials sent: a 334 now is the error challenge; the refusal follows.
    authenticating.upon(challenge, enter=refusing, outputs=[_answerErrorChallenge])
    authenticating.upon(accepted, enter=loggedIn, outputs=[_succeed])
    for _s in (awaitingChallenge, authenticating, refusing):
        _s.upon(transient, enter=failed, outputs=[_failLater])
        _s.upon(permanent, enter=failed, outputs=[_failLogin])
        for _i in (ready, ok, unexpected):
            _s.upon(_i, enter=failed, outputs=[_failProtocol])
    # Logged in after an error challenge, or without credentials: no.
    awaitingChallenge.upon(accepted, enter=failed, outputs=[_failProtocol])
    refusing.upon(accepted, enter=failed, outputs=[_failProtocol])
    refusing.upon(challenge, enter=failed, outputs=[_failProtocol])

    # Every waiting state: the same for bad lines and loss.
    _waiting = [greeting, greetingBeforeTLS, ehloBeforeTLS, startingTLS, ehlo]
    _waiting += [awaitingChallenge, authenticating, refusing]
    for _s in _waiting:
        _s.upon(malformed, enter=failed, outputs=[_failProtocol])
        _s.upon(unusable, enter=failed, outputs=[_failProtocol])
        _s.upon(connectionLost, enter=failed, outputs=[_failLost])

    # Done: a failed login hears nothing more; a logged-in one only its end.
    _replies = (ready, ok, accepted, challenge, transient, permanent, unexpected)
    for _i in (*_replies, malformed, unusable, connectionLost):
        failed.upon(_i, enter=failed, outputs=[])
    loggedIn.upon(connectionLost, enter=loggedIn, outputs=[])
    loggedIn.upon(unusable, enter=loggedIn, outputs=[])
    del _s, _i, _waiting, _replies
