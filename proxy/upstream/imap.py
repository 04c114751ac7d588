"""
The connection to a provider's IMAP server. The login itself is
``login.UpstreamLogin``'s; this protocol feeds it lines, then, logged in,
holds the connection for whoever takes it: a spare keeps reading (and keeps
what it reads) while it waits for a client, and the splice takes it over
with nothing consumed past the login. Those phases are a state machine too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from automat import MethodicalMachine
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
    _machine = MethodicalMachine()

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
        self._capabilities: list[bytes] = []
        self._authenticator: Any = None
        self._kept: list[bytes] = []
        self._keptSize = 0
        self._spareLost: Callable[[], Any] | None = None
        self._onLost: Callable[[Any], Any] | None = None
        self._closed: list[Deferred[None]] = []
        # Who reads the lines: set by the phase machine's outputs (a line is
        # the hot path of a login: no machine input per line).
        self._lines: Callable[[bytes], None] = self._login.lineReceived

    @property
    def capabilities(self) -> list[bytes]:
        """The server's capabilities; once logged in, the session's."""
        login = self._login
        return login.capabilities if login is not None else self._capabilities

    @property
    def authenticator(self) -> Any:
        login = self._login
        return login.authenticator if login is not None else self._authenticator

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
            self._unusable()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._unusable()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._lost(reason)
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
        return bool(self._claim()[-1])

    def takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        """
        From now on every byte read goes to ``sink``; ``onLost`` is called when
        the connection ends.

        :return: the bytes read after the login that were not parsed.
        """
        return self._takeOver(sink, onLost)[-1]  # type: ignore[no-any-return]

    # -- inputs ------------------------------------------------------------------

    # The login machine logged in.
    @_machine.input()
    def loginSucceeded(self) -> None: ...
    # The login machine gave up.
    @_machine.input()
    def loginFailed(self, error: ProxyError) -> None: ...
    @_machine.input()
    def keepAsSpare(self, onLost: Callable[[], Any]) -> None:
        """
        Logged in, waiting for a client: keep reading, so that a close (the
        server's idle logout) is noticed, and keep what arrives for the client.
        ``onLost`` is called if the connection ends meanwhile.
        """

    # Taken for a client.
    @_machine.input()
    def _claim(self) -> None: ...
    @_machine.input()
    def discard(self) -> None:
        """Log out a spare nobody took (or one made after it was no longer wanted)."""

    # The splice takes the connection.
    @_machine.input()
    def _takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> None: ...
    # A line too long, or a bug handling one.
    @_machine.input()
    def _unusable(self) -> None: ...
    # The connection ended.
    @_machine.input()
    def _lost(self, reason: Failure) -> None: ...

    # -- states --------------------------------------------------------------------

    # Lines go to the login machine.
    @_machine.state(initial=True)
    def loggingIn(self) -> None: ...
    # Logged in, paused, owned by whoever ``ready`` fired to.
    @_machine.state()
    def loggedIn(self) -> None: ...
    # Waiting in the pool for a client, reading.
    @_machine.state()
    def spare(self) -> None: ...
    # The splice's.
    @_machine.state()
    def relaying(self) -> None: ...
    # Failed, logged out, or gone.
    @_machine.state()
    def closed(self) -> None: ...

    # -- outputs -------------------------------------------------------------------

    # The login machine's own outputs run before any hand-over (which
    # drops it): the guards are for the type checker.

    @_machine.output()
    def _loginUnusable(self) -> None:
        if self._login is not None:
            self._login.unusable()

    @_machine.output()
    def _loginLost(self, reason: Failure) -> None:
        if self._login is not None:
            self._login.connectionLost(reason)

    @_machine.output()
    def _fireReady(self) -> None:
        keepSession(self.tlsOptions, self.transport)
        # Stop parsing: what follows belongs to the client's session.
        self._lines = self._ignore
        self.pauseProducing()
        self.ready.callback(self)

    @_machine.output()
    def _fireFailure(self, error: ProxyError) -> None:
        self._lines = self._ignore
        self.transport.loseConnection()
        self.ready.errback(error)

    @_machine.output()
    def _wait(self, onLost: Callable[[], Any]) -> None:
        self._spareLost = onLost
        self._lines = self._keep
        self.resumeProducing()

    def _ignore(self, line: bytes) -> None:
        pass

    def _keep(self, line: bytes) -> None:
        self._keptSize += len(line) + 2
        if self._keptSize > self.MAX_KEPT:
            self.transport.abortConnection()
            return
        self._kept.append(line + b"\r\n")

    @_machine.output()
    def _abort(self) -> None:
        # Its pool hears of it through connectionLost.
        self.transport.abortConnection()

    @_machine.output()
    def _tellPool(self) -> None:
        onLost, self._spareLost = self._spareLost, None
        if onLost is not None:
            onLost()

    @_machine.output()
    def _claimed(self) -> bool:
        self._spareLost = None
        self._lines = self._ignore
        self.pauseProducing()
        return True

    @_machine.output()
    def _notClaimed(self) -> bool:
        return False

    @_machine.output()
    def _logout(self) -> None:
        self._spareLost = None
        self._lines = self._ignore
        if self._login is not None:
            self._login.send(b"LOGOUT")
        self.transport.loseConnection()

    @_machine.output()
    def _handOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        leftover = b"".join(self._kept) + self.clearLineBuffer()
        self._kept = []
        login, self._login = self._login, None
        if login is not None:
            self._capabilities, self._authenticator = login.capabilities, login.authenticator
        self.sink = sink
        self._onLost = onLost
        self.paused = False
        self.setRawMode()
        return leftover

    @_machine.output()
    def _tellSplice(self, reason: Failure) -> None:
        if self._onLost is not None:
            self._onLost(reason)

    # -- transitions -----------------------------------------------------------------

    loggingIn.upon(_unusable, enter=loggingIn, outputs=[_loginUnusable])
    loggingIn.upon(_lost, enter=loggingIn, outputs=[_loginLost])
    loggingIn.upon(loginSucceeded, enter=loggedIn, outputs=[_fireReady])
    loggingIn.upon(loginFailed, enter=closed, outputs=[_fireFailure])
    loggingIn.upon(discard, enter=loggingIn, outputs=[])
    loggingIn.upon(_claim, enter=loggingIn, outputs=[_notClaimed])

    loggedIn.upon(keepAsSpare, enter=spare, outputs=[_wait])
    loggedIn.upon(_takeOver, enter=relaying, outputs=[_handOver])
    loggedIn.upon(discard, enter=closed, outputs=[_logout])
    loggedIn.upon(_claim, enter=loggedIn, outputs=[_notClaimed])
    # Paused: nothing is read; a loss reaches whoever takes it over as a
    # failed write, as before any splice.
    loggedIn.upon(_lost, enter=loggedIn, outputs=[])
    loggedIn.upon(_unusable, enter=loggedIn, outputs=[])

    spare.upon(_unusable, enter=spare, outputs=[_abort])
    spare.upon(_claim, enter=loggedIn, outputs=[_claimed])
    spare.upon(discard, enter=closed, outputs=[_logout])
    spare.upon(_lost, enter=closed, outputs=[_tellPool])

    relaying.upon(_lost, enter=closed, outputs=[_tellSplice])
    relaying.upon(_unusable, enter=relaying, outputs=[])
    relaying.upon(discard, enter=relaying, outputs=[])
    relaying.upon(_claim, enter=relaying, outputs=[_notClaimed])

    closed.upon(_unusable, enter=closed, outputs=[])
    closed.upon(_lost, enter=closed, outputs=[])
    closed.upon(discard, enter=closed, outputs=[])
    closed.upon(_claim, enter=closed, outputs=[_notClaimed])
