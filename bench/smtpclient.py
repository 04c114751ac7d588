"""
A small SMTP submission client for the benchmarks, the SMTP sibling of
:mod:`bench.client`: one implicit-TLS socket with TCP_NODELAY, ``sendall`` of
1 MiB chunks of a message dot-stuffed in advance, and nothing else per
message (no parsing, no line-ending fixes), so that the client is never what
is measured. The same client talks to Dovecot submission, to imapproxy and to
the peer.

It does what Python's ``smtplib`` does on the wire (EHLO, AUTH with an
initial response, then per message ``MAIL FROM`` with ``SIZE=``/
``BODY=8BITMIME`` when offered, ``RCPT TO``, ``DATA``, each command waiting
for its reply), without ``smtplib``'s per-message copies of the whole message
(line-ending regex, dot-stuffing, encoding), which at 30 MB cost more than
the relay being measured.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time

TIMEOUT = 120.0
CHUNK = 1 << 20
EHLO_NAME = b"bench.example"


class SMTPError(RuntimeError):
    """A reply other than the one expected, or the server went away."""


class SMTPLogin:
    """How a client authenticates: the whole ``AUTH`` command line.

    :param command: e.g. ``b"AUTH PLAIN <b64>"`` or ``b"AUTH XOAUTH2 <b64>"``.
    """

    def __init__(self, command: bytes):
        self.command = command

    @classmethod
    def plain(cls, user: str, password: str) -> SMTPLogin:
        sasl = f"\0{user}\0{password}".encode()
        return cls(b"AUTH PLAIN " + base64.b64encode(sasl))

    @classmethod
    def xoauth2(cls, user: str, access_token: str) -> SMTPLogin:
        sasl = f"user={user}\x01auth=Bearer {access_token}\x01\x01".encode()
        return cls(b"AUTH XOAUTH2 " + base64.b64encode(sasl))


def stuff(message: bytes) -> bytes:
    """*message* (CRLF line ends) ready for DATA: dot-stuffed, ending in CRLF,
    followed by the terminating ``.`` line."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


class SMTPClient:
    """One SMTP session over implicit TLS (or plain TCP when *ctx* is None)."""

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext | None,
        host: str = "127.0.0.1",
        server_hostname: str = "localhost",
    ):
        raw = socket.create_connection((host, port), timeout=TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock: socket.socket = (
                ctx.wrap_socket(raw, server_hostname=server_hostname) if ctx else raw
            )
        except BaseException:
            raw.close()
            raise
        self._buf = bytearray()
        self.extensions: dict[bytes, bytes] = {}
        try:
            self.expect(b"220")
        except BaseException:
            self.close()
            raise

    # -- replies ------------------------------------------------------------

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SMTPError(f"connection closed; pending {bytes(self._buf[:200])!r}")
            self._buf += chunk

    def reply(self) -> list[bytes]:
        """The lines of one (possibly multi-line) reply, without CRLF."""
        lines = [self._line()]
        while len(lines[-1]) >= 4 and lines[-1][3:4] == b"-":
            lines.append(self._line())
        return lines

    def expect(self, code: bytes) -> list[bytes]:
        lines = self.reply()
        if not lines[-1].startswith(code):
            raise SMTPError(f"expected {code.decode()}, got {b' / '.join(lines)[:300]!r}")
        return lines

    def command(self, line: bytes, code: bytes = b"250") -> list[bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    # -- the session --------------------------------------------------------

    def ehlo(self) -> None:
        lines = self.command(b"EHLO " + EHLO_NAME)
        self.extensions = {}
        for line in lines[1:]:
            keyword, _, params = line[4:].partition(b" ")
            self.extensions[keyword.upper()] = params

    def login(self, login: SMTPLogin) -> None:
        self.command(login.command, b"235")

    def send(self, mail_from: bytes, rcpt: bytes, stuffed: bytes, size: int) -> None:
        """One transaction: *stuffed* is :func:`stuff`'s output for a
        message of *size* bytes. Waits for each reply (no pipelining across a
        transaction boundary: Dovecot 2.3.19's submission can crash on it)."""
        params = b""
        if b"SIZE" in self.extensions:
            params += b" SIZE=%d" % size
        if b"8BITMIME" in self.extensions:
            params += b" BODY=8BITMIME"
        self.command(b"MAIL FROM:<" + mail_from + b">" + params)
        self.command(b"RCPT TO:<" + rcpt + b">")
        self.command(b"DATA", b"354")
        view = memoryview(stuffed)
        sendall = self.sock.sendall
        for i in range(0, len(view), CHUNK):
            sendall(view[i : i + CHUNK])
        self.expect(b"250")

    def quit(self) -> None:
        try:
            self.command(b"QUIT", b"221")
        except (SMTPError, OSError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect_login(
    host: str, port: int, ctx: ssl.SSLContext | None, login: SMTPLogin
) -> tuple[SMTPClient, float]:
    """A logged-in client and the seconds from connect to the ``235``:
    TCP connect, TLS handshake, greeting, EHLO, AUTH."""
    started = time.perf_counter()
    c = SMTPClient(port, ctx, host=host)
    try:
        c.ehlo()
        c.login(login)
    except BaseException:
        c.close()
        raise
    return c, time.perf_counter() - started
