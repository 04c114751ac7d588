"""
The connection to a provider's IMAP server. The login itself is
``login.UpstreamLogin``'s; this protocol feeds it lines, then, logged in,
holds the connection for whoever takes it: a spare keeps reading (and keeps
what it reads) while it waits for a client, and the splice takes it over
with nothing consumed past the login. Those phases are a state machine too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import ProxyError
from ..relay import tuneSocket
from .login import ILoginIO, UpstreamLogin
from .tls import keepSession

log = Logger(namespace="proxy.upstream")


@implementer(ILoginIO)
class UpstreamProtocol(LineReceiver):
    """
    :param authenticator: an ``IClientAuthentication`` (XOAUTH2).
    :param secret: the access token.
    :param mode: ``implicit``, ``starttls`` or ``plain`` (the upstream's ``tls``).
    :param tlsOptions: the TLS options STARTTLS upgrades with.
    :param server: ``host:port``, for reports.
    :ivar ready: fires with this protocol once logged in, or errbacks with a
        ``ProxyError``.
    """

    MAX_LENGTH = 65536
    # What a spare keeps at most for its client, before it gives up.
    MAX_KEPT = 65536
    delimiter = b"\r\n"
    transport: Any

    def __init__(
        self,
        authenticator: Any,
        secret: bytes,
        mode: str,
        tlsOptions: Any = None,
        server: str = "",
    ):
        self.mode = mode
        self.tlsOptions = tlsOptions
        self.ready: Deferred[UpstreamProtocol] = Deferred()
        self.sink: Callable[[bytes], Any] | None = None
        self.bytesReceived = 0
        # The login machine, until the splice takes the connection: then its
        # results are kept and it goes, with the access token and the
        # XOAUTH2 string it holds.
        self._login: UpstreamLogin | None = UpstreamLogin(
            self, authenticator, secret, mode == "starttls", server
        )
        self._capabilities: tuple[bytes, ...] = ()
        self._kept: list[bytes] = []
        self._keptSize = 0
        self._spareLost: Callable[[], Any] | None = None
        self._onLost: Callable[[Any], Any] | None = None
        self._closed: list[Deferred[None]] = []
        # Who reads the lines: set by the phase machine's outputs (a line is
        # the hot path of a login: no machine input per line).
        self._lines: Callable[[bytes], None] = self._login.lineReceived
        self._phase: _Phase = _PhaseMachine(self)

    @property
    def capabilities(self) -> tuple[bytes, ...]:
        """The server's capabilities; once logged in, the session's."""
        login = self._login
        return login.capabilities if login is not None else self._capabilities

    @property
    def authenticator(self) -> Any:
        """The login's ``IClientAuthentication``; None once handed over."""
        login = self._login
        return login.authenticator if login is not None else None

    # -- what the transport says -----------------------------------------------

    def connectionMade(self) -> None:
        tuneSocket(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.sink is not None:
            self.bytesReceived += len(data)
            self.sink(data)
        else:
            LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        try:
            self._lines(line)
        except Exception:
            log.failure("unexpected upstream response handling error")
            self._phase.unusable()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._phase.unusable()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._phase.lost(reason)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    def notifyClosed(self) -> Deferred[None]:
        """:return: a Deferred that fires once the connection has ended."""
        d: Deferred[None] = Deferred()
        if not self.connected:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

    def rawDataReceived(self, data: bytes) -> None:
        # Only reached in relay mode, through LineReceiver; dataReceived
        # normally bypasses the parser entirely once ``sink`` is set.
        if self.sink is not None:
            self.sink(data)

    # -- what the login machine needs (ILoginIO) -------------------------------

    def upgradeToTLS(self) -> None:
        # Anything the server sent after its OK and before the handshake is
        # outside TLS: drop it rather than trust it.
        self.clearLineBuffer()
        self.transport.startTLS(self.tlsOptions)

    # -- what the pool and the splice call -------------------------------------

    def claim(self) -> bool:
        """Take a spare for a client; :return: False when it is closing."""
        if getattr(self.transport, "disconnecting", False):
            return False
        return self._phase.claim()

    def takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        """
        From now on every byte read goes to ``sink``; ``onLost`` is called when
        the connection ends.

        :return: the bytes read after the login that were not parsed.
        """
        return self._phase.takeOver(sink, onLost)

    def keepAsSpare(self, onLost: Callable[[], Any]) -> None:
        """
        Logged in, waiting for a client: keep reading, so that a close (the
        server's idle logout) is noticed, and keep what arrives for the client.
        ``onLost`` is called if the connection ends meanwhile.
        """
        self._phase.keepAsSpare(onLost)

    def discard(self) -> None:
        """Log out a spare nobody took (or one made after it was no longer wanted)."""
        self._phase.discard()

    # -- what the login machine says (ILoginIO) ----------------------------------

    def loginSucceeded(self) -> None:
        self._phase.loginSucceeded()
        # Outside the machine: whoever ``ready`` fires to may take the
        # connection over at once (``takeOver``, an input with a result).
        self.ready.callback(self)

    def loginFailed(self, error: ProxyError) -> None:
        self._phase.loginFailed(error)

    # -- the phase machine's outputs ------------------------------------------------

    def _keep(self, line: bytes) -> None:
        self._keptSize += len(line) + 2
        if self._keptSize > self.MAX_KEPT:
            self.transport.abortConnection()
            return
        self._kept.append(line + b"\r\n")

    def _handOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        leftover = b"".join(self._kept) + self.clearLineBuffer()
        self._kept = []
        login, self._login = self._login, None
        if login is not None:
            self._capabilities = login.capabilities
        self.sink = sink
        self._onLost = onLost
        self.paused = False
        self.setRawMode()
        return leftover

    def _logout(self) -> None:
        self._spareLost = None
        self._lines = _ignore
        if self._login is not None:
            self._login.send(b"LOGOUT")
        self.transport.loseConnection()


def _ignore(line: bytes) -> None:
    """What a connection's lines go to once they are not for the login (shared, not bound)."""


class _Phase(Protocol):
    """The phase machine's inputs (``UpstreamProtocol`` is its core)."""

    # The login machine logged in.
    def loginSucceeded(self) -> None: ...
    # The login machine gave up.
    def loginFailed(self, error: ProxyError) -> None: ...
    def keepAsSpare(self, onLost: Callable[[], Any]) -> None: ...
    # Taken for a client: True, or False when it cannot be.
    def claim(self) -> bool: ...
    def discard(self) -> None: ...
    # The splice takes the connection: the bytes read past the login.
    def takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes: ...
    # A line too long, or a bug handling one.
    def unusable(self) -> None: ...
    # The connection ended.
    def lost(self, reason: Failure) -> None: ...


_phases = TypeMachineBuilder(_Phase, UpstreamProtocol)
# Lines go to the login machine.
_loggingIn = _phases.state("loggingIn")
# Logged in, paused, owned by whoever ``ready`` fired to.
_loggedIn = _phases.state("loggedIn")
# Waiting in the pool for a client, reading.
_spare = _phases.state("spare")
# The splice's.
_relaying = _phases.state("relaying")
# Failed, logged out, or gone.
_closed = _phases.state("closed")

# The login machine's own inputs come before any hand-over (which drops
# it): the guards are for the type checker.


@_loggingIn.upon(_Phase.unusable).loop()
def _loginUnusable(phase: _Phase, p: UpstreamProtocol) -> None:
    if p._login is not None:
        p._login.unusable()


@_loggingIn.upon(_Phase.lost).loop()
def _loginLost(phase: _Phase, p: UpstreamProtocol, reason: Failure) -> None:
    if p._login is not None:
        p._login.connectionLost(reason)


@_loggingIn.upon(_Phase.loginSucceeded).to(_loggedIn)
def _loggedInNow(phase: _Phase, p: UpstreamProtocol) -> None:
    keepSession(p.tlsOptions, p.transport)
    # Stop parsing: what follows belongs to the client's session.
    p._lines = _ignore
    p.pauseProducing()


@_loggingIn.upon(_Phase.loginFailed).to(_closed)
def _fail(phase: _Phase, p: UpstreamProtocol, error: ProxyError) -> None:
    p._lines = _ignore
    p.transport.loseConnection()
    p.ready.errback(error)


@_loggedIn.upon(_Phase.keepAsSpare).to(_spare)
def _wait(phase: _Phase, p: UpstreamProtocol, onLost: Callable[[], Any]) -> None:
    p._spareLost = onLost
    p._lines = p._keep
    p.resumeProducing()


@_spare.upon(_Phase.claim).to(_loggedIn)
def _claimed(phase: _Phase, p: UpstreamProtocol) -> bool:
    p._spareLost = None
    p._lines = _ignore
    p.pauseProducing()
    return True


@_spare.upon(_Phase.unusable).loop()
def _abort(phase: _Phase, p: UpstreamProtocol) -> None:
    # Its pool hears of it through connectionLost.
    p.transport.abortConnection()


@_spare.upon(_Phase.lost).to(_closed)
def _tellPool(phase: _Phase, p: UpstreamProtocol, reason: Failure) -> None:
    onLost, p._spareLost = p._spareLost, None
    if onLost is not None:
        onLost()


@_relaying.upon(_Phase.lost).to(_closed)
def _tellSplice(phase: _Phase, p: UpstreamProtocol, reason: Failure) -> None:
    if p._onLost is not None:
        p._onLost(reason)


_loggedIn.upon(_Phase.takeOver).to(_relaying)(
    lambda phase, p, sink, onLost: p._handOver(sink, onLost)
)
for _s in (_loggedIn, _spare):
    _s.upon(_Phase.discard).to(_closed)(lambda phase, p: p._logout())
_loggingIn.upon(_Phase.discard).loop().returns(None)
for _s in (_loggingIn, _loggedIn, _relaying, _closed):
    _s.upon(_Phase.claim).loop().returns(False)
# Paused: nothing is read; a loss reaches whoever takes it over as a
# failed write, as before any splice.
for _s in (_loggedIn, _closed):
    _s.upon(_Phase.lost).loop().returns(None)
for _s in (_loggedIn, _relaying, _closed):
    _s.upon(_Phase.unusable).loop().returns(None)
for _s in (_relaying, _closed):
    _s.upon(_Phase.discard).loop().returns(None)
del _s
_PhaseMachine = _phases.build()
