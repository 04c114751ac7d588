"""
A client of the real ``twistd imapproxy`` that leaves while its login runs
at the real Dovecot (held in the provider's introspection): the proxy sees
it go, and the commands it pipelined behind LOGIN (a STORE) never reach
the mailbox.
"""

from __future__ import annotations

import socket
import uuid

from tests.conftest import register
from tests.imaputil import TIMEOUT
from tests.upstream.osutil import wait_until


def flags(dovecot, email: str) -> str:
    out = dovecot.doveadm("fetch", "-u", email, "flags", "mailbox", "INBOX")
    return out.stdout.decode()


def session_ended(dovecot, email: str) -> bool:
    """Whether Dovecot logged *email* in, then the end of that session."""
    with open(dovecot.log_path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if f"<{email}>" in line or f"({email})" in line]
    return any("Login: " in line for line in lines) and any(
        "Logged out" in line or "Disconnected" in line for line in lines
    )


def test_client_gone_during_login_runs_nothing(proxy, provider, dovecot, pki):
    box = register(proxy, provider, dovecot, pki)
    tag = uuid.uuid4().hex
    dovecot.seed(box.email, f"From: a@example.com\r\nSubject: {tag}\r\n\r\nhello\r\n".encode())
    assert "\\Deleted" not in flags(dovecot, box.email)
    c = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    f = c.makefile("rb")
    try:
        assert f.readline().startswith(b"* OK ")
        before = provider.stats()["introspect_calls"]
        provider.hold_introspection(True)
        try:
            c.sendall(
                b"a LOGIN " + box.account.encode() + b" " + box.token.encode() + b"\r\n"
                b"b SELECT INBOX\r\nc STORE 1 +FLAGS (\\Deleted)\r\n"
            )
            wait_until(
                lambda: provider.stats()["introspect_calls"] > before,
                TIMEOUT,
                "the proxy's login at the provider",
            )
            # The client leaves while its login is held at the provider.
            c.shutdown(socket.SHUT_WR)
            assert f.read() == b""
        finally:
            provider.hold_introspection(False)
    finally:
        f.close()
        c.close()
    wait_until(lambda: session_ended(dovecot, box.email), TIMEOUT, "the provider session to end")
    assert "\\Deleted" not in flags(dovecot, box.email)
    log = proxy.full_log()
    assert f"session {box.account}@" not in log
    for bad in ("Traceback", "Unhandled", "internal error"):
        assert bad not in log, bad
