"""
Relaying a logged-in session: bytes both ways, untouched, in order, with flow
control (each transport is the other's producer), until either side closes.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger()


def tuneSocket(transport: Any) -> None:
    """
    TCP_NODELAY (IMAP is small commands and replies: no waiting on Nagle) and
    keepalive (an IDLE session lasts hours; dead peers must show up). TLS and
    PROXY-protocol wrappers pass these through to the socket; other
    transports (UNIX sockets, test transports) simply lack them.
    """
    for name in ("setTcpNoDelay", "setTcpKeepAlive"):
        method = getattr(transport, name, None)
        if method is not None:
            try:
                method(True)
            except (OSError, AttributeError):
                pass


class Splice:
    """
    Glue between the client's ``ProxyServer`` and the logged-in
    ``UpstreamProtocol``.

    :param onEnd: called once, with this splice, when both sides are done.
    """

    def __init__(self, client: Any, upstream: Any, label: str, onEnd: Any = None):
        self.client = client
        self.upstream = upstream
        self.label = label
        self._onEnd = onEnd
        self._ended = False

    def start(self, held: bytes) -> None:
        """
        :param held: what the client sent behind its login, not yet parsed;
            it goes upstream first, before anything read later.
        """
        ct = self.client.transport
        ut = self.upstream.transport
        leftover = self.upstream.takeOver(ct.write, self._upstreamLost)
        self.client.sink = ut.write
        ct.registerProducer(ut, True)
        ut.registerProducer(ct, True)
        if leftover:
            ct.write(leftover)
        if held:
            self.client.bytesReceived += len(held)
            ut.write(held)
        # The client's transport was paused while the login ran.
        self.client.paused = False
        ct.resumeProducing()
        ut.resumeProducing()

    def close(self) -> None:
        """End the session from outside (shutdown, revocation): both sides."""
        self.client.transport.loseConnection()
        self.upstream.transport.loseConnection()

    def clientLost(self) -> None:
        self.upstream.transport.loseConnection()
        self._end()

    def _upstreamLost(self, reason: Any) -> None:
        self.client.transport.loseConnection()
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        log.info(
            "session {label} ended: {up} bytes to the provider, {down} bytes to the client",
            label=self.label,
            up=self.client.bytesReceived,
            down=self.upstream.bytesReceived,
        )
        if self._onEnd is not None:
            self._onEnd(self)
