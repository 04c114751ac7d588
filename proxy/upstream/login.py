"""
The login to a provider's IMAP server as an explicit state machine
(Automat): greeting, capabilities, STARTTLS, AUTHENTICATE with XOAUTH2 or
OAUTHBEARER, the capabilities after the login.

It never touches a socket. The protocol (``imap.py``) forwards each line
and the connection's loss; ``UpstreamLogin.lineReceived`` sorts a line
into one input (an untagged OK, a tagged refusal, a continuation…) and the
machine decides, from its state alone, what to send and how it ends,
through an ``ILoginIO``. Every transition is tested without a connection.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from automat import MethodicalMachine
from twisted.python.failure import Failure
from zope.interface import Interface

from ..errors import LimitReached, ProxyError, Unavailable, UpstreamRejectedToken
from .auth import OAUTHBEARERAuthenticator
from .responses import hasCapability, parseCapabilities, responseCode
from .throttling import imapThrottling
from .verify import rejectionFor


class ILoginIO(Interface):
    """What the login machine needs of its connection."""

    def sendLine(line: bytes) -> None:
        """Send one line (the delimiter is added)."""

    def upgradeToTLS() -> None:
        """
        Start TLS now, dropping whatever was read after the STARTTLS OK:
        it arrived in the clear and must not be trusted.
        """

    def loginSucceeded() -> None:
        """Logged in; the machine's ``capabilities`` are the session's."""

    def loginFailed(error: ProxyError) -> None:
        """The login failed; close the connection and report ``error``."""


class UpstreamLogin:
    """
    One login. ``capabilities`` holds the server's capabilities as last
    announced; after the login, the session's.

    :param io: the connection, an ``ILoginIO``.
    :param authenticator: an ``IClientAuthentication`` (XOAUTH2; swapped for
        OAUTHBEARER when the server offers only that).
    :param secret: the access token.
    :param startTLS: upgrade with STARTTLS before logging in.
    :param server: ``host:port``, for reports of a refused certificate.
    """

    _machine = MethodicalMachine()

    def __init__(
        self, io: Any, authenticator: Any, secret: bytes, startTLS: bool, server: str = ""
    ):
        self._io = io
        self.authenticator = authenticator
        self._secret = secret
        self._server = server
        self.capabilities: list[bytes] = []
        self._tag = 0
        self._lastTag = b""
        self._initial = b""
        self._refusal = b""  # the last NO/BAD/BYE's text, for ``throttling``
        if startTLS:
            self.startWithTLS()
        else:
            self.start()

    # -- sorting lines into inputs ----------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """Feed one line of the server's (without its CRLF) to the machine."""
        if line.startswith(b"+"):
            self.continuation(line[2:])
        elif line.startswith(b"* "):
            upper = line[:13].upper()
            if upper.startswith(b"* OK"):
                code, args = responseCode(line[5:])
                if code == b"CAPABILITY":
                    self.untaggedOKCapabilities(parseCapabilities(args))
                else:
                    self.untaggedOK()
            elif upper.startswith(b"* BYE"):
                self._refusal = line[5:]
                self.untaggedBye()
            elif upper == b"* CAPABILITY ":
                self.untaggedCapabilities(parseCapabilities(line[13:]))
            else:
                self.untagged()
        else:
            parts = line.split(b" ", 2)
            if len(parts) < 2 or parts[0] != self._lastTag:
                # Not a response, or one to a command never sent.
                self.malformed()
                return
            code, args = responseCode(parts[2] if len(parts) == 3 else b"")
            if parts[1].upper() != b"OK":
                self._refusal = parts[2] if len(parts) == 3 else b""
                self.taggedRefused(code)
            elif code == b"CAPABILITY":
                self.taggedOKCapabilities(parseCapabilities(args))
            else:
                self.taggedOK()

    # -- inputs: one per kind of line (``lineReceived`` sorts them), and the end

    @_machine.input()
    def start(self) -> None: ...
    @_machine.input()
    def startWithTLS(self) -> None: ...
    @_machine.input()
    def untaggedOK(self) -> None: ...
    @_machine.input()
    def untaggedOKCapabilities(self, capabilities: list[bytes]) -> None: ...
    @_machine.input()
    def untaggedBye(self) -> None: ...
    @_machine.input()
    def untaggedCapabilities(self, capabilities: list[bytes]) -> None: ...
    @_machine.input()
    def untagged(self) -> None: ...
    @_machine.input()
    def continuation(self, payload: bytes) -> None: ...
    @_machine.input()
    def taggedOK(self) -> None: ...
    @_machine.input()
    def taggedOKCapabilities(self, capabilities: list[bytes]) -> None: ...
    # The last command's tagged NO or BAD, with its response code.
    @_machine.input()
    def taggedRefused(self, code: bytes | None) -> None: ...
    # A line that is no response, or a tagged one to a command never sent.
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
    def _mechanismWithInitialResponse(self) -> None: ...
    @_machine.input()
    def _mechanismWithoutInitialResponse(self) -> None: ...
    @_machine.input()
    def _noMechanism(self) -> None: ...

    # -- states ------------------------------------------------------------------

    # Not started.
    @_machine.state(initial=True)
    def idle(self) -> None: ...
    # Waiting for the greeting.
    @_machine.state()
    def greeting(self) -> None: ...
    # Waiting for the greeting; STARTTLS comes first.
    @_machine.state()
    def greetingBeforeTLS(self) -> None: ...
    # CAPABILITY sent (over TLS, or in plain mode).
    @_machine.state()
    def capability(self) -> None: ...
    # CAPABILITY sent before STARTTLS.
    @_machine.state()
    def capabilityBeforeTLS(self) -> None: ...
    # Deciding whether the server offers STARTTLS.
    @_machine.state()
    def checkingStartTLS(self) -> None: ...
    # STARTTLS sent.
    @_machine.state()
    def startingTLS(self) -> None: ...
    # Deciding how to authenticate.
    @_machine.state()
    def choosingMechanism(self) -> None: ...
    # AUTHENTICATE sent without an initial response: waiting for ``+``.
    @_machine.state()
    def awaitingContinuation(self) -> None: ...
    # Credentials sent: waiting for the tagged answer.
    @_machine.state()
    def authenticating(self) -> None: ...
    # Credentials sent, and an untagged CAPABILITY came before the answer.
    @_machine.state()
    def authenticatingCapabilitiesSeen(self) -> None: ...
    # Logged in without capabilities in the OK: CAPABILITY sent.
    @_machine.state()
    def postLoginCapability(self) -> None: ...
    # The same, the untagged CAPABILITY has come.
    @_machine.state()
    def postLoginCapabilitySeen(self) -> None: ...
    # Done: the connection belongs to whoever takes it.
    @_machine.state()
    def loggedIn(self) -> None: ...
    # Done: the connection is being closed.
    @_machine.state()
    def failed(self) -> None: ...

    # -- outputs -----------------------------------------------------------------

    def send(self, command: bytes) -> None:
        """Send a tagged command; its tagged answer is the one expected next."""
        self._tag += 1
        self._lastTag = b"U%d" % self._tag
        self._io.sendLine(self._lastTag + b" " + command)

    @_machine.output()
    def _setCapabilities(self, capabilities: list[bytes]) -> None:
        self.capabilities = capabilities

    @_machine.output()
    def _askCapabilities(self) -> None:
        self.capabilities = []
        self.send(b"CAPABILITY")

    @_machine.output()
    def _checkStartTLS(self) -> None:
        if hasCapability(self.capabilities, b"STARTTLS"):
            self._offersStartTLS()
        else:
            self._lacksStartTLS()

    @_machine.output()
    def _sendStartTLS(self) -> None:
        self.send(b"STARTTLS")

    @_machine.output()
    def _upgrade(self) -> None:
        self._io.upgradeToTLS()

    @_machine.output()
    def _chooseMechanism(self) -> None:
        name = self.authenticator.getName()
        if not hasCapability(self.capabilities, b"AUTH=" + name):
            if name == b"XOAUTH2" and hasCapability(self.capabilities, b"AUTH=OAUTHBEARER"):
                self.authenticator = OAUTHBEARERAuthenticator(self.authenticator.user)
            else:
                self._noMechanism()
                return
        saslIR = hasCapability(self.capabilities, b"SASL-IR")
        # Capabilities change with the login; collect them afresh.
        self.capabilities = []
        self._initial = base64.b64encode(self.authenticator.challengeResponse(self._secret, b""))
        if saslIR:
            self._mechanismWithInitialResponse()
        else:
            self._mechanismWithoutInitialResponse()

    @_machine.output()
    def _authenticateWithInitialResponse(self) -> None:
        self.send(b"AUTHENTICATE " + self.authenticator.getName() + b" " + self._initial)

    @_machine.output()
    def _authenticate(self) -> None:
        self.send(b"AUTHENTICATE " + self.authenticator.getName())

    @_machine.output()
    def _sendInitialResponse(self) -> None:
        self._io.sendLine(self._initial)

    @_machine.output()
    def _answerErrorChallenge(self, payload: bytes) -> None:
        # The mechanism's answer to the error challenge; the tagged NO follows.
        # Its content does not matter (nor whether it is valid base64).
        try:
            challenge = base64.b64decode(payload, validate=False)
        except binascii.Error:
            challenge = b""
        challenge = challenge or b"\x00"
        self._io.sendLine(
            base64.b64encode(self.authenticator.challengeResponse(self._secret, challenge))
        )

    @_machine.output()
    def _succeed(self) -> None:
        self._io.loginSucceeded()

    def _fail(self, error: ProxyError) -> None:
        self._io.loginFailed(error)

    @_machine.output()
    def _failProtocol(self) -> None:
        self._fail(Unavailable("upstream-protocol"))

    @_machine.output()
    def _failBye(self) -> None:
        self._fail(imapThrottling(self._refusal) or Unavailable("upstream-bye"))

    @_machine.output()
    def _failCapability(self) -> None:
        self._fail(Unavailable("upstream-capability"))

    @_machine.output()
    def _failNoStartTLS(self) -> None:
        self._fail(Unavailable("upstream-no-starttls"))

    @_machine.output()
    def _failStartTLS(self) -> None:
        self._fail(Unavailable("upstream-starttls"))

    @_machine.output()
    def _failNoMechanism(self) -> None:
        self._fail(Unavailable("upstream-no-xoauth2"))

    @_machine.output()
    def _failLogin(self, code: bytes | None) -> None:
        throttled = None if code == b"LIMIT" else imapThrottling(self._refusal)
        if throttled is not None:
            self._fail(throttled)
        elif code == b"UNAVAILABLE":
            self._fail(Unavailable("upstream-unavailable"))
        elif code == b"LIMIT":
            self._fail(LimitReached())
        else:
            self._fail(UpstreamRejectedToken())

    @_machine.output()
    def _failLost(self, reason: Failure) -> None:
        # A refused certificate ends the connection too; say so, not "closed".
        self._fail(rejectionFor(reason, self._server) or Unavailable("upstream-closed"))

    # -- transitions ---------------------------------------------------------------

    _chatter = (untaggedOK, untaggedOKCapabilities, untaggedBye, untagged)

    idle.upon(start, enter=greeting, outputs=[])
    idle.upon(startWithTLS, enter=greetingBeforeTLS, outputs=[])

    # The greeting: OK (with or without capabilities), BYE, or not a server
    # to log in to (PREAUTH, garbage).
    greeting.upon(
        untaggedOKCapabilities,
        enter=choosingMechanism,
        outputs=[_setCapabilities, _chooseMechanism],
    )
    greeting.upon(untaggedOK, enter=capability, outputs=[_askCapabilities])
    greetingBeforeTLS.upon(
        untaggedOKCapabilities,
        enter=checkingStartTLS,
        outputs=[_setCapabilities, _checkStartTLS],
    )
    greetingBeforeTLS.upon(untaggedOK, enter=capabilityBeforeTLS, outputs=[_askCapabilities])
    _greetings = (greeting, greetingBeforeTLS)
    _tagged = (taggedOK, taggedOKCapabilities, taggedRefused)
    for _s in _greetings:
        _s.upon(untaggedBye, enter=failed, outputs=[_failBye])
        for _i in (untaggedCapabilities, untagged, continuation, *_tagged):
            _s.upon(_i, enter=failed, outputs=[_failProtocol])

    # CAPABILITY: collect, then decide.
    for _s, _next, _decide in (
        (capability, choosingMechanism, _chooseMechanism),
        (capabilityBeforeTLS, checkingStartTLS, _checkStartTLS),
    ):
        _s.upon(untaggedCapabilities, enter=_s, outputs=[_setCapabilities])
        _s.upon(continuation, enter=_s, outputs=[])
        _s.upon(taggedOK, enter=_next, outputs=[_decide])
        _s.upon(taggedOKCapabilities, enter=_next, outputs=[_setCapabilities, _decide])
        _s.upon(taggedRefused, enter=failed, outputs=[_failCapability])

    checkingStartTLS.upon(_offersStartTLS, enter=startingTLS, outputs=[_sendStartTLS])
    checkingStartTLS.upon(_lacksStartTLS, enter=failed, outputs=[_failNoStartTLS])

    # STARTTLS: upgrade, then ask again (what was said in the clear is void).
    startingTLS.upon(untaggedCapabilities, enter=startingTLS, outputs=[])
    startingTLS.upon(continuation, enter=startingTLS, outputs=[])
    startingTLS.upon(taggedOK, enter=capability, outputs=[_upgrade, _askCapabilities])
    startingTLS.upon(taggedOKCapabilities, enter=capability, outputs=[_upgrade, _askCapabilities])
    startingTLS.upon(taggedRefused, enter=failed, outputs=[_failStartTLS])

    choosingMechanism.upon(
        _mechanismWithInitialResponse,
        enter=authenticating,
        outputs=[_authenticateWithInitialResponse],
    )
    choosingMechanism.upon(
        _mechanismWithoutInitialResponse, enter=awaitingContinuation, outputs=[_authenticate]
    )
    choosingMechanism.upon(_noMechanism, enter=failed, outputs=[_failNoMechanism])

    # AUTHENTICATE without SASL-IR: the first "+" asks for the credentials.
    # Capabilities before that cannot be the logged-in session's.
    awaitingContinuation.upon(continuation, enter=authenticating, outputs=[_sendInitialResponse])
    awaitingContinuation.upon(untaggedCapabilities, enter=awaitingContinuation, outputs=[])
    awaitingContinuation.upon(taggedOK, enter=failed, outputs=[_failProtocol])
    awaitingContinuation.upon(taggedOKCapabilities, enter=failed, outputs=[_failProtocol])
    awaitingContinuation.upon(taggedRefused, enter=failed, outputs=[_failLogin])

    # Credentials sent: a "+" now is the error challenge; the answer decides.
    for _s in (authenticating, authenticatingCapabilitiesSeen):
        _s.upon(continuation, enter=_s, outputs=[_answerErrorChallenge])
        _s.upon(
            untaggedCapabilities, enter=authenticatingCapabilitiesSeen, outputs=[_setCapabilities]
        )
        _s.upon(taggedOKCapabilities, enter=loggedIn, outputs=[_setCapabilities, _succeed])
        _s.upon(taggedRefused, enter=failed, outputs=[_failLogin])
    authenticating.upon(taggedOK, enter=postLoginCapability, outputs=[_askCapabilities])
    authenticatingCapabilitiesSeen.upon(taggedOK, enter=loggedIn, outputs=[_succeed])

    # Logged in without capabilities: ask; an answer without them is a failure.
    for _s in (postLoginCapability, postLoginCapabilitySeen):
        _s.upon(untaggedCapabilities, enter=postLoginCapabilitySeen, outputs=[_setCapabilities])
        _s.upon(continuation, enter=_s, outputs=[])
        _s.upon(taggedRefused, enter=failed, outputs=[_failCapability])
    for _i in (taggedOK, taggedOKCapabilities):
        postLoginCapability.upon(_i, enter=failed, outputs=[_failCapability])
        postLoginCapabilitySeen.upon(_i, enter=loggedIn, outputs=[_succeed])

    # Every waiting state: the same for untagged chatter, bad lines and loss.
    _afterGreeting = [capability, capabilityBeforeTLS, startingTLS, awaitingContinuation]
    _afterGreeting += [authenticating, authenticatingCapabilitiesSeen]
    _afterGreeting += [postLoginCapability, postLoginCapabilitySeen]
    for _s in _afterGreeting:
        for _i in _chatter:
            _s.upon(_i, enter=_s, outputs=[])
    for _s in (*_greetings, *_afterGreeting):
        _s.upon(malformed, enter=failed, outputs=[_failProtocol])
        _s.upon(unusable, enter=failed, outputs=[_failProtocol])
        _s.upon(connectionLost, enter=failed, outputs=[_failLost])

    # Done: a failed login hears nothing more; a logged-in one only its end.
    for _i in (*_chatter, untaggedCapabilities, continuation, *_tagged):
        failed.upon(_i, enter=failed, outputs=[])
    for _i in (malformed, unusable, connectionLost):
        failed.upon(_i, enter=failed, outputs=[])
    loggedIn.upon(connectionLost, enter=loggedIn, outputs=[])
    loggedIn.upon(unusable, enter=loggedIn, outputs=[])
    del _s, _i, _next, _decide, _chatter, _tagged, _greetings, _afterGreeting
