"""
The graceful stop of the real ``twistd imapproxy`` (real Dovecot behind):
SIGTERM with sessions in IDLE and one in the middle of a large FETCH read
slowly by its client. The IDLE clients read ``* BYE`` at once; new
connections are refused and ``/health`` says ``draining`` while the FETCH
finishes (the whole literal and the tagged OK, then the BYE); the process
then exits by itself (as twistd does, by the SIGTERM it got). 200 live
sessions all read the BYE; an SMTP session logged in and idle reads ``421``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
import requests

from tests.conftest import OAUTH2_DEADLINE, register
from tests.imaputil import TIMEOUT, Raw, message
from tests.test_integration_smtp import login_plain, sender, starttls
from tests.upstream.proxyproc import ProxyProcess

BYE = b"* BYE imapproxy is shutting down"
# Long enough for a busy machine to relay the FETCH; the test waits on events.
DRAIN = 30.0
# What the process may take past the drain timeout to exit.
MARGIN = 15.0
# Larger than every buffer between Dovecot and a slow client (socket
# buffers on both legs, the proxy's own): the transfer is surely in progress.
BIG = 24 * 1024 * 1024


def start(pki, workdir, name: str, *extra: str) -> ProxyProcess:
    p = ProxyProcess(os.path.join(workdir, name), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start("--oauth2-deadline", str(OAUTH2_DEADLINE), "--drain-timeout", str(DRAIN), *extra)
    return p


def loggedIn(port: int, mailbox, rcvbuf: int | None = None) -> Raw:
    """A raw client, logged in with tag ``a`` and INBOX selected (tag ``b``)."""
    r = Raw.__new__(Raw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connecting: the window the client offers stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    r.sock, r.buf = sock, b""
    r.line()
    r.send(f"a LOGIN {mailbox.account} {mailbox.token}\r\nb SELECT INBOX\r\n".encode())
    assert r.until(b"a")[-1].startswith(b"a OK")
    assert r.until(b"b")[-1].startswith(b"b OK")
    return r


def exactly(r: Raw, n: int) -> bytes:
    """The next ``n`` bytes of the stream."""
    while len(r.buf) < n:
        chunk = r.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(len(r.buf))
        r.buf += chunk
    data, r.buf = r.buf[:n], r.buf[n:]
    return data


def stopped(p: ProxyProcess, since: float) -> None:
    """
    The process exits by itself within the drain timeout and a margin: as
    twistd does after a SIGTERM, by that signal (systemd counts it a clean
    stop), or with status 0; never killed.
    """
    assert p.wait(DRAIN + MARGIN) in (0, -signal.SIGTERM)
    assert time.monotonic() - since < DRAIN + MARGIN


def test_sigterm_drains_idle_and_a_fetch_in_flight(pki, workdir, dovecot, provider):
    """IDLE gets BYE at once; a FETCH in flight completes, then BYE; nothing new is accepted."""
    p = start(pki, workdir, "proxy-drain")
    try:
        mailbox = register(p, provider, dovecot, pki)
        big = message(BIG, "drain")
        loader = loggedIn(p.port, mailbox)
        loader.send(b"c APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
        assert loader.until(b"c")[-1].startswith(b"c OK")
        loader.send(b"z LOGOUT\r\n")
        assert loader.closed()

        idlers = [loggedIn(p.port, mailbox) for _ in range(3)]
        for r in idlers:
            r.send(b"i IDLE\r\n")
            assert r.line().startswith(b"+ ")
        reader = loggedIn(p.port, mailbox, rcvbuf=32 * 1024)
        reader.send(b"f FETCH 1 (BODY.PEEK[])\r\n")
        head = reader.line()
        m = re.fullmatch(rb"\* 1 FETCH \(BODY\[\] \{(\d+)\}", head)
        assert m, head
        size = int(m.group(1))
        assert size == len(big)
        first = exactly(reader, 64 * 1024)  # and no more for now: the rest is in flight

        since = time.monotonic()
        os.kill(p.pid(), signal.SIGTERM)
        for r in idlers:
            assert r.line() == BYE
            assert r.closed()
        # The front door is closed; the API stays to say so.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT).close()
        health = requests.get(p.api_url + "/health", timeout=TIMEOUT)
        assert (health.status_code, health.json()["status"]) == (503, "draining")

        # The slow reader goes on: the whole message, the tagged OK, then the BYE.
        assert first + exactly(reader, size - len(first)) == big
        assert reader.line() == b")"
        assert reader.line().startswith(b"f OK")
        assert reader.line() == BYE
        assert reader.closed()
        stopped(p, since)
        log = p.log()
        assert "stopping: new connections refused; 4 sessions to end" in log
        assert "4 sessions ended at a clean point, 0 cut" in log
        assert "Traceback" not in log
    finally:
        p.stop()


def test_sigterm_says_bye_to_200_sessions(pki, workdir, dovecot, provider):
    """200 live sessions: every client reads the BYE, then the close."""
    p = start(pki, workdir, "proxy-drain-200", "--max-preauth-per-address", "250")
    clients: list[Raw] = []
    try:
        mailbox = register(p, provider, dovecot, pki)
        for _ in range(200):
            r = Raw(p.port)
            r.line()
            r.send(f"a LOGIN {mailbox.account} {mailbox.token}\r\n".encode())
            clients.append(r)
        for r in clients:
            assert r.until(b"a")[-1].startswith(b"a OK")
        since = time.monotonic()
        os.kill(p.pid(), signal.SIGTERM)
        got = [r.line() for r in clients]
        assert got == [BYE] * 200
        assert all(r.closed() for r in clients)
        stopped(p, since)
        assert "200 sessions ended at a clean point, 0 cut" in p.log()
    finally:
        for r in clients:
            r.close()
        p.stop()


def test_sigterm_gives_an_idle_smtp_session_421(pki, workdir, dovecot, provider, submission):
    """A logged-in, idle SMTP session reads 421 4.3.2 when the proxy stops."""
    p = start(pki, workdir, "proxy-drain-smtp", "--tls-certificate", pki.cert, "--tls-key", pki.key)
    try:
        snd = sender(p, provider, dovecot, submission, pki)
        c = starttls(p, pki)
        assert login_plain(c, snd.account, snd.token)[0] == 235
        assert c.noop()[0] == 250
        since = time.monotonic()
        os.kill(p.pid(), signal.SIGTERM)
        code, text = c.getreply()
        assert (code, text.split(b" ", 1)[0]) == (421, b"4.3.2")
        assert text.endswith(b"Service shutting down")
        stopped(p, since)
    finally:
        p.stop()
