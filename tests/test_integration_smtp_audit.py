"""
An SMTP session's end in the JSON log of the real ``twistd imapproxy``, in
front of a real Dovecot submission server: exactly one ``session-end``
event per session, with the bytes relayed each way after the login (as the
client counted them) and who closed it: the client (``QUIT``), the provider
(Dovecot ending a session that sent too many bad commands) or an operator
(``DELETE /v1/session/{id}``).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import ISSUED_SECRETS, OAUTH2_DEADLINE
from tests.test_integration_smtp import plain_b64, sender
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def jproxy(pki, workdir, dovecot, submission) -> Iterator[ProxyProcess]:
    p = ProxyProcess(
        os.path.join(workdir, "proxy-smtp-json"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    p.start("--log-format", "json", "--oauth2-deadline", str(OAUTH2_DEADLINE))
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def root(jproxy) -> str:
    token = jproxy.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout
    ISSUED_SECRETS.append(token.strip())
    return token.strip()


class Counted:
    """A raw SMTP client counting every byte each way once the login is done."""

    def __init__(self, port: int, account: str, token: str):
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.buf = b""
        self.sent = self.received = 0
        assert self.reply().startswith(b"220 ")
        self.sock.sendall(b"EHLO client.example\r\n")
        assert self.reply().startswith(b"250 ")
        self.sock.sendall(b"AUTH PLAIN " + plain_b64(account, token) + b"\r\n")
        assert self.reply().startswith(b"235 ")
        assert self.buf == b""
        self.sent = self.received = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def reply(self) -> bytes:
        """One whole reply (its last line)."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(self.buf)
                self.received += len(chunk)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return line

    def rest(self) -> bytes:
        """Everything until the proxy closes."""
        rest, self.buf = self.buf, b""
        while chunk := self.sock.recv(65536):
            self.received += len(chunk)
            rest += chunk
        return rest

    def close(self) -> None:
        self.sock.close()


def sessionEnds(proxy: ProxyProcess, account: str) -> list[dict]:
    lines = [json.loads(line) for line in proxy.full_log().splitlines()]
    return [e for e in lines if e.get("event") == "session-end" and e["account"] == account]


def ended(proxy: ProxyProcess, account: str) -> dict:
    """The session's one session-end event (waiting for it; a second one fails)."""
    wait_until(lambda: sessionEnds(proxy, account), TIMEOUT, f"session-end of {account}")
    # Whatever else the proxy still logs about this session comes now.
    proxy.wait_for_log(f"session {account}", timeout=TIMEOUT)
    [event] = sessionEnds(proxy, account)
    assert event["protocol"] == "smtp" and event["client"] == "127.0.0.1"
    assert isinstance(event["duration"], float) and event["duration"] >= 0
    return event


def busy(c: Counted) -> None:
    """Some traffic each way after the login."""
    for _ in range(3):
        c.send(b"NOOP\r\n")
        assert c.reply().startswith(b"250 ")
    c.send(b"EHLO again.example\r\n")
    assert c.reply().startswith(b"250 ")


def test_client_quit(jproxy, provider, dovecot, submission, pki):
    snd = sender(jproxy, provider, dovecot, submission, pki)
    c = Counted(jproxy.smtp_port, snd.account, snd.token)
    try:
        busy(c)
        c.send(b"QUIT\r\n")
        assert c.reply().startswith(b"221 ")
        assert c.rest() == b""
    finally:
        c.close()
    event = ended(jproxy, snd.account)
    assert (event["bytes_up"], event["bytes_down"]) == (c.sent, c.received)
    assert event["closed_by"] == "client"


def test_provider_close(jproxy, provider, dovecot, submission, pki):
    snd = sender(jproxy, provider, dovecot, submission, pki)
    c = Counted(jproxy.smtp_port, snd.account, snd.token)
    try:
        busy(c)
        # Dovecot ends a session that sends too many bad commands (421).
        last = b""
        for _ in range(50):
            c.send(b"XYZZY\r\n")
            last = c.reply()
            if last.startswith(b"421 "):
                break
        assert last.startswith(b"421 "), last
        c.rest()
    finally:
        c.close()
    event = ended(jproxy, snd.account)
    assert (event["bytes_up"], event["bytes_down"]) == (c.sent, c.received)
    assert event["closed_by"] == "provider"


def test_operator_delete(jproxy, provider, dovecot, submission, pki, root):
    snd = sender(jproxy, provider, dovecot, submission, pki)
    c = Counted(jproxy.smtp_port, snd.account, snd.token)
    auth = {"Authorization": f"Bearer {root}"}
    try:
        busy(c)
        listed = requests.get(
            f"{jproxy.api_url}/v1/sessions?account={snd.account}", headers=auth, timeout=TIMEOUT
        )
        [session] = listed.json()["sessions"]
        assert session["protocol"] == "smtp"
        r = requests.delete(
            f"{jproxy.api_url}/v1/session/{session['id']}", headers=auth, timeout=TIMEOUT
        )
        assert r.status_code in (200, 204), r.text
        before = c.received
        last = c.rest()
        assert last.startswith(b"421 "), last
        # The proxy's own 421 line is not relayed bytes.
        own = len(last)
    finally:
        c.close()
    event = ended(jproxy, snd.account)
    assert (event["bytes_up"], event["bytes_down"]) == (c.sent, before)
    assert c.received - own == before
    assert event["closed_by"] == "operator"
