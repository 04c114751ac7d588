"""
A webhook receiver for the tests: a real HTTP server on loopback, in its own
thread, that records every POST (headers, body, whether the signature holds
with the secret it was given) and answers what the test asks for (200 by
default; a list of statuses to answer first, for retries).

It checks the signature as a real receiver would (``verify`` below is the
docs' example): HMAC-SHA256 over ``TIMESTAMP.BODY``, compared in constant
time. Tests wait on :meth:`WebhookReceiver.wait_for`, which wakes on each
request: no polling, no sleep.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

__all__ = ["Delivery", "WebhookReceiver", "verify"]

MAX_BODY = 64 * 1024


def verify(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """The receiver's side of the signature (the docs show the same lines)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("sha256=" + mac, header)


@attrs.frozen
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    signed: bool
    status: int

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class WebhookReceiver:
    """
    :param secret: the key the proxy signs with.
    :param tls: ``(certificate, key)`` PEM files: https, else http.
    """

    def __init__(self, secret: bytes, tls: tuple[str, str] | None = None):
        self.secret = secret
        self.tls = tls
        self.deliveries: list[Delivery] = []
        # Connections that failed before a request (a TLS handshake refused).
        self.failures: list[str] = []
        self.answers: collections.deque[int] = collections.deque()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length", "0")), MAX_BODY)
                body = self.rfile.read(length)
                receiver._record(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads ``deliveries``

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                import sys

                receiver._failed(type(sys.exc_info()[1]).__name__)

        self._server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            # The handshake happens in the request's thread, on first read.
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self._server.server_address[1]}/hooks/imapproxy"
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/imapproxy"

    def _failed(self, error: str) -> None:
        with self._changed:
            self.failures.append(error)
            self._changed.notify_all()

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        signed = verify(
            self.secret,
            headers.get("x-imapproxy-timestamp", ""),
            body,
            headers.get("x-imapproxy-signature", ""),
        )
        with self._changed:
            status = self.answers.popleft() if self.answers else 200
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            self.deliveries.append(Delivery(handler.path, headers, body, signed, status))
            self._changed.notify_all()

    def wait_for(self, check: Any, timeout: float = 20.0, what: str = "deliveries") -> Any:
        """
        Wait until ``check(deliveries)`` is truthy (woken by each request);
        its result.

        :raises AssertionError: when ``timeout`` seconds pass first.
        """
        with self._changed:
            result = self._changed.wait_for(lambda: check(list(self.deliveries)), timeout)
        if not result:
            raise AssertionError(f"{what} not received within {timeout}s: {self.deliveries}")
        return result

    def wait_for_failure(self, timeout: float = 20.0) -> str:
        """The first connection that failed before a request (woken by it)."""
        with self._changed:
            result = self._changed.wait_for(lambda: list(self.failures), timeout)
        if not result:
            raise AssertionError(f"no failed connection within {timeout}s")
        return str(result[0])

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._changed:
            found = [d.event for d in self.deliveries]
        return [e for e in found if kind is None or e["type"] == kind]
