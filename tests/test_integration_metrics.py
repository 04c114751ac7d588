"""
/metrics end to end: the real ``twistd imapproxy`` of its own (so that its
counters start at zero), real Dovecot behind the fake provider, scraped
over HTTP and read with Prometheus' own parser. The counters move exactly
as the scenario says, no label holds a token or an address, and who may
read is checked on the API listener and, for a client elsewhere than
loopback, on a ``--metrics-port`` listener behind the PROXY protocol.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import register
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess

# Bytes of the message appended, then fetched, in the measured session.
SIZE = 3_000_000


def started(pki, workdir: str, name: str) -> ProxyProcess:
    p = ProxyProcess(os.path.join(workdir, name), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start(
        "--smtp-port",
        "none",
        "--warm-upstream",
        "0",
        "--metrics-port",
        "haproxy:tcp:0:interface=127.0.0.1",
    )
    try:
        p.wait_for_log("metrics listening on")
    except BaseException:
        p.stop()
        raise
    [port] = re.findall(r"metrics listening on \S+:(\d+) \(haproxy\)", p.log())
    p.metrics_port = int(port)  # type: ignore[attr-defined]
    return p


@pytest.fixture(scope="module")
def mproxy(pki, workdir, dovecot):
    p = started(pki, workdir, "proxy-metrics")
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def fresh(pki, workdir, dovecot):
    """A proxy of this test's own: its counters and accounts start at zero."""
    p = started(pki, workdir, "proxy-metrics-scenario")
    try:
        yield p
    finally:
        p.stop()


def get(proxy: ProxyProcess, token: str | None = None) -> tuple[int, str]:
    """GET /metrics on the API listener, from loopback."""
    c = http.client.HTTPConnection("127.0.0.1", proxy.api_port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c.request("GET", "/metrics", headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode("utf-8")
    finally:
        c.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(proxy)
    assert status == 200, text
    return samples(text)


def value(s: dict, name: str, **labels: str) -> float | None:
    return s.get((name, tuple(sorted(labels.items()))))


class Session:
    """An IMAP client on a socket that counts every byte after the login."""

    def __init__(self, port: int, account: str, token: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.sent = 0
        self.received = 0
        self.line()
        self.sock.sendall(f"a LOGIN {account} {token}\r\n".encode())
        assert self.line().startswith(b"a OK [CAPABILITY ")
        assert self.buf == b""
        self.received = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(self.buf[:200])
            self.buf += chunk
            self.received += len(chunk)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def until(self, prefix: bytes) -> bytes:
        while True:
            line = self.line()
            if line.startswith(prefix):
                return line

    def toEnd(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            self.received += len(chunk)
        self.sock.close()


def test_scenario_counts(fresh, provider, dovecot, pki):
    """
    Two logins, one refused by address, one refresh, one session that
    relays SIZE bytes each way: each counter moves by exactly that much,
    and no label value is a token, an address or an account id.
    """
    mproxy = fresh
    box = register(mproxy, provider, dovecot, pki)
    fenced = register(mproxy, provider, dovecot, pki, token_args=("--address", "10.0.0.0/8"))
    # The first scrape reads the accounts (then kept ACCOUNTS_CACHE seconds).
    before = scrape(mproxy)
    assert value(before, "imapproxy_logins_total", protocol="imap", result="ok") is None
    assert value(before, "imapproxy_accounts", state="ok") == 2

    s = Session(mproxy.port, box.account, box.token)  # login 1: refreshes
    s.send(b"b APPEND INBOX {%d}\r\n" % SIZE)
    assert s.line().startswith(b"+")
    body = b"Subject: metrics\r\n\r\n" + b"x" * 70 + b"\r\n"
    literal = (body * (SIZE // len(body) + 1))[:SIZE]
    s.send(literal + b"\r\n")
    assert s.until(b"b ").startswith(b"b OK")
    mid = scrape(mproxy)
    assert value(mid, "imapproxy_sessions", protocol="imap") == 1
    live = value(mid, "imapproxy_relayed_bytes_total", protocol="imap", direction="to_provider")
    assert live == s.sent  # a live session's bytes, read at scrape time
    s.send(b"c SELECT INBOX\r\n")
    assert s.until(b"c ").startswith(b"c OK")
    s.send(b"d FETCH 1 BODY[]\r\n")
    fetched = s.line()
    assert fetched.endswith(b"{%d}" % SIZE), fetched
    while len(s.buf) < SIZE:
        chunk = s.sock.recv(1 << 20)
        assert chunk
        s.buf += chunk
        s.received += len(chunk)
    assert s.buf[:SIZE] == literal
    s.buf = s.buf[SIZE:]
    assert s.until(b"d ").startswith(b"d OK")
    s.send(b"e LOGOUT\r\n")
    s.toEnd()

    s2 = Session(mproxy.port, box.account, box.token)  # login 2
    s2.send(b"z LOGOUT\r\n")
    s2.toEnd()
    c = socket.create_connection(("127.0.0.1", mproxy.port), timeout=30)  # refused
    f = c.makefile("rb")
    f.readline()
    c.sendall(f"a LOGIN {fenced.account} {fenced.token}\r\n".encode())
    assert b"not accepted from this IP" in f.readline()
    c.close()

    def ended() -> Any:
        now = scrape(mproxy)
        return now if value(now, "imapproxy_sessions", protocol="imap") == 0 else None

    after = wait_until(ended, 30, "the sessions to end")
    assert value(after, "imapproxy_logins_total", protocol="imap", result="ok") == 2
    assert value(after, "imapproxy_logins_total", protocol="imap", result="address") == 1
    assert value(after, "imapproxy_login_seconds_count", protocol="imap") == 3
    assert value(after, "imapproxy_login_token_check_seconds_count", protocol="imap") == 3
    assert value(after, "imapproxy_login_access_token_seconds_count", protocol="imap") == 2
    assert value(after, "imapproxy_login_upstream_seconds_count", protocol="imap") == 2
    refreshes = {k: v for k, v in after.items() if k[0] == "imapproxy_token_refreshes_total"}
    assert refreshes == {
        ("imapproxy_token_refreshes_total", (("provider", "generic"), ("result", "ok"))): 1
    }
    relayed = "imapproxy_relayed_bytes_total"
    # Every byte each client sent and got after its login, and nothing else.
    assert value(after, relayed, protocol="imap", direction="to_provider") == s.sent + s2.sent
    assert value(after, relayed, protocol="imap", direction="to_client") == (
        s.received + s2.received
    )
    assert s.received > SIZE and s.sent > SIZE and s2.received > 0
    assert value(after, "imapproxy_accounts", state="ok") == 2
    assert value(after, "imapproxy_store_up") == 1
    assert value(after, "imapproxy_process_open_fds") > 0
    secrets = {box.token, fenced.token, box.refresh_token, box.account, fenced.account}
    for _name, labels in after:
        for _k, v in labels:
            assert v not in secrets
            assert not re.fullmatch(r"[0-9a-f]{64}|\d+\.\d+\.\d+\.\d+|.*:.*:.*", v), v


def test_api_listener_access(mproxy, provider, dovecot, pki):
    """From loopback no token is needed; a token given must have scope metrics or *."""
    box = register(mproxy, provider, dovecot, pki)
    metrics = mproxy.cli(
        "tokens", "issue", "--scope", "metrics", "--description", "prometheus"
    ).stdout.strip()
    assert get(mproxy)[0] == 200
    assert get(mproxy, metrics)[0] == 200
    assert get(mproxy, box.token)[0] == 403  # scope imap-proxy
    assert get(mproxy, "0" * 64)[0] == 401


def via_balancer(port: int, source: str, token: str | None = None) -> bytes:
    """GET /metrics through the PROXY protocol, as a client at ``source``."""
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        c.sendall(
            f"PROXY TCP4 {source} 127.0.0.1 40000 9143\r\n"
            f"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n{auth}\r\n".encode()
        )
        data = b""
        while chunk := c.recv(65536):
            data += chunk
        return data
    finally:
        c.close()


def test_metrics_port_elsewhere_than_loopback(mproxy):
    """
    On a --metrics-port listener behind a balancer: a remote client needs a
    token of scope metrics; a loopback one does not; nothing else is served.
    """
    port = mproxy.metrics_port
    metrics = mproxy.cli(
        "tokens", "issue", "--scope", "metrics", "--description", "remote prometheus"
    ).stdout.strip()
    api = mproxy.cli("tokens", "issue", "--scope", "api", "--description", "api").stdout.strip()
    assert via_balancer(port, "198.51.100.7").startswith(b"HTTP/1.1 401 ")
    assert via_balancer(port, "198.51.100.7", api).startswith(b"HTTP/1.1 403 ")
    allowed = via_balancer(port, "198.51.100.7", metrics)
    assert allowed.startswith(b"HTTP/1.1 200 "), allowed[:200]
    assert b"imapproxy_logins_total" in allowed
    assert via_balancer(port, "127.0.0.1").startswith(b"HTTP/1.1 200 ")
