"""
The SMTP submission proxy through the real ``twistd imapproxy``: real clients
(smtplib, msmtp, swaks, curl) log in with an account id and an imapproxy
token, the proxy logs in to a real Dovecot submission server with XOAUTH2
and relays; what arrives at the sink must be the client's bytes exactly,
Dovecot's one ``Received:`` header aside. Refusals, a provider that is
down, a stale access token, STARTTLS injection, revocation with
``disconnect=true`` and one token for IMAP and SMTP at once are covered too.

The clients never pipeline across a transaction boundary (MAIL before the
reply to the end of the data): Dovecot 2.3.19 crashes on that (gotcha 2 of
/work/shared/reference/dovecot-submission-upstream.md).
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator

import attrs
import pytest
import requests

from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUED_SECRETS,
    OAUTH2_DEADLINE,
    Mailbox,
    add_account,
    register,
)
from tests.imaputil import plain
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.smtpsink import SMTPSink
from tests.upstream.submission import Submission, strip_received

TIMEOUT = 30
# Every byte but CR and LF (the upstream turns a bare LF into CRLF).
EIGHT_BIT = bytes(b for b in range(256) if b not in (10, 13))
# A refusal of the proxy's own: 535 with 5.7.8, the fixed reason after it.
REFUSED = re.compile(rb"^535 5\.7\.8 ")


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sproxy(pki, workdir, dovecot, submission) -> Iterator[ProxyProcess]:
    """The proxy with an SMTP listener in the clear (STARTTLS) and one with implicit TLS."""
    p = ProxyProcess(os.path.join(workdir, "proxy-smtp"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start(
        "--smtp-port",
        "tcp:0:interface=127.0.0.1",
        "--smtp-port",
        f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
        "--tls-certificate",
        pki.cert,
        "--tls-key",
        pki.key,
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
    )
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(autouse=True)
def _empty_sink(smtp_sink: SMTPSink) -> Iterator[None]:
    smtp_sink.clear()
    yield
    smtp_sink.clear()


@pytest.fixture(scope="module")
def root(sproxy) -> str:
    token = sproxy.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout
    ISSUED_SECRETS.append(token.strip())
    return token.strip()


@attrs.frozen
class Sender:
    """An account with SMTP settings and a token with scope ``smtp``."""

    account: str
    email: str
    token: str = attrs.field(repr=False)
    refresh_token: str = attrs.field(repr=False)


def smtp_token(proxy: ProxyProcess, account: str, *scopes: str, args: tuple[str, ...] = ()) -> str:
    scope_args = [a for s in (scopes or ("smtp",)) for a in ("--scope", s)]
    token = proxy.cli(
        "tokens", "issue", "--account", account, *scope_args, "--description", "smtp", *args
    ).stdout.strip()
    ISSUED_SECRETS.append(token)
    return token


def sender(
    proxy: ProxyProcess,
    provider,
    dovecot,
    submission: Submission,
    pki,
    *,
    smtp_tls: str = "starttls",
    scopes: tuple[str, ...] = ("smtp",),
) -> Sender:
    """A fresh account (own grant) whose SMTP upstream is the submission fixture."""
    tag = uuid.uuid4().hex[:8]
    account, email = f"snd-{tag}", f"snd-{tag}@example.com"
    refresh_token = "rt-" + uuid.uuid4().hex
    ISSUED_SECRETS.append(refresh_token)
    provider.add_grant(refresh_token, email, CLIENT_ID, CLIENT_SECRET)
    add_account(
        proxy,
        provider,
        account=account,
        email=email,
        refresh_token=refresh_token,
        port=dovecot.tls_port,
        ca_file=pki.ca_cert,
        smtp_host=submission.host,
        smtp_port=submission.port if smtp_tls == "starttls" else submission.tls_port,
        smtp_tls=smtp_tls,
        smtp_ca_file=submission.ca_cert,
    )
    return Sender(account, email, smtp_token(proxy, account, *scopes), refresh_token)


@pytest.fixture
def snd(sproxy, provider, dovecot, submission, pki) -> Sender:
    return sender(sproxy, provider, dovecot, submission, pki)


def context(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca_cert)


def starttls(proxy: ProxyProcess, pki) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=TIMEOUT)
    c.ehlo("client.example")
    c.starttls(context=context(pki))
    c.ehlo("client.example")
    return c


def implicit(proxy: ProxyProcess, pki) -> smtplib.SMTP_SSL:
    c = smtplib.SMTP_SSL(
        "127.0.0.1", proxy.smtp_ports["ssl"], timeout=TIMEOUT, context=context(pki)
    )
    c.ehlo("client.example")
    return c


def login_plain(c: smtplib.SMTP, account: str, token: str) -> tuple[int, bytes]:
    c.user, c.password = account, token
    return c.auth("PLAIN", c.auth_plain)


def sample_message(size: int = 0) -> bytes:
    """8-bit text, NUL, a bare CR, a 100 kB line, dot lines; *size* more 8-bit bytes."""
    head = (
        f"From: a@example.com\r\nTo: b@example.net\r\nSubject: test\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    body = (
        "Grüße, 日本語\r\n".encode()
        + b"NUL \x00 and bare CR \r here\r\n.one dot\r\n..two dots\r\n.\r\n"
        + b"L" * 100_000
        + b"\r\n"
    )
    line = EIGHT_BIT * 40 + b"\r\n"
    return head + body + line * (size // len(line)) + b"end\r\n"


def arrived(sink: SMTPSink, n: int = 1) -> list[bytes]:
    """The bytes of the first *n* messages at the sink, Dovecot's header removed."""
    return [strip_received(m.data) for m in sink.wait_for(n, TIMEOUT)[:n]]


class RawSMTP:
    """A reply-level SMTP client on a socket, for what libraries hide."""

    def __init__(self, port: int, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.create_connection(("127.0.0.1", port), TIMEOUT)
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

    def reply(self) -> bytes:
        """One whole reply; its last line (``250-`` continuation lines skipped)."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def multi(self) -> list[bytes]:
        """One whole reply, every line."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def starttls(self, pki) -> None:
        self.sock = context(pki).wrap_socket(self.sock, server_hostname="localhost")

    def closed(self, timeout: float = 10.0) -> bytes:
        """What the server sent until it closed; AssertionError if it does not."""
        self.sock.settimeout(timeout)
        rest = self.buf
        try:
            while chunk := self.sock.recv(65536):
                rest += chunk
        except TimeoutError:
            raise AssertionError(f"still open after {timeout}s: {rest!r}") from None
        except (ConnectionResetError, ssl.SSLError):
            pass
        return rest

    def close(self) -> None:
        self.sock.close()


def plain_b64(account: str, token: str) -> bytes:
    return base64.b64encode(f"\0{account}\0{token}".encode())


def refusal(proxy: ProxyProcess, account: str, token: str) -> bytes:
    """The reply to ``AUTH PLAIN`` with *account* and *token* (over loopback, no TLS)."""
    r = RawSMTP(proxy.smtp_port)
    try:
        assert r.reply().startswith(b"220 ")
        r.send(b"EHLO client.example\r\n")
        assert r.reply().startswith(b"250 ")
        r.send(b"AUTH PLAIN " + plain_b64(account, token) + b"\r\n")
        return r.reply()
    finally:
        r.close()


def logins(submission: Submission, email: str) -> int:
    """How many XOAUTH2 logins of *email* the provider logged."""
    return submission.log().count(f"Login: user=<{email}>, method=XOAUTH2")


def wait_logins(submission: Submission, email: str, n: int) -> None:
    """Until the provider logged *n* logins of *email* (its log process may lag a reply)."""
    wait_until(lambda: logins(submission, email) >= n, 10, f"{n} logins of {email}")
    assert logins(submission, email) == n


# -- sending ----------------------------------------------------------------------


def test_starttls_auth_plain_arrives_identical(sproxy, snd, smtp_sink, submission, pki):
    """smtplib over STARTTLS with AUTH PLAIN; upstream over STARTTLS with XOAUTH2."""
    message = sample_message()
    with starttls(sproxy, pki) as c:
        mechanisms = c.esmtp_features["auth"].split()
        assert "PLAIN" in mechanisms and "LOGIN" in mechanisms
        assert login_plain(c, snd.account, snd.token) == (235, b"2.7.0 Authentication successful")
        assert c.sendmail("from@example.com", ["to@example.net"], message) == {}
    [got] = smtp_sink.wait_for(1, TIMEOUT)
    assert (got.mail_from, got.rcpt_tos) == ("from@example.com", ("to@example.net",))
    assert strip_received(got.data) == message
    # ESMTPSA: the proxy used TLS upstream (ESMTPA would mean it did not).
    assert b"\tby localhost with ESMTPSA\r\n" in got.data[: got.data.index(b"From: a@")]
    wait_logins(submission, snd.email, 1)


def test_implicit_tls_auth_login_to_implicit_upstream(
    sproxy, provider, dovecot, submission, pki, smtp_sink
):
    """smtplib over implicit TLS with AUTH LOGIN; upstream over implicit TLS."""
    box = sender(sproxy, provider, dovecot, submission, pki, smtp_tls="implicit")
    message = sample_message()
    with implicit(sproxy, pki) as c:
        c.user, c.password = box.account, box.token
        code, _ = c.auth("LOGIN", c.auth_login, initial_response_ok=False)
        assert code == 235
        assert c.sendmail("from@example.com", ["to@example.net"], message) == {}
    assert arrived(smtp_sink) == [message]
    wait_logins(submission, box.email, 1)


def test_auth_plain_continuation_and_several_messages(sproxy, snd, smtp_sink, pki):
    """``AUTH PLAIN`` then ``334``; then three messages and a RSET in one session."""
    messages = [sample_message() for _ in range(3)]
    with starttls(sproxy, pki) as c:
        assert c.docmd("AUTH", "PLAIN")[0] == 334
        assert c.docmd(plain_b64(snd.account, snd.token).decode())[0] == 235
        for m in messages:
            assert c.sendmail("from@example.com", ["to@example.net"], m) == {}
            assert c.rset()[0] == 250
    assert arrived(smtp_sink, 3) == messages


def test_thirty_megabytes_arrive_identical(sproxy, snd, smtp_sink, pki):
    message = sample_message(30_000_000)
    assert len(message) > 30_000_000
    with starttls(sproxy, pki) as c:
        login_plain(c, snd.account, snd.token)
        # A first, smaller message: every code path and buffer is in use
        # before the peak memory is read.
        warmup = sample_message(2_000_000)
        assert c.sendmail("from@example.com", ["to@example.net"], warmup) == {}
        peakBefore = peak_rss(sproxy.pid())
        started = time.monotonic()
        assert c.sendmail("from@example.com", ["to@example.net"], message) == {}
        elapsed = time.monotonic() - started
    assert arrived(smtp_sink, 2) == [warmup, message]
    # ~1 s straight to Dovecot on an idle machine; a stall would show here.
    assert elapsed < 20, elapsed
    # Relayed with flow control, never held whole: the proxy's peak memory
    # grows by far less than the message (it would grow by 30 MB or more).
    grown = peak_rss(sproxy.pid()) - peakBefore
    assert grown < 8 * 2**20, grown


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_ehlo_offers_only_what_the_provider_has(sproxy, snd, submission, pki):
    """After one login, the EHLO offers the provider's extensions, SIZE its limit, nothing more."""
    with starttls(sproxy, pki) as c:
        login_plain(c, snd.account, snd.token)
    with smtplib.SMTP(submission.host, submission.port, timeout=TIMEOUT) as direct:
        direct.starttls(context=ssl.create_default_context(cafile=submission.ca_cert))
        _, provider_ehlo = direct.ehlo("client.example")
    provider_keywords = {line.split()[0].upper() for line in provider_ehlo.split(b"\n")[1:]}
    r = RawSMTP(sproxy.smtp_port)
    try:
        greeting = r.reply()
        assert re.match(
            rb"^220 \S+ imapproxy ESMTP ready for requests from 127\.0\.0\.1$", greeting
        )
        r.send(b"EHLO client.example\r\n")
        lines = r.multi()
    finally:
        r.close()
    offered = {line[4:].split()[0].upper() for line in lines[1:]}
    assert b"SIZE 35882577" in [line[4:] for line in lines]
    assert {b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES", b"CHUNKING"} <= offered
    assert offered - {b"AUTH", b"STARTTLS"} <= provider_keywords
    assert b"SMTPUTF8" not in offered  # Dovecot lacks it


def test_pipelined_transactions_behind_auth(sproxy, snd, smtp_sink):
    """AUTH, MAIL, RCPT and DATA in one write; each final reply awaited before the next MAIL."""
    first, second = sample_message(), sample_message()
    r = RawSMTP(sproxy.smtp_port)
    try:
        assert r.reply().startswith(b"220 ")
        r.send(b"EHLO client.example\r\n")
        assert r.reply().startswith(b"250 ")
        r.send(
            b"AUTH PLAIN " + plain_b64(snd.account, snd.token) + b"\r\n"
            b"MAIL FROM:<from@example.com>\r\nRCPT TO:<to@example.net>\r\nDATA\r\n"
        )
        assert r.reply().startswith(b"235 ")
        assert r.reply() == b"250 2.1.0 Ok"
        assert r.reply() == b"250 2.1.5 Ok"
        assert r.reply().startswith(b"354 ")
        r.send(first.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
        r.send(b"MAIL FROM:<from@example.com>\r\nRCPT TO:<to@example.net>\r\nDATA\r\n")
        assert r.reply() == b"250 2.1.0 Ok"
        assert r.reply() == b"250 2.1.5 Ok"
        assert r.reply().startswith(b"354 ")
        r.send(second.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n")
        assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
        assert r.reply().startswith(b"221 ")
    finally:
        r.close()
    assert arrived(smtp_sink, 2) == [first, second]


def test_bdat_chunks(sproxy, snd, smtp_sink):
    """CHUNKING is offered (the provider has it) and BDAT chunks arrive byte-exact."""
    body = sample_message()[:-2]  # BDAT needs no final CRLF
    cut = len(body) // 3
    r = RawSMTP(sproxy.smtp_port)
    try:
        r.reply()
        r.send(b"EHLO client.example\r\nAUTH PLAIN " + plain_b64(snd.account, snd.token) + b"\r\n")
        r.multi()
        assert r.reply().startswith(b"235 ")
        r.send(b"EHLO client.example\r\n")
        assert b"CHUNKING" in [line[4:] for line in r.multi()]
        r.send(
            b"MAIL FROM:<from@example.com>\r\nRCPT TO:<to@example.net>\r\n"
            + b"BDAT %d\r\n" % cut
            + body[:cut]
            + b"BDAT %d LAST\r\n" % (len(body) - cut)
            + body[cut:]
        )
        assert r.reply() == b"250 2.1.0 Ok"
        assert r.reply() == b"250 2.1.5 Ok"
        assert r.reply() == b"250 2.0.0 Added %d octets" % cut
        assert r.reply().startswith(b"250 2.0.0 Ok: queued as")
    finally:
        r.close()
    assert arrived(smtp_sink) == [body]


def test_provider_refusals_pass_through(sproxy, snd, smtp_sink, pki):
    """The provider's own answers reach the client verbatim; nothing is queued on the proxy."""
    with starttls(sproxy, pki) as c:
        login_plain(c, snd.account, snd.token)
        assert c.docmd("MAIL", "FROM:<quota@example.com>") == (452, b"4.2.2 Mailbox full")
        assert c.rset()[0] == 250
        assert c.docmd("MAIL", "FROM:<a@example.com>") == (250, b"2.1.0 Ok")
        assert c.docmd("RCPT", "TO:<reject-1@example.net>") == (
            550,
            b"5.1.1 <reject-1@example.net> Recipient address rejected",
        )
        assert c.rset()[0] == 250
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("reject-data@example.com", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        assert (e.value.smtp_code, e.value.smtp_error) == (554, b"5.7.1 Message content rejected")
        assert c.noop()[0] == 250
    assert smtp_sink.messages == []


# -- command-line senders people use ------------------------------------------------


def cli_message() -> bytes:
    """Headers msmtp would otherwise add (Date, Message-ID); 8-bit; a dot line."""
    return (
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: cli\r\n"
        b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
        + f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\n".encode()
        + "Grüße\r\n.dot line\r\n".encode()
        + b"L" * 3000
        + b"\r\nend\r\n"
    )


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, capture_output=True, timeout=60, **kw)
    assert result.returncode == 0, (cmd[0], result.stdout[-2000:], result.stderr[-2000:])
    return result


def test_msmtp(sproxy, snd, smtp_sink, pki, tmp_path):
    message = cli_message()
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "account default\n"
        "host 127.0.0.1\n"
        f"port {sproxy.smtp_port}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {pki.ca_cert}\n"
        "tls_host_override localhost\n"
        "auth plain\n"
        f"user {snd.account}\n"
        f"password {snd.token}\n"
        "from a@example.com\n"
    )
    conf.chmod(0o600)
    run(["msmtp", "-C", str(conf), "b@example.net"], input=message)
    assert arrived(smtp_sink) == [message]


def test_swaks_implicit_tls_auth_login(sproxy, snd, smtp_sink, pki, tmp_path):
    message = cli_message()
    data = tmp_path / "message"
    data.write_bytes(message[:-2])  # swaks ends the data with CRLF itself
    run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{sproxy.smtp_ports['ssl']}",
            "--tlsc",
            "--tls-verify",
            "--tls-ca-path",
            pki.ca_cert,
            "--auth",
            "LOGIN",
            "--auth-user",
            snd.account,
            "--auth-password",
            snd.token,
            "--from",
            "a@example.com",
            "--to",
            "b@example.net",
            "--data",
            f"@{data}",
            "--silent",
            "2",
        ]
    )
    assert arrived(smtp_sink) == [message]


def test_curl(sproxy, snd, smtp_sink, pki, tmp_path):
    message = cli_message()
    data = tmp_path / "message"
    data.write_bytes(message)
    run(
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            f"smtp://127.0.0.1:{sproxy.smtp_port}",
            "--ssl-reqd",
            "--cacert",
            pki.ca_cert,
            "--user",
            f"{snd.account}:{snd.token}",
            "--mail-from",
            "a@example.com",
            "--mail-rcpt",
            "b@example.net",
            "--upload-file",
            str(data),
        ]
    )
    assert arrived(smtp_sink) == [message]


# -- refusals -----------------------------------------------------------------------


def test_bad_token_refused(sproxy, snd, submission):
    assert REFUSED.match(refusal(sproxy, snd.account, "f" * 43))
    assert logins(submission, snd.email) == 0


def test_token_without_smtp_scope_refused(sproxy, provider, dovecot, submission, pki):
    box = sender(sproxy, provider, dovecot, submission, pki, scopes=("imap-proxy",))
    assert REFUSED.match(refusal(sproxy, box.account, box.token))
    assert logins(submission, box.email) == 0


def test_token_of_another_account_refused(sproxy, provider, dovecot, submission, pki, snd):
    other = sender(sproxy, provider, dovecot, submission, pki)
    assert REFUSED.match(refusal(sproxy, other.account, snd.token))
    assert logins(submission, other.email) == logins(submission, snd.email) == 0


def test_token_restricted_to_other_addresses_refused(sproxy, snd, submission):
    far = smtp_token(sproxy, snd.account, "smtp", args=("--address", "10.0.0.0/8"))
    near = smtp_token(sproxy, snd.account, "smtp", args=("--address", "127.0.0.0/8"))
    assert REFUSED.match(refusal(sproxy, snd.account, far))
    assert logins(submission, snd.email) == 0
    assert refusal(sproxy, snd.account, near).startswith(b"235 ")


def test_account_without_smtp_settings_refused(sproxy, provider, dovecot, pki, submission):
    box: Mailbox = register(sproxy, provider, dovecot, pki)
    token = smtp_token(sproxy, box.account, "smtp")
    assert (
        refusal(sproxy, box.account, token) == b"535 5.7.8 Sending is not set up for this account"
    )
    assert logins(submission, box.email) == 0


def test_provider_down_answers_454_in_bounded_time(sproxy, snd, submission):
    submission.stop()
    try:
        started = time.monotonic()
        reply = refusal(sproxy, snd.account, snd.token)
        elapsed = time.monotonic() - started
    finally:
        submission.start()
    assert reply.startswith(b"454 4.7.0 "), reply
    assert elapsed < 15, elapsed
    assert refusal(sproxy, snd.account, snd.token).startswith(b"235 ")


def test_stale_access_token_is_refreshed_and_retried(sproxy, provider, snd, submission):
    """The provider refuses the cached access token: one refresh, one retry, then 235."""
    assert refusal(sproxy, snd.account, snd.token).startswith(b"235 ")
    assert provider.stats()["token_calls_by_username"][snd.email] == 1
    provider.expire_access(snd.email)
    assert refusal(sproxy, snd.account, snd.token).startswith(b"235 ")
    assert provider.stats()["token_calls_by_username"][snd.email] == 2
    wait_logins(submission, snd.email, 2)


def test_mail_before_auth_refused(sproxy, snd):
    """Before AUTH, MAIL is the proxy's to refuse; AUTH still works after."""
    r = RawSMTP(sproxy.smtp_port)
    try:
        r.reply()
        r.send(b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n")
        r.multi()
        assert r.reply().startswith(b"530 5.7.0 Authentication required")
        r.send(b"AUTH PLAIN " + plain_b64(snd.account, snd.token) + b"\r\n")
        assert r.reply().startswith(b"235 ")
    finally:
        r.close()


def test_auth_before_starttls_refused_when_plaintext_is_denied(pki, workdir):
    """With --plaintext-login deny, AUTH is not offered before STARTTLS, and refused."""
    p = ProxyProcess(
        os.path.join(workdir, "proxy-smtp-deny"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    p.start("--plaintext-login", "deny", "--tls-certificate", pki.cert, "--tls-key", pki.key)
    try:
        r = RawSMTP(p.smtp_port)
        try:
            r.reply()
            r.send(b"EHLO client.example\r\n")
            keywords = [line[4:] for line in r.multi()[1:]]
            assert b"STARTTLS" in keywords
            assert not [k for k in keywords if k.startswith(b"AUTH")]
            r.send(b"AUTH PLAIN " + plain_b64("acct", "t" * 43) + b"\r\n")
            assert r.reply().startswith(b"530 5.7.0 Must issue a STARTTLS command first")
            r.send(b"STARTTLS\r\n")
            assert r.reply().startswith(b"220 ")
            r.starttls(pki)
            r.send(b"EHLO client.example\r\n")
            keywords = [line[4:] for line in r.multi()[1:]]
            assert b"STARTTLS" not in keywords
            auth = [k for k in keywords if k.startswith(b"AUTH ")]
            assert auth and {b"PLAIN", b"LOGIN"} <= set(auth[0].split()[1:])
        finally:
            r.close()
    finally:
        p.stop()


# -- security -----------------------------------------------------------------------


def test_starttls_injection_is_not_answered_inside_tls(sproxy, snd, pki):
    """``STARTTLS\\r\\nRSET\\r\\n`` in one write: the RSET is discarded, not answered under TLS."""
    r = RawSMTP(sproxy.smtp_port)
    try:
        r.reply()
        r.send(b"EHLO client.example\r\n")
        r.multi()
        r.send(b"STARTTLS\r\nRSET\r\n")
        assert r.reply().startswith(b"220 ")
        assert r.buf == b""
        r.starttls(pki)
        r.send(b"NOOP\r\nQUIT\r\n")
        replies = r.closed().split(b"\r\n")
    finally:
        r.close()
    assert [line[:4] for line in replies if line] == [b"250 ", b"221 "], replies


def test_revocation_with_disconnect_closes_a_live_session(sproxy, snd, root, pki):
    r = RawSMTP(sproxy.smtp_port)
    try:
        r.reply()
        r.send(b"EHLO client.example\r\nAUTH PLAIN " + plain_b64(snd.account, snd.token) + b"\r\n")
        r.multi()
        assert r.reply().startswith(b"235 ")
        r.send(b"NOOP\r\n")
        assert r.reply().startswith(b"250 ")
        answer = requests.delete(
            f"{sproxy.api_url}/v1/tokens/{snd.token}?disconnect=true",
            headers={"Authorization": f"Bearer {root}"},
            timeout=TIMEOUT,
        )
        assert answer.json() == {"deleted": True, "disconnected": 1}
        rest = r.closed()
        assert rest == b"" or rest.startswith(b"421 "), rest
    finally:
        r.close()


def test_one_token_for_imap_and_smtp_at_once(sproxy, provider, dovecot, submission, pki, smtp_sink):
    box = sender(sproxy, provider, dovecot, submission, pki, scopes=("imap-proxy", "smtp"))
    imap = plain(sproxy.port)
    try:
        assert imap.login(box.account, box.token)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
        message = sample_message()
        with starttls(sproxy, pki) as c:
            login_plain(c, box.account, box.token)
            assert imap.noop()[0] == "OK"
            assert c.sendmail("from@example.com", ["to@example.net"], message) == {}
        assert imap.noop()[0] == "OK"
    finally:
        imap.logout()
    assert arrived(smtp_sink) == [message]
    # Both protocols from one cached access token: one refresh.
    assert provider.stats()["token_calls_by_username"][box.email] == 1


def test_no_secret_in_the_log(sproxy, snd, pki):
    """After good and refused SMTP logins, no token and no XOAUTH2 string is in the log."""
    with starttls(sproxy, pki) as c:
        login_plain(c, snd.account, snd.token)
    assert REFUSED.match(refusal(sproxy, snd.account, "g" * 43))
    text = sproxy.full_log()
    assert snd.account in text  # the log is the real one
    leaked = [s[:6] + "…" for s in [*ISSUED_SECRETS, "g" * 43] if s and s in text]
    assert leaked == []
    for shape in ("auth=Bearer", "Bearer ", "dXNlcj0", plain_b64(snd.account, snd.token).decode()):
        assert shape not in text, shape
