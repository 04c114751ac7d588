"""Small helpers the integration tests share: clients, messages, raw sockets."""

from __future__ import annotations

import base64
import imaplib
import os
import socket
import ssl

TIMEOUT = 20


def message(size: int, subject: str = "test") -> bytes:
    """An RFC 5322 message of about ``size`` bytes with CRLF line ends."""
    head = (
        f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
        "Message-ID: <" + os.urandom(8).hex() + "@example.com>\r\n\r\n"
    ).encode()
    body = bytearray()
    while len(head) + len(body) < size:
        body += base64.b64encode(os.urandom(57)) + b"\r\n"
    return head + bytes(body)


def client_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    return ctx


def plain(port: int) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)


def tls(port: int, ca_file: str) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(
        "localhost", port, ssl_context=client_context(ca_file), timeout=TIMEOUT
    )


def direct(dovecot, email: str, access_token: str) -> imaplib.IMAP4_SSL:
    """A direct XOAUTH2 session with Dovecot, bypassing the proxy."""
    c = tls(dovecot.tls_port, dovecot.pki.ca_cert)
    auth = f"user={email}\x01auth=Bearer {access_token}\x01\x01".encode()
    c.authenticate("XOAUTH2", lambda chal: auth if not chal else b"")
    return c


class Raw:
    """A line-level IMAP client on a plain socket, for what libraries hide."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def until(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the one tagged ``tag``."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def closed(self) -> bool:
        """Reads until the peer closes; True when it did (EOF, not a timeout)."""
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def provider_access_token(provider, refresh_token: str, ca_file: str) -> str:
    """An access token straight from the fake provider (for direct sessions)."""
    import requests

    r = requests.post(
        provider.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": "app-client",
            "client_secret": "app-secret",
        },
        verify=ca_file,
        timeout=TIMEOUT,
    )
    r.raise_for_status()
    return r.json()["access_token"]
