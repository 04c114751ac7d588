"""
The SMTP submission measurements, each run against every target in turn
(interleaved run by run, as :mod:`bench.measure` does): login time, 10 KB
messages per second in one session, MB/s of one large 8-bit message with the
relay's CPU time. Every message is checked at the sink after its run: the
count, the envelope, and the bytes (the one Received header Dovecot adds
aside) by SHA-256 against what was sent, so no figure can come from refused
or mangled messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs

from bench.smtpclient import SMTPClient, SMTPError, SMTPLogin, connect_login, stuff
from bench.smtprig import RCPT, SMTPTarget
from bench.smtpsinkproc import SinkProcess, digest
from bench.stats import Sample, cpu_seconds

#: Lines of 8-bit text (UTF-8), some starting with a dot (dot-stuffed on the wire).
_LINES = [
    "Grüße aus Köln — Überweisung über 1.234,56 € bestätigt; naïve café façade ½ ¼ ©",
    ".Zeile mit führendem Punkt: ÄÖÜ äöü ß — αβγδε — кириллица — 日本語テキスト",
    "Plain ASCII line for contrast, the quick brown fox jumps over the lazy dog 0123456",
    "Ελληνικά και Русский и עברית ו- العربية — mixed scripts in one line of the message",
]


def message8(size: int, subject: str) -> bytes:
    """An RFC 5322 message of *size* bytes, 8-bit UTF-8 body, CRLF line ends."""
    head = (
        f"From: sender@example.com\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    block = bytearray()
    i = 0
    while len(block) < 65536:
        block += f"{i:06d} {_LINES[i % len(_LINES)]}\r\n".encode()
        i += 1
    body = bytes(block) * (size // len(block) + 1)
    cut = body.rfind(b"\r\n", 0, max(2, size - len(head))) + 2
    return head + body[:cut]


class NotDelivered(RuntimeError):
    """What arrived at the sink is not what the client sent."""


def verify(sink: SinkProcess, target: str, mail_from: str, sent: Sequence[bytes]) -> None:
    """Every message of *sent* arrived once, in order, byte for byte."""
    count, got = sink.take(len(sent))
    if count != len(sent):
        raise NotDelivered(f"{target}: {count} messages at the sink, {len(sent)} sent")
    for i, (m, (frm, rcpts, length, sha)) in enumerate(zip(sent, got, strict=True)):
        if frm != mail_from or rcpts != [RCPT]:
            raise NotDelivered(f"{target}: message {i}: envelope {frm!r} -> {rcpts!r}")
        if length != len(m) or sha != digest(m):
            raise NotDelivered(f"{target}: message {i}: {length} bytes, not the {len(m)} sent")


def _login(t: SMTPTarget, login: SMTPLogin) -> tuple[SMTPClient, float]:
    try:
        return connect_login(t.host, t.port, t.ctx, login)
    except (OSError, SMTPError) as e:
        raise SMTPError(f"{t.name}: {e!r}") from e


def login_latency(
    targets: Sequence[SMTPTarget], runs: int
) -> tuple[dict[str, Sample], dict[str, str]]:
    """Connect + TLS + greeting + EHLO + AUTH until ``235``, again and again
    for one account (its token cached), then QUIT (not timed); and the EHLO
    keywords each target offered on its last login."""
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    offered: dict[str, str] = {}
    for t in targets:  # warm-up: caches, the proxy's access token, code paths
        _login(t, t.login)[0].quit()
    for _ in range(runs):
        for t in targets:
            c, elapsed = _login(t, t.login)
            times[t.name].append(elapsed)
            offered[t.name] = " ".join(sorted(k.decode() for k in c.extensions))
            c.quit()
    return {n: Sample(tuple(v), "ms", scale=1e3) for n, v in times.items()}, offered


def _send(c: SMTPClient, t: SMTPTarget, message: bytes, stuffed: bytes) -> None:
    c.send(t.mail_from.encode(), RCPT.encode(), stuffed, len(message))


def session_rate(
    targets: Sequence[SMTPTarget], runs: int, count: int, size: int, sink: SinkProcess
) -> dict[str, Sample]:
    """Messages/s of *count* distinct *size*-byte messages sent one after
    the other in one logged-in session (the login not timed)."""
    messages = [message8(size, f"bench message {i}") for i in range(count)]
    stuffed = [stuff(m) for m in messages]
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    for t in targets:  # warm-up
        c, _ = _login(t, t.sender)
        for m, s in zip(messages[:5], stuffed[:5], strict=True):
            _send(c, t, m, s)
        c.quit()
        verify(sink, t.name, t.mail_from, messages[:5])
    for _ in range(runs):
        for t in targets:
            c, _ = _login(t, t.sender)
            started = time.perf_counter()
            for m, s in zip(messages, stuffed, strict=True):
                _send(c, t, m, s)
            rates[t.name].append(count / (time.perf_counter() - started))
            c.quit()
            verify(sink, t.name, t.mail_from, messages)
    return {n: Sample(tuple(v), "msg/s", higher_better=True, digits=0) for n, v in rates.items()}


def session_per_message(
    targets: Sequence[SMTPTarget], sessions: int, size: int, sink: SinkProcess
) -> dict[str, Sample]:
    """Messages/s when each *size*-byte message has a session of its own, as
    a script sending one alert does: connect, TLS, EHLO, AUTH, one message,
    QUIT until its ``221``; over *sessions* sessions per target."""
    messages = [message8(size, f"bench single {i}") for i in range(sessions)]
    stuffed = [stuff(m) for m in messages]
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    for i in range(sessions):
        for t in targets:
            started = time.perf_counter()
            c, _ = _login(t, t.sender)
            _send(c, t, messages[i], stuffed[i])
            c.command(b"QUIT", b"221")
            rates[t.name].append(1 / (time.perf_counter() - started))
            c.close()
            verify(sink, t.name, t.mail_from, messages[i : i + 1])
    return {n: Sample(tuple(v), "msg/s", higher_better=True, digits=1) for n, v in rates.items()}


@attrs.define
class Big:
    rate: dict[str, Sample]
    cpu_per_gb: dict[str, Sample]


def big_rate(targets: Sequence[SMTPTarget], runs: int, message: bytes, sink: SinkProcess) -> Big:
    """MB/s (10^6 bytes/s) of one large message, from ``MAIL FROM`` to the
    ``250`` after its end, each target in a session of its own; and the
    relay's CPU seconds per GB (10^9 bytes) relayed."""
    stuffed = stuff(message)
    size = len(message)
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu: dict[str, list[float]] = {t.name: [0.0, 0.0] for t in targets if t.pid}
    sessions: dict[str, SMTPClient] = {}
    try:
        for t in targets:
            c, _ = _login(t, t.sender)
            sessions[t.name] = c
            _send(c, t, message, stuffed)  # warm-up
            verify(sink, t.name, t.mail_from, [message])
        for _ in range(runs):
            for t in targets:
                c = sessions[t.name]
                before = cpu_seconds(t.pid) if t.pid else 0.0
                started = time.perf_counter()
                _send(c, t, message, stuffed)
                rates[t.name].append(size / (time.perf_counter() - started) / 1e6)
                if t.pid:  # summed: /proc counts CPU time in 10 ms ticks
                    cpu[t.name][0] += cpu_seconds(t.pid) - before
                    cpu[t.name][1] += size / 1e9
                verify(sink, t.name, t.mail_from, [message])
    finally:
        for c in sessions.values():
            c.quit()
    return Big(
        {n: Sample(tuple(v), "MB/s", higher_better=True, digits=0) for n, v in rates.items()},
        {n: Sample((v[0] / v[1],), "CPU s/GB", digits=2) for n, v in cpu.items()},
    )
