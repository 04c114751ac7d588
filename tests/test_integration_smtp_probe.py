"""
Adversarial probes of the SMTP front door of the real ``twistd imapproxy``,
on raw sockets: odd bytes in every pre-auth state, AUTH LOGIN with the token
pasted as the user name, cancels, bad base64, a large BDAT chunk before
AUTH, and an AUTH line of RFC 4954's 12288 octets. Each connection gets its
fixed replies and the log stays free of tracebacks, internal errors and the
secrets the client sent.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading

import pytest

from tests.conftest import ISSUED_SECRETS, register
from tests.imaputil import TIMEOUT
from tests.upstream.proxyproc import ProxyProcess


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Raw:
    """A raw SMTP client: send bytes, read whole replies."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0].startswith(b"220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        """One reply, every line of it (without CRLF)."""
        lines = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), line
            lines.append(line[:-2])
            if line[3:4] != b"-":
                return lines

    def ask(self, data: bytes) -> bytes:
        """Send and return the last line of the one reply."""
        self.send(data)
        return self.reply()[-1]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def smtp_token(proxy, account: str) -> str:
    token = proxy.cli(
        "tokens", "issue", "--account", account, "--scope", "smtp", "--description", "probe"
    ).stdout.strip()
    ISSUED_SECRETS.append(token)
    return token


def test_adversarial_preauth_bytes(proxy, mailbox):
    """Odd input in every pre-auth state: fixed replies, and no traceback in the log."""
    c = Raw(proxy.smtp_port)
    try:
        assert c.ask(b"EHLO \xff\xfe\x00\r\n").startswith(b"501 ")
        assert c.ask(b"EHLO client.example\r\n").startswith(b"250 ")
        assert c.ask(b"\x00\x01\x02\r\n").startswith(b"500 ")
        assert c.ask(b"AUTH PLAIN *\r\n").startswith(b"501 ")
        assert c.ask(b"AUTH PLAIN !!!notbase64\r\n").startswith(b"501 ")
        assert c.ask(b"AUTH PLAIN " + b64(b"\0\xff\xfe\0\xff") + b"\r\n").startswith(b"535 ")
        assert c.ask(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6"
        assert c.ask(b"*\r\n").startswith(b"501 ")
        # A chunk streamed before AUTH is read past, not parsed nor kept.
        c.send(b"BDAT 1048576 LAST\r\n")
        c.send(b"RSET\r\n" * (1048576 // 6) + b"x" * (1048576 % 6))
        assert c.reply() == [b"530 5.7.0 Authentication required"]
        assert c.ask(b"NOOP\r\n") == b"250 2.0.0 Ok"
    finally:
        c.close()
    c = Raw(proxy.smtp_port)
    try:
        # A line without end, far past every bound: refused once, the rest dropped.
        c.send(b"A" * 200_000)
        assert c.reply() == [b"500 5.5.6 Line too long"]
        assert c.ask(b"\r\nNOOP\r\n") == b"250 2.0.0 Ok"
    finally:
        c.close()
    log = proxy.full_log()
    for bad in ("Traceback", "Unhandled", "internal error"):
        assert bad not in log, bad


def test_token_as_login_user_name_not_logged(proxy, mailbox):
    """AUTH LOGIN with the token in the user name step: refused, and never logged."""
    token = smtp_token(proxy, mailbox.account)
    c = Raw(proxy.smtp_port)
    try:
        assert c.ask(b"EHLO client.example\r\n").startswith(b"250 ")
        assert c.ask(b"AUTH LOGIN " + b64(token.encode()) + b"\r\n") == b"334 UGFzc3dvcmQ6"
        assert c.ask(b64(token.encode()) + b"\r\n").startswith(b"535 5.7.8 ")
    finally:
        c.close()
    proxy.wait_for_log("smtp login refused for - from 127.0.0.1")
    log = proxy.full_log()
    assert token not in log
    assert b64(token.encode()).decode() not in log


def test_account_without_smtp_server(proxy, mailbox):
    """A good smtp token for an account with no SMTP server: its fixed 5xx; AUTH again works."""
    token = smtp_token(proxy, mailbox.account)
    c = Raw(proxy.smtp_port)
    try:
        assert c.ask(b"EHLO client.example\r\n").startswith(b"250 ")
        response = b64(b"\0" + mailbox.account.encode() + b"\0" + token.encode())
        reply = c.ask(b"AUTH PLAIN " + response + b"\r\nNOOP\r\n")
        assert reply.startswith(b"535 5.7.8 "), reply
        # The NOOP held behind the AUTH is answered after the refusal.
        assert c.reply() == [b"250 2.0.0 Ok"]
        assert c.ask(b"QUIT\r\n") == b"221 2.0.0 Bye"
    finally:
        c.close()
    log = proxy.full_log()
    assert token not in log
    assert response.decode() not in log


def test_auth_line_of_12288_octets(proxy, mailbox):
    """RFC 4954's 12288-octet AUTH line is read (past the 8192 of --max-line-length)."""
    c = Raw(proxy.smtp_port)
    try:
        assert c.ask(b"EHLO client.example\r\n").startswith(b"250 ")
        raw = b"\0" + mailbox.account.encode() + b"\0" + b"t" * 9000
        line = b"AUTH PLAIN " + b64(raw)
        assert 8192 < len(line) + 2 <= 12288
        # A token of the wrong shape: refused as a login, not as a line.
        assert c.ask(line + b"\r\n").startswith(b"535 5.7.8 ")
    finally:
        c.close()


def test_starttls_then_garbage_or_gone(proxy, mailbox):
    """A STARTTLS answered with bytes that are no TLS, or a client gone: no traceback."""
    for after in (b"EHLO x\r\n" * 50, b"\x16\x03\x01\x00\x05hello", b""):
        c = Raw(proxy.smtp_port)
        try:
            assert c.ask(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS"
            if after:
                c.send(after)
                # The handshake fails: a TLS alert at most, then EOF; never a reply in clear.
                rest = c.file.read()
                assert rest == b"" or rest.startswith(b"\x15\x03"), rest
        finally:
            c.close()
    # A client gone in the middle of its AUTH LOGIN, and one gone right after AUTH.
    token = smtp_token(proxy, mailbox.account)
    response = b64(b"\0" + mailbox.account.encode() + b"\0" + token.encode())
    for data in (b"AUTH LOGIN\r\n", b"AUTH PLAIN " + response + b"\r\nMAIL FROM:<>\r\n"):
        c = Raw(proxy.smtp_port)
        c.ask(b"EHLO client.example\r\n")
        c.send(data)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    c = Raw(proxy.smtp_port)
    assert c.ask(b"NOOP\r\n") == b"250 2.0.0 Ok"
    c.close()
    log = proxy.full_log()
    for bad in ("Traceback", "Unhandled", "internal error"):
        assert bad not in log, bad


# -- a provider new to a running proxy -------------------------------------


class ScriptedSubmission:
    """
    A scripted XOAUTH2 submission server on loopback (implicit TLS with the
    test PKI's certificate), offering ``extensions``; it takes any XOAUTH2
    string and keeps what each logged-in connection sends. Only the
    proxy's logins reach it: no Dovecot submission instance is needed to
    see which EHLO a client was offered and whether it was spliced.
    """

    def __init__(self, pki, extensions: list[bytes]):
        self.extensions = extensions
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.cert, pki.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.logins = 0
        # The XOAUTH2 strings (base64) the proxy logged in with.
        self.auth: list[str] = []
        self.received: list[bytes] = []
        self.closed = threading.Event()
        # When set: AUTH is seen, and answered only once ``release`` is set.
        self.hold: threading.Event | None = None
        self.authSeen = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                f = tls.makefile("rb")
                tls.sendall(b"220 scripted ESMTP\r\n")
                for line in iter(f.readline, b""):
                    verb = line.split()[0].upper() if line.split() else b""
                    if verb == b"EHLO":
                        lines = [b"scripted", *self.extensions, b"AUTH XOAUTH2"]
                        tls.sendall(
                            b"".join(b"250-" + x + b"\r\n" for x in lines[:-1])
                            + b"250 "
                            + lines[-1]
                            + b"\r\n"
                        )
                    elif verb == b"AUTH":
                        self.logins += 1
                        self.auth.append(line.split()[-1].decode())
                        self.authSeen.set()
                        if self.hold is not None:
                            self.hold.wait(TIMEOUT)
                        tls.sendall(b"235 2.7.0 Accepted\r\n")
                    elif verb == b"QUIT":
                        tls.sendall(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        self.received.append(line)
                        tls.sendall(b"250 2.0.0 Ok\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.closed.set()

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def own_proxy(pki, tmp_path):
    p = ProxyProcess(str(tmp_path / "proxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    yield p
    p.stop()


def new_account(proxy, provider, dovecot, pki, server: ScriptedSubmission) -> tuple[str, str]:
    """An account whose SMTP server is ``server``; :return: its id and an smtp token."""
    account = register(proxy, provider, dovecot, pki).account
    proxy.cli(
        "accounts",
        "update",
        account,
        *("--smtp-host", "localhost", "--smtp-port", str(server.port)),
        *("--smtp-tls", "implicit", "--smtp-ca-file", pki.ca_cert),
    )
    return account, smtp_token(proxy, account)


def test_provider_added_while_running(own_proxy, provider, dovecot, pki):
    """
    A stored account's server is probed at start-up and offered; an account
    added later on a server with less gets, on its first AUTH, a 454 (not a
    splice under promises its server cannot keep), and after EHLO again
    the narrower offer and its 235.
    """
    rich = ScriptedSubmission(pki, [b"SIZE 35882577", b"8BITMIME", b"CHUNKING", b"SMTPUTF8"])
    poor = ScriptedSubmission(pki, [b"SIZE 1000", b"8BITMIME"])
    try:
        own_proxy.start()
        new_account(own_proxy, provider, dovecot, pki, rich)
        own_proxy.stop()
        own_proxy.start()
        own_proxy.wait_for_log(f"SMTP server localhost:{rich.port} offers")
        account, token = new_account(own_proxy, provider, dovecot, pki, poor)
        response = b64(b"\0" + account.encode() + b"\0" + token.encode())
        c = Raw(own_proxy.smtp_port)
        try:
            c.send(b"EHLO client.example\r\n")
            assert b"250-SMTPUTF8" in c.reply()
            reply = c.ask(b"AUTH PLAIN " + response + b"\r\n")
            assert reply.startswith(b"454 4.7.0 "), reply
            c.send(b"EHLO client.example\r\n")
            offer = c.reply()
            assert offer[1:3] == [b"250-SIZE 1000", b"250-8BITMIME"], offer
            assert b"250-SMTPUTF8" not in offer
            assert c.ask(b"AUTH PLAIN " + response + b"\r\n") == (
                b"235 2.7.0 Authentication successful"
            )
            assert c.ask(b"MAIL FROM:<a@example.com>\r\n") == b"250 2.0.0 Ok"
        finally:
            c.close()
        assert poor.logins == 2
        assert poor.received == [b"MAIL FROM:<a@example.com>\r\n"]
        log = own_proxy.full_log()
        assert token not in log and response.decode() not in log
        assert len(poor.auth) == 2
        for xoauth2 in poor.auth:
            assert xoauth2 not in log
            bearer = base64.b64decode(xoauth2).split(b"auth=Bearer ")[1].split(b"\x01")[0]
            assert bearer.decode() not in log
    finally:
        rich.stop()
        poor.stop()


def test_client_gone_during_upstream_login(own_proxy, provider, dovecot, pki):
    """
    A client that leaves while its provider login runs: once the provider
    says 235, the proxy closes that connection; nothing is spliced or sent.
    """
    server = ScriptedSubmission(pki, [b"8BITMIME"])
    server.hold = threading.Event()
    try:
        own_proxy.start()
        account, token = new_account(own_proxy, provider, dovecot, pki, server)
        response = b64(b"\0" + account.encode() + b"\0" + token.encode())
        c = Raw(own_proxy.smtp_port)
        c.ask(b"EHLO client.example\r\n")
        c.send(b"AUTH PLAIN " + response + b"\r\nMAIL FROM:<a@example.com>\r\n")
        assert server.authSeen.wait(TIMEOUT)
        # The client leaves; the proxy closing its end shows it saw that,
        # before the provider's 235 is let through.
        c.sock.shutdown(socket.SHUT_WR)
        assert c.file.read() == b""
        c.close()
        server.hold.set()
        assert server.closed.wait(TIMEOUT), "the provider connection was left open"
        assert server.received == []
        own_proxy.wait_for_log("SMTP listening")
        log = own_proxy.full_log()
        assert "spliced" not in log
        for bad in ("Traceback", "Unhandled", "internal error"):
            assert bad not in log, bad
    finally:
        server.stop()
