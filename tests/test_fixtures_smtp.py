"""
End-to-end checks of the SMTP upstream of the tests, with real clients and no
proxy: the sink (:mod:`tests.upstream.smtpsink`) alone, then Dovecot
submission (:mod:`tests.upstream.submission`) relaying to it.
"""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.upstream import PKI, Provider
from tests.upstream.osutil import wait_until
from tests.upstream.smtpsink import Received, SMTPSink, SMTPSinkError
from tests.upstream.submission import Submission, strip_received

CLIENT_ID = "app-client"
CLIENT_SECRET = "app-secret"
# Every byte but CR and LF (Dovecot turns a bare LF into CRLF).
EIGHT_BIT = bytes(b for b in range(256) if b not in (10, 13))


@pytest.fixture(autouse=True)
def _empty_sink(smtp_sink: SMTPSink) -> Iterator[None]:
    smtp_sink.clear()
    yield
    smtp_sink.clear()


def user_and_token(provider: Provider, pki: PKI) -> tuple[str, str]:
    """A fresh user and a live access token of theirs from the fake provider."""
    tag = uuid.uuid4().hex[:12]
    user, refresh_token = f"s{tag}@example.com", f"rt-{tag}"
    provider.add_grant(refresh_token, user, CLIENT_ID, CLIENT_SECRET)
    with requests.Session() as http:
        http.trust_env = False
        http.verify = pki.ca_cert
        r = http.post(
            provider.token_url,
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
            timeout=10,
        )
    r.raise_for_status()
    return user, r.json()["access_token"]


def xoauth2(user: str, token: str, answers: list[bytes] | None = None) -> Callable[..., str]:
    """An smtplib auth object: the XOAUTH2 string, then an empty answer to a challenge."""

    def auth(challenge: bytes | None = None) -> str:
        if challenge is None:
            return f"user={user}\x01auth=Bearer {token}\x01\x01"
        if answers is not None:
            answers.append(challenge)
        return ""

    return auth


def starttls_client(submission: Submission) -> smtplib.SMTP:
    c = smtplib.SMTP(submission.host, submission.port, timeout=30)
    c.starttls(context=ssl.create_default_context(cafile=submission.ca_cert))
    c.ehlo("client.example")
    return c


def sample_message(tag: str) -> bytes:
    """8-bit text, NUL, a bare CR, a 100 kB line, lines that start with dots."""
    return (
        f"Message-ID: <{tag}@example.com>\r\nSubject: sample\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + "Grüße, 日本語\r\n".encode()
        + b"NUL \x00 and bare CR \r here\r\n"
        + b".a line starting with a dot\r\n..two dots\r\n.\r\n"
        + b"L" * 100_000
        + b"\r\n"
        + EIGHT_BIT
        + b"\r\nend\r\n"
    )


# -- the sink alone -----------------------------------------------------------


def test_sink_data_is_unstuffed_and_kept(smtp_sink: SMTPSink) -> None:
    """Over DATA (smtplib's way), the sink undoes dot-stuffing and keeps the envelope."""
    message = b"Subject: x\r\n\r\n.dot\r\n..two\r\n" + b"y" * 5000 + b"\r\n"
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as c:
        code, ehlo = c.ehlo("client.example")
        assert code == 250
        for keyword in (b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"DSN", b"CHUNKING"):
            assert keyword in ehlo.split(b"\n")
        c.sendmail("a@example.com", ["b@example.net", "c@example.net"], message)
    [got] = smtp_sink.wait_for(1, 10)
    assert got == Received("a@example.com", ("b@example.net", "c@example.net"), message)


def test_sink_bdat_chunks_pipelined(smtp_sink: SMTPSink) -> None:
    """BDAT chunks, pipelined with the envelope, are kept byte for byte (no final CRLF)."""
    body = b"first\r\n.x\r\n\x00" + EIGHT_BIT
    with socket.create_connection((smtp_sink.host, smtp_sink.port), 10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 7\r\n" + body[:7])
        s.sendall(b"BDAT %d LAST\r\n" % (len(body) - 7) + body[7:] + b"QUIT\r\n")
        replies = f.read()
    assert b"250 2.0.0 Chunk accepted\r\n" in replies
    assert b"250 2.0.0 Ok: queued as" in replies
    assert replies.endswith(b"221 2.0.0 Bye\r\n")
    [got] = smtp_sink.wait_for(1, 10)
    assert got == Received("a@x", ("b@y",), body)


def test_sink_wait_for_times_out_and_clear_forgets(smtp_sink: SMTPSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as c:
        c.sendmail("a@x", ["b@y"], b"one\r\n")
    assert len(smtp_sink.wait_for(1, 10)) == 1
    with pytest.raises(SMTPSinkError, match="1 of 2 messages"):
        smtp_sink.wait_for(2, 0.2)
    smtp_sink.clear()
    assert smtp_sink.messages == []


# -- Dovecot submission ---------------------------------------------------------


def test_plaintext_offers_no_auth_and_refuses_it(submission: Submission) -> None:
    """Like Gmail: before STARTTLS no AUTH is offered, and AUTH and MAIL are refused."""
    with smtplib.SMTP(submission.host, submission.port, timeout=10) as c:
        code, ehlo = c.ehlo("client.example")
        assert code == 250
        assert b"STARTTLS" in ehlo.split(b"\n")
        assert not any(line.startswith(b"AUTH") for line in ehlo.split(b"\n"))
        assert c.docmd("AUTH", "XOAUTH2 dXNlcj0=") == (530, b"5.7.0 TLS required.")
        assert c.docmd("MAIL", "FROM:<a@example.com>") == (530, b"5.7.0 TLS required.")


def test_starttls_xoauth2_message_arrives_identical(
    submission: Submission, smtp_sink: SMTPSink, provider: Provider, pki: PKI
) -> None:
    user, token = user_and_token(provider, pki)
    message = sample_message(uuid.uuid4().hex)
    with starttls_client(submission) as c:
        assert b"XOAUTH2" in c.esmtp_features["auth"].encode()
        assert c.auth("XOAUTH2", xoauth2(user, token)) == (235, b"2.7.0 Logged in.")
        assert c.sendmail("from@example.com", ["to@example.net"], message) == {}
    [got] = smtp_sink.wait_for(1, 10)
    assert (got.mail_from, got.rcpt_tos) == ("from@example.com", ("to@example.net",))
    assert strip_received(got.data) == message
    assert b"\tby localhost with ESMTPSA\r\n" in got.data.split(b"Message-ID")[0]
    # Dovecot's log process may write the line a moment after the reply.
    wait_until(lambda: f"Login: user=<{user}>, method=XOAUTH2" in submission.log(), 10)


def test_implicit_tls_xoauth2_several_messages(
    submission: Submission, smtp_sink: SMTPSink, provider: Provider, pki: PKI
) -> None:
    user, token = user_and_token(provider, pki)
    messages = [sample_message(uuid.uuid4().hex) for _ in range(3)]
    ctx = ssl.create_default_context(cafile=submission.ca_cert)
    with smtplib.SMTP_SSL(submission.host, submission.tls_port, timeout=30, context=ctx) as c:
        c.ehlo("client.example")
        assert c.auth("XOAUTH2", xoauth2(user, token))[0] == 235
        for m in messages:
            assert c.sendmail("from@example.com", ["to@example.net"], m) == {}
    got = smtp_sink.wait_for(3, 10)
    assert [strip_received(r.data) for r in got] == messages


def test_refused_token_gets_334_then_535(
    submission: Submission, provider: Provider, pki: PKI
) -> None:
    """The provider's error challenge, answered with an empty line, then 535; AUTH may retry."""
    user, token = user_and_token(provider, pki)
    challenges: list[bytes] = []
    with starttls_client(submission) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.auth("XOAUTH2", xoauth2(user, "not-a-token", challenges))
        assert (e.value.smtp_code, e.value.smtp_error) == (535, b"5.7.8 Authentication failed.")
        assert [json.loads(ch) for ch in challenges] == [
            {"status": "401", "schemes": "bearer", "scope": "mail"}
        ]
        assert c.auth("XOAUTH2", xoauth2(user, token))[0] == 235


def test_sink_refusals_pass_through(
    submission: Submission, smtp_sink: SMTPSink, provider: Provider, pki: PKI
) -> None:
    user, token = user_and_token(provider, pki)
    with starttls_client(submission) as c:
        c.auth("XOAUTH2", xoauth2(user, token))
        assert c.docmd("MAIL", "FROM:<quota@example.com>") == (452, b"4.2.2 Mailbox full")
        assert c.docmd("RSET") == (250, b"2.0.0 Ok")  # gotcha 3: RSET after a failed MAIL
        assert c.docmd("MAIL", "FROM:<a@example.com>") == (250, b"2.1.0 Ok")
        assert c.docmd("RCPT", "TO:<reject-1@example.net>") == (
            550,
            b"5.1.1 <reject-1@example.net> Recipient address rejected",
        )
        assert c.docmd("RSET") == (250, b"2.0.0 Ok")
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("reject-data@example.com", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        assert (e.value.smtp_code, e.value.smtp_error) == (554, b"5.7.1 Message content rejected")
        assert c.noop()[0] == 250
    assert smtp_sink.messages == []


def test_thirty_megabytes_arrive_identical_and_fast(
    submission: Submission, smtp_sink: SMTPSink, provider: Provider, pki: PKI
) -> None:
    user, token = user_and_token(provider, pki)
    message = b"Subject: big\r\n\r\n" + (EIGHT_BIT * 40 + b"\r\n") * 3000
    assert len(message) > 30_000_000
    with starttls_client(submission) as c:
        c.auth("XOAUTH2", xoauth2(user, token))
        started = time.monotonic()
        assert c.sendmail("from@example.com", ["to@example.net"], message) == {}
        elapsed = time.monotonic() - started
    [got] = smtp_sink.wait_for(1, 10)
    assert strip_received(got.data) == message
    # ~1 s on an idle machine; a generous bound that still catches a stall.
    assert elapsed < 15, elapsed


def test_stop_and_start_keep_the_ports(
    submission: Submission, provider: Provider, pki: PKI
) -> None:
    """What "provider down" tests do: stopped, nothing listens; started, the same ports greet."""
    ports = (submission.port, submission.tls_port)
    submission.stop()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((submission.host, submission.port), 5).close()
    finally:
        submission.start()
    assert (submission.port, submission.tls_port) == ports
    user, token = user_and_token(provider, pki)
    with starttls_client(submission) as c:
        assert c.auth("XOAUTH2", xoauth2(user, token))[0] == 235


def test_strip_received_removes_one_header() -> None:
    data = b"Received: from a\r\n\tby b\r\n\tfor <c>; date\r\nReceived: keep\r\n\r\nbody\r\n"
    assert strip_received(data) == b"Received: keep\r\n\r\nbody\r\n"
    with pytest.raises(ValueError):
        strip_received(base64.b64encode(b"no header"))
