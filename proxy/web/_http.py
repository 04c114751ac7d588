"""
The HTTP layer under the API's routes: the request that bounds its body, the
channel that bounds the time a request may take to arrive, and the access
log that hides secrets.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

log = Logger(namespace="proxy.api")

MAX_BODY = 64 * 1024
# Seconds a client has to send a whole request, headers and body.
REQUEST_DEADLINE = 30.0


class LimitedRequest(server.Request):
    """
    A request whose body is bounded: past ``MAX_BODY`` bytes the rest is
    dropped unread into memory and the route answers 413.
    """

    tooLarge = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.tooLarge = True
            length = 0
        # A chunked body (no length) is bounded too: in memory, not on disk.
        super().gotLength(MAX_BODY if length is None else length)

    def handleContentChunk(self, data: bytes) -> None:
        assert self.content is not None
        if self.tooLarge or self.content.tell() + len(data) > MAX_BODY:
            self.tooLarge = True
            return
        super().handleContentChunk(data)


class DeadlineChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel with an absolute deadline on each request: from the
    connection (or the end of the previous response) to the last byte of the
    request's body, ``deadline`` seconds at most. The idle timer that
    ``HTTPChannel`` restarts at every byte cannot cut a client that sends a
    header byte a second; this one does, answering ``408`` and closing (a
    connection that has sent nothing is just closed).

    The timer is armed when the channel waits for a request and disarmed
    when one has fully arrived, so a slow route or a long response is never
    cut by it.
    """

    deadline = REQUEST_DEADLINE
    _deadlineCall: Any = None
    # Whether a byte of the awaited request has come: an idle keep-alive
    # connection is closed quietly, a request under way gets its 408.
    _begun = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._armDeadline()

    def dataReceived(self, data: bytes) -> None:
        if self._deadlineCall is not None:
            self._begun = True
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarmDeadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent and self.transport is not None:
            self._armDeadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarmDeadline()
        super().connectionLost(reason)

    def _armDeadline(self) -> None:
        self._disarmDeadline()
        self._begun = False
        self._deadlineCall = self.callLater(self.deadline, self._deadlinePassed)

    def _disarmDeadline(self) -> None:
        if self._deadlineCall is not None and self._deadlineCall.active():
            self._deadlineCall.cancel()
        self._deadlineCall = None

    def _deadlinePassed(self) -> None:
        self._deadlineCall = None
        assert self.transport is not None
        if not self._begun:
            self.timeoutConnection()
            return
        peer = getattr(self.transport.getPeer(), "host", "unknown")
        log.info(
            "API client {address} cut: no whole request within {deadline} s",
            address=peer,
            deadline=self.deadline,
        )
        body = json.dumps({"error": "request timeout", "statusCode": 408}).encode("ascii")
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        # Closes, and aborts after abortTimeout a client that does not read.
        self.timeoutConnection()


class DeadlineSite(server.Site):
    """A ``Site`` whose channels have a request deadline (``DeadlineChannel``)."""

    protocol = DeadlineChannel  # type: ignore[assignment]
    deadline = REQUEST_DEADLINE

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        # As HTTPFactory hands its timeOut to each channel.
        channel.deadline = self.deadline
        return channel


# 64 hex digits, each as it is or percent-encoded (the route decodes the
# path, so %61%62... is a token too).
_TOKEN_IN_PATH = re.compile(rb"(?:[0-9A-Fa-f]|%(?:3[0-9]|[46][1-6])){64}")
# The OAuth2 callback's one-time code and state are credentials too.
_SECRET_QUERY = re.compile(rb"(?<=[?&])(code|state)=[^&]*")


class _Redacted:
    """A request as the access log sees it: token-shaped path parts hidden."""

    def __init__(self, request: Any):
        self._request = request
        uri = _TOKEN_IN_PATH.sub(b"[token-or-id]", request.uri)
        self.uri = _SECRET_QUERY.sub(rb"\1=[redacted]", uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redactingLogFormatter(timestamp: str, request: Any) -> str:
    """
    The combined log format, minus secrets: ``DELETE /v1/token/<token>`` (the
    reference API's form) must not write the token into the access log.
    """
    return http.combinedLogFormatter(timestamp, _Redacted(request))


def page(title: str, text: str) -> bytes:
    """A minimal HTML page, for the mailbox owner's browser (onboarding)."""
    t, x = html.escape(title), html.escape(text)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{t}</title></head>"
        f"<body><h1>{t}</h1><p>{x}</p></body></html>"
    ).encode()
