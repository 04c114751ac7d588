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
import os
import socket
import uuid

import pytest

from tests.conftest import ISSUED_SECRETS, register
from tests.imaputil import TIMEOUT
from tests.upstream.certs import make_pki
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.smtpsink import SMTPSink
from tests.upstream.submission import Submission, strip_received


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


# -- a provider new to a running proxy, a client gone mid-login ----------


@pytest.fixture
def own_proxy(pki, tmp_path):
    p = ProxyProcess(str(tmp_path / "proxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    yield p
    p.stop()


def new_account(proxy, provider, dovecot, pki, server: Submission) -> tuple[str, str, str]:
    """An account whose SMTP server is ``server``; :return: its id, e-mail and an smtp token."""
    box = register(proxy, provider, dovecot, pki)
    proxy.cli(
        "accounts",
        "update",
        box.account,
        *("--smtp-host", server.host, "--smtp-port", str(server.tls_port)),
        *("--smtp-tls", "implicit", "--smtp-ca-file", server.ca_cert),
    )
    return box.account, box.email, smtp_token(proxy, box.account)


def plain_response(account: str, token: str) -> bytes:
    return b64(b"\0" + account.encode() + b"\0" + token.encode())


def sample(tag: str) -> bytes:
    return f"From: a@example.com\r\nTo: b@example.net\r\nSubject: {tag}\r\n\r\nhello\r\n".encode()


def send_message(c: Raw, data: bytes) -> None:
    """One transaction, each command's reply awaited (Dovecot's pipelining gotcha)."""
    assert c.ask(b"MAIL FROM:<a@example.com>\r\n").startswith(b"250 ")
    assert c.ask(b"RCPT TO:<b@example.net>\r\n").startswith(b"250 ")
    assert c.ask(b"DATA\r\n").startswith(b"354 ")
    assert c.ask(data + b".\r\n").startswith(b"250 ")


@pytest.fixture
def small_submission(workdir, provider):
    """A second Dovecot submission server, with its own sink, offering a smaller SIZE."""
    sink = SMTPSink()
    sink.start()
    own = make_pki(
        os.path.join(workdir, f"pki-smtp-{uuid.uuid4().hex[:8]}"), extra_ips=(Submission.host,)
    )
    server = Submission(own, provider.introspection_url, sink, max_mail_size=100_000)
    try:
        server.start()
        yield server
    finally:
        server.close()
        sink.stop()


def test_provider_added_while_running(
    own_proxy, provider, dovecot, pki, submission, smtp_sink, small_submission
):
    """
    A server learned from a login is offered; an account added later, with
    the admin command while the proxy runs, on a server with a smaller SIZE
    gets, on its first AUTH, a 454 (not a splice under promises its server
    cannot keep), and after EHLO again the narrower offer and its 235.
    """
    own_proxy.start()
    big, _, big_token = new_account(own_proxy, provider, dovecot, pki, submission)
    c = Raw(own_proxy.smtp_port)
    try:
        c.ask(b"EHLO client.example\r\n")
        assert c.ask(b"AUTH PLAIN " + plain_response(big, big_token) + b"\r\n").startswith(b"235 ")
    finally:
        c.close()
    account, email, token = new_account(own_proxy, provider, dovecot, pki, small_submission)
    response = plain_response(account, token)
    c = Raw(own_proxy.smtp_port)
    try:
        c.send(b"EHLO client.example\r\n")
        assert b"250-SIZE 35882577" in c.reply()
        reply = c.ask(b"AUTH PLAIN " + response + b"\r\n")
        assert reply.startswith(b"454 4.7.0 "), reply
        c.send(b"EHLO client.example\r\n")
        offer = c.reply()
        assert b"250-SIZE 100000" in offer, offer
        assert not [line for line in offer if b"35882577" in line], offer
        assert c.ask(b"AUTH PLAIN " + response + b"\r\n") == (
            b"235 2.7.0 Authentication successful"
        )
        tag = uuid.uuid4().hex
        send_message(c, sample(tag))
        assert c.ask(b"QUIT\r\n").startswith(b"221 ")
    finally:
        c.close()
    [got] = small_submission.sink.wait_for(1, TIMEOUT)
    assert strip_received(got.data) == sample(tag)
    assert not [m for m in smtp_sink.messages if tag.encode() in m.data]
    log = own_proxy.full_log()
    assert token not in log and response.decode() not in log
    # Two logins at the new server: the one refused with 454 was logged out.
    wait_until(
        lambda: small_submission.log().count(f"Login: user=<{email}>, method=XOAUTH2") >= 2,
        TIMEOUT,
        "two logins at the new server",
    )


def test_client_gone_during_upstream_login(
    own_proxy, provider, dovecot, pki, submission, smtp_sink
):
    """
    A client that leaves while its provider login runs (held in Dovecot's
    introspection): the proxy sees it at once, and once the provider says
    235 closes that connection; nothing pipelined behind AUTH is sent.
    """
    own_proxy.start()
    account, email, token = new_account(own_proxy, provider, dovecot, pki, submission)
    tag = uuid.uuid4().hex
    c = Raw(own_proxy.smtp_port)
    c.ask(b"EHLO client.example\r\n")
    before = provider.stats()["introspect_calls"]
    provider.hold_introspection(True)
    try:
        c.send(
            b"AUTH PLAIN " + plain_response(account, token) + b"\r\n"
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            + sample(tag)
            + b".\r\n"
        )
        wait_until(
            lambda: provider.stats()["introspect_calls"] > before,
            TIMEOUT,
            "the proxy's AUTH at the provider",
        )
        # The client leaves; the proxy closing its end shows it saw that,
        # before the provider's 235 is let through.
        c.sock.shutdown(socket.SHUT_WR)
        assert c.file.read() == b""
        c.close()
    finally:
        provider.hold_introspection(False)

    # The provider session ends: logged in, then disconnected.
    def ended() -> bool:
        lines = [line for line in submission.log().splitlines() if email in line]
        return any("Login: " in line for line in lines) and any(
            "Disconnect" in line for line in lines if "Login: " not in line
        )

    wait_until(ended, TIMEOUT, "the provider session to end")
    assert not [m for m in smtp_sink.messages if tag.encode() in m.data]
    log = own_proxy.full_log()
    assert "spliced" not in log
    for bad in ("Traceback", "Unhandled", "internal error"):
        assert bad not in log, bad
