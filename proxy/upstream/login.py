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
from typing import Any, Protocol

from automat import TypeMachineBuilder
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
    :ivar inputs: the machine's inputs (``_LoginInputs``), which
        ``lineReceived`` feeds.
    """

    def __init__(
        self, io: Any, authenticator: Any, secret: bytes, startTLS: bool, server: str = ""
    ):
        self._io = io
        self.authenticator = authenticator
        self._secret = secret
        self._server = server
        self.capabilities: tuple[bytes, ...] = ()
        self._tag = 0
        self._lastTag = b""
        self._initial = b""
        self._refusal = b""  # the last NO/BAD/BYE's text, for ``throttling``
        # Waiting for the greeting from the start: no input to begin.
        self.inputs: _LoginInputs = _LoginMachine(
            self, _greetingBeforeTLS if startTLS else _greeting
        )

    # -- sorting lines into inputs ----------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        """Feed one line of the server's (without its CRLF) to the machine."""
        inputs = self.inputs
        if line.startswith(b"+"):
            inputs.continuation(line[2:])
        elif line.startswith(b"* "):
            upper = line[:13].upper()
            if upper.startswith(b"* OK"):
                code, args = responseCode(line[5:])
                if code == b"CAPABILITY":
                    inputs.untaggedOKCapabilities(parseCapabilities(args))
                else:
                    inputs.untaggedOK()
            elif upper.startswith(b"* BYE"):
                self._refusal = line[5:]
                inputs.untaggedBye()
            elif upper == b"* CAPABILITY ":
                inputs.untaggedCapabilities(parseCapabilities(line[13:]))
            else:
                inputs.untagged()
        else:
            parts = line.split(b" ", 2)
            if len(parts) < 2 or parts[0] != self._lastTag:
                # Not a response, or one to a command never sent.
                inputs.malformed()
                return
            code, args = responseCode(parts[2] if len(parts) == 3 else b"")
            if parts[1].upper() != b"OK":
                self._refusal = parts[2] if len(parts) == 3 else b""
                inputs.taggedRefused(code)
            elif code == b"CAPABILITY":
                inputs.taggedOKCapabilities(parseCapabilities(args))
            else:
                inputs.taggedOK()

    def unusable(self) -> None:
        """The connection cannot be read on (a line too long, a bug)."""
        self.inputs.unusable()

    def connectionLost(self, reason: Failure) -> None:
        self.inputs.connectionLost(reason)

    def send(self, command: bytes) -> None:
        """Send a tagged command; its tagged answer is the one expected next."""
        self._tag += 1
        self._lastTag = b"U%d" % self._tag
        self._io.sendLine(self._lastTag + b" " + command)

    def fail(self, error: ProxyError) -> None:
        self._io.loginFailed(error)


class _LoginInputs(Protocol):
    """The login machine's inputs: one per kind of line, and the end."""

    def untaggedOK(self) -> None: ...
    def untaggedOKCapabilities(self, capabilities: tuple[bytes, ...]) -> None: ...
    def untaggedBye(self) -> None: ...
    def untaggedCapabilities(self, capabilities: tuple[bytes, ...]) -> None: ...
    def untagged(self) -> None: ...
    def continuation(self, payload: bytes) -> None: ...
    def taggedOK(self) -> None: ...
    def taggedOKCapabilities(self, capabilities: tuple[bytes, ...]) -> None: ...
    # The last command's tagged NO or BAD, with its response code.
    def taggedRefused(self, code: bytes | None) -> None: ...
    # A line that is no response, or a tagged one to a command never sent.
    def malformed(self) -> None: ...
    # The connection cannot be read on (a line too long, a bug).
    def unusable(self) -> None: ...
    def connectionLost(self, reason: Failure) -> None: ...
    # Internal: decisions on what the server offers.
    def offersStartTLS(self) -> None: ...
    def lacksStartTLS(self) -> None: ...
    def mechanismWithInitialResponse(self) -> None: ...
    def mechanismWithoutInitialResponse(self) -> None: ...
    def noMechanism(self) -> None: ...


_I = _LoginInputs
_login = TypeMachineBuilder(_LoginInputs, UpstreamLogin)

# -- states ------------------------------------------------------------------

# Waiting for the greeting.
_greeting = _login.state("greeting")
# Waiting for the greeting; STARTTLS comes first.
_greetingBeforeTLS = _login.state("greetingBeforeTLS")
# CAPABILITY sent (over TLS, or in plain mode).
_capability = _login.state("capability")
# CAPABILITY sent before STARTTLS.
_capabilityBeforeTLS = _login.state("capabilityBeforeTLS")
# Deciding whether the server offers STARTTLS.
_checkingStartTLS = _login.state("checkingStartTLS")
# STARTTLS sent.
_startingTLS = _login.state("startingTLS")
# Deciding how to authenticate.
_choosingMechanism = _login.state("choosingMechanism")
# AUTHENTICATE sent without an initial response: waiting for ``+``.
_awaitingContinuation = _login.state("awaitingContinuation")
# Credentials sent: waiting for the tagged answer.
_authenticating = _login.state("authenticating")
# Credentials sent, and an untagged CAPABILITY came before the answer.
_authenticatingCapabilitiesSeen = _login.state("authenticatingCapabilitiesSeen")
# Logged in without capabilities in the OK: CAPABILITY sent.
_postLoginCapability = _login.state("postLoginCapability")
# The same, the untagged CAPABILITY has come.
_postLoginCapabilitySeen = _login.state("postLoginCapabilitySeen")
# Done: the connection belongs to whoever takes it.
_loggedIn = _login.state("loggedIn")
# Done: the connection is being closed.
_failed = _login.state("failed")

# -- outputs: (inputs, login, the input's arguments) --------------------------

_Output = Any


def _setCapabilities(
    i: _LoginInputs, login: UpstreamLogin, capabilities: tuple[bytes, ...]
) -> None:
    login.capabilities = capabilities


def _askCapabilities(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
    login.capabilities = ()
    login.send(b"CAPABILITY")


def _checkStartTLS(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
    # An input from an output: Automat runs it once this transition is done.
    if hasCapability(login.capabilities, b"STARTTLS"):
        i.offersStartTLS()
    else:
        i.lacksStartTLS()


def _sendStartTLS(i: _LoginInputs, login: UpstreamLogin) -> None:
    login.send(b"STARTTLS")


def _upgrade(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
    login._io.upgradeToTLS()


def _chooseMechanism(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
    name = login.authenticator.getName()
    if not hasCapability(login.capabilities, b"AUTH=" + name):
        if name == b"XOAUTH2" and hasCapability(login.capabilities, b"AUTH=OAUTHBEARER"):
            login.authenticator = OAUTHBEARERAuthenticator(login.authenticator.user)
        else:
            i.noMechanism()
            return
    saslIR = hasCapability(login.capabilities, b"SASL-IR")
    # Capabilities change with the login; collect them afresh.
    login.capabilities = ()
    login._initial = base64.b64encode(login.authenticator.challengeResponse(login._secret, b""))
    if saslIR:
        i.mechanismWithInitialResponse()
    else:
        i.mechanismWithoutInitialResponse()


def _authenticateWithInitialResponse(i: _LoginInputs, login: UpstreamLogin) -> None:
    login.send(b"AUTHENTICATE " + login.authenticator.getName() + b" " + login._initial)


def _authenticate(i: _LoginInputs, login: UpstreamLogin) -> None:
    login.send(b"AUTHENTICATE " + login.authenticator.getName())


def _sendInitialResponse(i: _LoginInputs, login: UpstreamLogin, payload: bytes) -> None:
    login._io.sendLine(login._initial)


def _answerErrorChallenge(i: _LoginInputs, login: UpstreamLogin, payload: bytes) -> None:
    # The mechanism's answer to the error challenge; the tagged NO follows.
    # Its content does not matter (nor whether it is valid base64).
    try:
        challenge = base64.b64decode(payload, validate=False)
    except binascii.Error:
        challenge = b""
    challenge = challenge or b"\x00"
    login._io.sendLine(
        base64.b64encode(login.authenticator.challengeResponse(login._secret, challenge))
    )


def _succeed(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
    login._io.loginSucceeded()


def _failing(reason: str) -> _Output:
    def fail(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
        login.fail(Unavailable(reason))

    return fail


def _failBye(i: _LoginInputs, login: UpstreamLogin) -> None:
    login.fail(imapThrottling(login._refusal) or Unavailable("upstream-bye"))


def _failLogin(i: _LoginInputs, login: UpstreamLogin, code: bytes | None) -> None:
    throttled = None if code == b"LIMIT" else imapThrottling(login._refusal)
    if throttled is not None:
        login.fail(throttled)
    elif code == b"UNAVAILABLE":
        login.fail(Unavailable("upstream-unavailable"))
    elif code == b"LIMIT":
        login.fail(LimitReached())
    else:
        login.fail(UpstreamRejectedToken())


def _failLost(i: _LoginInputs, login: UpstreamLogin, reason: Failure) -> None:
    # A refused certificate ends the connection too; say so, not "closed".
    login.fail(rejectionFor(reason, login._server) or Unavailable("upstream-closed"))


_failProtocol = _failing("upstream-protocol")
_failCapability = _failing("upstream-capability")


def _both(first: _Output, then: _Output) -> _Output:
    def both(i: _LoginInputs, login: UpstreamLogin, *args: Any) -> None:
        first(i, login, *args)
        then(i, login, *args)

    return both


def _upon(old: Any, input: Any, new: Any, output: _Output | None = None) -> None:
    """``old`` upon ``input`` enters ``new``, with ``output`` (or none)."""
    transition = old.upon(input).to(new)
    if output is None:
        transition.returns(None)
    else:
        transition(output)


# -- transitions ---------------------------------------------------------------

_chatter = (_I.untaggedOK, _I.untaggedOKCapabilities, _I.untaggedBye, _I.untagged)
_tagged = (_I.taggedOK, _I.taggedOKCapabilities, _I.taggedRefused)

# The greeting: OK (with or without capabilities), BYE, or not a server
# to log in to (PREAUTH, garbage).
_upon(
    _greeting,
    _I.untaggedOKCapabilities,
    _choosingMechanism,
    _both(_setCapabilities, _chooseMechanism),
)
_upon(_greeting, _I.untaggedOK, _capability, _askCapabilities)
_upon(
    _greetingBeforeTLS,
    _I.untaggedOKCapabilities,
    _checkingStartTLS,
    _both(_setCapabilities, _checkStartTLS),
)
_upon(_greetingBeforeTLS, _I.untaggedOK, _capabilityBeforeTLS, _askCapabilities)
_greetings = (_greeting, _greetingBeforeTLS)
for _s in _greetings:
    _upon(_s, _I.untaggedBye, _failed, _failBye)
    for _i in (_I.untaggedCapabilities, _I.untagged, _I.continuation, *_tagged):
        _upon(_s, _i, _failed, _failProtocol)

# CAPABILITY: collect, then decide.
for _s, _next, _decide in (
    (_capability, _choosingMechanism, _chooseMechanism),
    (_capabilityBeforeTLS, _checkingStartTLS, _checkStartTLS),
):
    _upon(_s, _I.untaggedCapabilities, _s, _setCapabilities)
    _upon(_s, _I.continuation, _s)
    _upon(_s, _I.taggedOK, _next, _decide)
    _upon(_s, _I.taggedOKCapabilities, _next, _both(_setCapabilities, _decide))
    _upon(_s, _I.taggedRefused, _failed, _failCapability)

_upon(_checkingStartTLS, _I.offersStartTLS, _startingTLS, _sendStartTLS)
_upon(_checkingStartTLS, _I.lacksStartTLS, _failed, _failing("upstream-no-starttls"))

# STARTTLS: upgrade, then ask again (what was said in the clear is void).
_upon(_startingTLS, _I.untaggedCapabilities, _startingTLS)
_upon(_startingTLS, _I.continuation, _startingTLS)
_upgradeAndAsk = _both(_upgrade, _askCapabilities)
_upon(_startingTLS, _I.taggedOK, _capability, _upgradeAndAsk)
_upon(_startingTLS, _I.taggedOKCapabilities, _capability, _upgradeAndAsk)
_upon(_startingTLS, _I.taggedRefused, _failed, _failing("upstream-starttls"))

_upon(
    _choosingMechanism,
    _I.mechanismWithInitialResponse,
    _authenticating,
    _authenticateWithInitialResponse,
)
_upon(
    _choosingMechanism,
    _I.mechanismWithoutInitialResponse,
    _awaitingContinuation,
    _authenticate,
)
_upon(_choosingMechanism, _I.noMechanism, _failed, _failing("upstream-no-xoauth2"))

# AUTHENTICATE without SASL-IR: the first "+" asks for the credentials.
# Capabilities before that cannot be the logged-in session's.
_upon(_awaitingContinuation, _I.continuation, _authenticating, _sendInitialResponse)
_upon(_awaitingContinuation, _I.untaggedCapabilities, _awaitingContinuation)
_upon(_awaitingContinuation, _I.taggedOK, _failed, _failProtocol)
_upon(_awaitingContinuation, _I.taggedOKCapabilities, _failed, _failProtocol)
_upon(_awaitingContinuation, _I.taggedRefused, _failed, _failLogin)

# Credentials sent: a "+" now is the error challenge; the answer decides.
for _s in (_authenticating, _authenticatingCapabilitiesSeen):
    _upon(_s, _I.continuation, _s, _answerErrorChallenge)
    _upon(_s, _I.untaggedCapabilities, _authenticatingCapabilitiesSeen, _setCapabilities)
    _upon(_s, _I.taggedOKCapabilities, _loggedIn, _both(_setCapabilities, _succeed))
    _upon(_s, _I.taggedRefused, _failed, _failLogin)
_upon(_authenticating, _I.taggedOK, _postLoginCapability, _askCapabilities)
_upon(_authenticatingCapabilitiesSeen, _I.taggedOK, _loggedIn, _succeed)

# Logged in without capabilities: ask; an answer without them is a failure.
for _s in (_postLoginCapability, _postLoginCapabilitySeen):
    _upon(_s, _I.untaggedCapabilities, _postLoginCapabilitySeen, _setCapabilities)
    _upon(_s, _I.continuation, _s)
    _upon(_s, _I.taggedRefused, _failed, _failCapability)
for _i in (_I.taggedOK, _I.taggedOKCapabilities):
    _upon(_postLoginCapability, _i, _failed, _failCapability)
    _upon(_postLoginCapabilitySeen, _i, _loggedIn, _succeed)

# Every waiting state: the same for untagged chatter, bad lines and loss.
_afterGreeting = [_capability, _capabilityBeforeTLS, _startingTLS, _awaitingContinuation]
_afterGreeting += [_authenticating, _authenticatingCapabilitiesSeen]
_afterGreeting += [_postLoginCapability, _postLoginCapabilitySeen]
for _s in _afterGreeting:
    for _i in _chatter:
        _upon(_s, _i, _s)
for _s in (*_greetings, *_afterGreeting):
    _upon(_s, _I.malformed, _failed, _failProtocol)
    _upon(_s, _I.unusable, _failed, _failProtocol)
    _upon(_s, _I.connectionLost, _failed, _failLost)

# Done: a failed login hears nothing more; a logged-in one only its end.
_ignored: tuple[Any, ...] = (*_chatter, _I.untaggedCapabilities, _I.continuation, *_tagged)
for _i in (*_ignored, _I.malformed, _I.unusable, _I.connectionLost):
    _upon(_failed, _i, _failed)
_upon(_loggedIn, _I.connectionLost, _loggedIn)
_upon(_loggedIn, _I.unusable, _loggedIn)
del _s, _i, _next, _decide, _chatter, _tagged, _ignored, _greetings, _afterGreeting
_LoginMachine = _login.build()
