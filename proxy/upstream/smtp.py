"""
The connection to a provider's SMTP submission server. The login itself is
``smtplogin.SMTPLogin``'s; this protocol feeds it lines, then, logged in,
holds the connection, paused, for the splice, which takes it over with
nothing consumed past the provider's ``235``: the same hand-over as
``imap.UpstreamProtocol``, so ``proxy.relay.Splice`` relays either.

There is no pool of spare SMTP connections, unlike IMAP: providers drop an
idle SMTP connection within minutes (Dovecot after 3 minutes before
AUTH, 10 after), and Microsoft 365 allows only three at a time per
mailbox, so a spare would mostly cost a client its slot, and the time it
saves (one TLS handshake and an AUTH) is small beside sending a message.
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
from .login import ILoginIO
from .smtplogin import SMTPLogin
from .smtpreplies import DEFAULT_EHLO_NAME
from .tls import keepSession

log = Logger(namespace="proxy.upstream")


@implementer(ILoginIO)
class SMTPUpstreamProtocol(LineReceiver):
    """
    :param authenticator: an ``IClientAuthentication`` (XOAUTH2), or None
        to look at what the server offers without logging in.
    :param secret: the access token.
    :param mode: ``implicit``, ``starttls`` or ``plain`` (the upstream's ``tls``).
    :param tlsOptions: the TLS options STARTTLS upgrades with.
    :param server: ``host:port``, for reports.
    :param ehloName: the name to say EHLO with.
    :ivar ready: fires with this protocol once logged in (or, without an
        authenticator, once the server said what it offers), or errbacks
        with a ``ProxyError``.
    """

    # A reply line is at most 512 octets (RFC 5321 4.5.3.1.5); providers
    # exceed that a little, never by this much.
    MAX_LENGTH = 4096
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
        ehloName: str = DEFAULT_EHLO_NAME,
    ):
        self.mode = mode
        self.tlsOptions = tlsOptions
        self.server = server
        self.ready: Deferred[SMTPUpstreamProtocol] = Deferred()
        self.sink: Callable[[bytes], Any] | None = None
        self.bytesReceived = 0
        self._closed: list[Deferred[None]] = []
        self._onLost: Callable[[Any], Any] | None = None
        self._login = SMTPLogin(self, authenticator, secret, mode == "starttls", ehloName, server)
        self._lines: Callable[[bytes], None] = self._login.lineReceived

    @property
    def extensions(self) -> list[bytes]:
        """What the server's EHLO offered (over TLS, when there is TLS)."""
        return self._login.extensions

    @property
    def authenticator(self) -> Any:
        return self._login.authenticator

    def notifyClosed(self) -> Deferred[None]:
        """:return: a Deferred that fires once the connection has ended."""
        d: Deferred[None] = Deferred()
        if not self.connected:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

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
            log.failure("unexpected upstream SMTP reply handling error")
            self._unusable()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._unusable()

    def rawDataReceived(self, data: bytes) -> None:
        # Only reached in relay mode, through LineReceiver.
        if self.sink is not None:
            self.sink(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._lost(reason)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    # -- what the login machine needs (ILoginIO) -------------------------------

    def upgradeToTLS(self) -> None:
        # Anything the server sent after its 220 and before the handshake is
        # outside TLS: drop it rather than trust it.
        self.clearLineBuffer()
        self.transport.startTLS(self.tlsOptions)

    # -- what the splice, the realm and the probe call -------------------------

    def takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        """
        From now on every byte read goes to ``sink``; ``onLost`` is called when
        the connection ends.

        :return: the bytes read after the ``235`` that were not parsed.
        """
        return self._takeOver(sink, onLost)[-1]  # type: ignore[no-any-return]

    # -- inputs ------------------------------------------------------------------

    @_machine.input()
    def loginSucceeded(self) -> None: ...
    @_machine.input()
    def loginFailed(self, error: ProxyError) -> None: ...
    @_machine.input()
    def quit(self) -> None:
        """Say QUIT and close (a probe done, or a session nobody took)."""

    @_machine.input()
    def _takeOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> None: ...
    # A line too long, or a bug handling one.
    @_machine.input()
    def _unusable(self) -> None: ...
    @_machine.input()
    def _lost(self, reason: Failure) -> None: ...

    # -- states --------------------------------------------------------------------

    # Lines go to the login machine.
    @_machine.state(initial=True)
    def loggingIn(self) -> None: ...
    # Logged in, paused, owned by whoever ``ready`` fired to.
    @_machine.state()
    def loggedIn(self) -> None: ...
    # The splice's.
    @_machine.state()
    def relaying(self) -> None: ...
    # Failed, quit, or gone.
    @_machine.state()
    def closed(self) -> None: ...

    # -- outputs -------------------------------------------------------------------

    @_machine.output()
    def _loginUnusable(self) -> None:
        self._login.unusable()

    @_machine.output()
    def _loginLost(self, reason: Failure) -> None:
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

    def _ignore(self, line: bytes) -> None:
        pass

    @_machine.output()
    def _sayQuit(self) -> None:
        self.sendLine(b"QUIT")
        # Read on (ignoring it) so the server's close is seen: a TLS close
        # waits for the peer's, which a paused connection never reads.
        self.resumeProducing()
        self.transport.loseConnection()

    @_machine.output()
    def _handOver(self, sink: Callable[[bytes], Any], onLost: Callable[[Any], Any]) -> bytes:
        leftover = self.clearLineBuffer()
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
    loggingIn.upon(quit, enter=loggingIn, outputs=[])

    loggedIn.upon(_takeOver, enter=relaying, outputs=[_handOver])
    loggedIn.upon(quit, enter=closed, outputs=[_sayQuit])
    # Paused: nothing is read; a loss reaches whoever takes it over as a
    # failed write, as before any splice.
    loggedIn.upon(_lost, enter=loggedIn, outputs=[])
    loggedIn.upon(_unusable, enter=loggedIn, outputs=[])

    relaying.upon(_lost, enter=closed, outputs=[_tellSplice])
    relaying.upon(_unusable, enter=relaying, outputs=[])
    relaying.upon(quit, enter=relaying, outputs=[])

    closed.upon(_unusable, enter=closed, outputs=[])
    closed.upon(_lost, enter=closed, outputs=[])
    closed.upon(quit, enter=closed, outputs=[])
