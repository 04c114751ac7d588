"""
A small, fast IMAP client for the benchmarks: one TLS socket with
TCP_NODELAY, a reusable receive buffer, ``recv_into`` for large literals and
``sendall`` of large chunks, so that the client is never what is measured.
The same client talks to Dovecot, to imapproxy and to the peer.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time

TIMEOUT = 60.0
_LITERAL = re.compile(rb"\{(\d+)\}$")
CHUNK = 1 << 20  # what one sendall hands the kernel (and the TLS layer)


class IMAPError(RuntimeError):
    """A command did not end in a tagged OK, or the server went away."""


class Login:
    """How a client logs in: the command after the greeting, minus the tag.

    :param command: e.g. ``b"LOGIN acct token"`` or ``b"AUTHENTICATE XOAUTH2 <b64>"``.
    """

    def __init__(self, command: bytes):
        self.command = command

    @classmethod
    def password(cls, user: str, password: str) -> Login:
        return cls(f"LOGIN {_astring(user)} {_astring(password)}".encode())

    @classmethod
    def xoauth2(cls, user: str, access_token: str) -> Login:
        sasl = f"user={user}\x01auth=Bearer {access_token}\x01\x01".encode()
        return cls(b"AUTHENTICATE XOAUTH2 " + base64.b64encode(sasl))


def _astring(s: str) -> str:
    if s and all(c.isalnum() or c in "-_.@+=/" for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Client:
    """One IMAP session over TLS (or plain TCP when *ctx* is None).

    :param buffer: a preallocated buffer large literals are read into; pass
        the same one to every client of a run to avoid allocating 50 MB each
        time.
    """

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext | None,
        host: str = "127.0.0.1",
        server_hostname: str = "localhost",
        buffer: bytearray | None = None,
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
        self.big = buffer
        self.last_literal = 0
        self._buf = bytearray()
        self._tag = 0
        self.capabilities: set[bytes] = set()
        greeting = self.line()
        if not greeting.startswith(b"* OK"):
            self.close()
            raise IMAPError(f"greeting: {greeting[:200]!r}")
        self._note_capabilities(greeting)

    # -- reading ------------------------------------------------------------

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise IMAPError(f"connection closed; pending {bytes(self._buf[:200])!r}")
        self._buf += chunk

    def line(self) -> bytes:
        """One line without its CRLF."""
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                return line
            self._fill()

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _into_big(self, n: int) -> None:
        """Read an *n*-byte literal into the preallocated buffer."""
        self.last_literal = n
        if self.big is None or len(self.big) < n:
            self.big = bytearray(n)
        view = memoryview(self.big)
        have = min(n, len(self._buf))
        view[:have] = self._buf[:have]
        del self._buf[:have]
        recv_into = self.sock.recv_into
        while have < n:
            got = recv_into(view[have:n])
            if not got:
                raise IMAPError("connection closed inside a literal")
            have += got

    def response(self, tag: bytes, big: bool = False) -> list[bytes]:
        """Lines up to the tagged one; literals inline (or, with *big*, kept
        in ``self.big`` and replaced by ``b"<literal N>"``)."""
        lines = []
        while True:
            line = self.line()
            m = _LITERAL.search(line)
            while m:
                n = int(m.group(1))
                if big and n > 65536:
                    self._into_big(n)
                    line += b"<literal %d>" % n
                else:
                    line += b"\r\n" + self._exactly(n)
                line += self.line()
                m = _LITERAL.search(line)
            lines.append(line)
            self._note_capabilities(line)
            if line.startswith(tag + b" "):
                status = line[len(tag) + 1 :]
                if not status.startswith(b"OK"):
                    raise IMAPError(f"{tag.decode()} {status[:300]!r}")
                return lines

    def _note_capabilities(self, line: bytes) -> None:
        up = line.upper()
        for marker in (b"[CAPABILITY ", b"* CAPABILITY "):
            i = up.find(marker)
            if i >= 0:
                rest = up[i + len(marker) :].split(b"]", 1)[0]
                self.capabilities = set(rest.split())

    # -- commands -----------------------------------------------------------

    def next_tag(self) -> bytes:
        self._tag += 1
        return b"a%d" % self._tag

    def command(self, cmd: bytes, big: bool = False) -> list[bytes]:
        tag = self.next_tag()
        self.sock.sendall(tag + b" " + cmd + b"\r\n")
        return self.response(tag, big=big)

    def login(self, login: Login) -> None:
        self.command(login.command)

    def capability(self) -> set[bytes]:
        self.command(b"CAPABILITY")
        return self.capabilities

    def append(self, mailbox: str, data: bytes | memoryview) -> str:
        """APPEND *data*; LITERAL+ when advertised (else a synchronizing
        literal). Returns which one was used."""
        if not self.capabilities:
            self.capability()
        plus = b"LITERAL+" in self.capabilities
        tag = self.next_tag()
        n = len(data)
        head = tag + b" APPEND " + mailbox.encode() + b" {%d%s}\r\n" % (n, b"+" if plus else b"")
        self.sock.sendall(head)
        if not plus:
            cont = self.line()
            if not cont.startswith(b"+"):
                raise IMAPError(f"APPEND: {cont[:200]!r}")
        view = memoryview(data)
        sendall = self.sock.sendall
        for i in range(0, n, CHUNK):
            sendall(view[i : i + CHUNK])
        sendall(b"\r\n")
        self.response(tag)
        return "LITERAL+" if plus else "synchronizing literal"

    def logout(self) -> None:
        try:
            self.command(b"LOGOUT")
        except (IMAPError, OSError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect_login(
    port: int, ctx: ssl.SSLContext | None, login: Login, buffer: bytearray | None = None
) -> tuple[Client, float]:
    """A logged-in client and the seconds from connect to the tagged OK."""
    started = time.perf_counter()
    c = Client(port, ctx, buffer=buffer)
    try:
        c.login(login)
    except BaseException:
        c.close()
        raise
    return c, time.perf_counter() - started
