"""
The relay end to end under both of its paths: the real ``twistd imapproxy``
started with ``--relay fast`` and with ``--relay plain``, TLS on both legs,
a real Dovecot. A representative subset of the integration tests (large
APPEND and FETCH, IDLE, closes from either side over TLS, an upstream
STARTTLS account) runs against each.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import OAUTH2_DEADLINE, register
from tests.imaputil import TIMEOUT, Raw, client_context, message, tls
from tests.upstream.proxyproc import ProxyProcess

START_LINES = {
    "fast": "relay: fast paths on",
    "plain": "relay: Twisted's public path (relay = plain)",
}


@pytest.fixture(scope="module", params=["fast", "plain"])
def relay_proxy(request, pki, workdir, dovecot, provider):
    mode = request.param
    p = ProxyProcess(
        os.path.join(workdir, f"proxy-relay-{mode}"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    p.start(
        "--port",
        f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
        "--relay",
        mode,
    )
    p.mode = mode  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.stop()


class TLSRaw(Raw):
    """``Raw`` over implicit TLS."""

    def __init__(self, port: int, ca_file: str):
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock = client_context(ca_file).wrap_socket(sock, server_hostname="localhost")
        self.buf = b""


def loggedIn(relay_proxy: ProxyProcess, pki, mailbox) -> TLSRaw:
    """A raw TLS client, greeted and logged in (tag ``a``) through the relay."""
    r = TLSRaw(relay_proxy.ports["ssl"], pki.ca_cert)
    r.line()
    r.send(f"a LOGIN {mailbox.account} {mailbox.token}\r\n".encode())
    assert r.until(b"a")[-1].startswith(b"a OK")
    return r


def test_the_start_up_log_names_the_path_once(relay_proxy):
    """One line at start-up says which path the relay takes."""
    log = relay_proxy.log()
    assert log.count("relay: ") == 1
    assert START_LINES[relay_proxy.mode] in log


def test_large_append_and_fetch_are_byte_identical(relay_proxy, provider, dovecot, pki):
    """A 20 MB APPEND and FETCH through TLS on both legs arrive unchanged."""
    mailbox = register(relay_proxy, provider, dovecot, pki)
    msg = message(20 * 1024 * 1024, "large")
    c = tls(relay_proxy.ports["ssl"], pki.ca_cert)
    try:
        c.login(mailbox.account, mailbox.token)
        assert c.append("INBOX", "", None, msg)[0] == "OK"
        c.select("INBOX")
        typ, data = c.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        assert data[0][1] == msg
    finally:
        c.logout()
    # Every connection took its path without a fallback or an error.
    assert "not hooked" not in relay_proxy.log()
    assert "Traceback" not in relay_proxy.log()


def test_idle_sees_exists(relay_proxy, provider, dovecot, pki):
    """IDLE over the splice wakes up for a message appended by another session."""
    mailbox = register(relay_proxy, provider, dovecot, pki)
    r = loggedIn(relay_proxy, pki, mailbox)
    try:
        r.send(b"b SELECT INBOX\r\n")
        assert r.until(b"b")[-1].startswith(b"b OK")
        r.send(b"c IDLE\r\n")
        assert r.line().startswith(b"+ ")
        other = tls(relay_proxy.ports["ssl"], pki.ca_cert)
        try:
            other.login(mailbox.account, mailbox.token)
            other.append("INBOX", "", None, message(2000, "idle wake-up"))
        finally:
            other.logout()
        assert r.line() == b"* 1 EXISTS"
        r.send(b"DONE\r\n")
        assert r.until(b"c")[-1].startswith(b"c OK")
    finally:
        r.close()


def test_client_tls_close_ends_the_session(relay_proxy, provider, dovecot, pki):
    """A client that logs out: its TLS closes cleanly and the session ends."""
    mailbox = register(relay_proxy, provider, dovecot, pki)
    r = loggedIn(relay_proxy, pki, mailbox)
    try:
        r.send(b"z LOGOUT\r\n")
        assert r.until(b"z")[-1].startswith(b"z OK")
        assert r.closed()
    finally:
        r.close()
    relay_proxy.wait_for_log(f"session {mailbox.account}@127.0.0.1 ended")


def test_provider_disconnect_closes_the_tls_client(relay_proxy, provider, dovecot, pki):
    """When the provider ends the session, the TLS client sees its BYE, then a clean close."""
    mailbox = register(relay_proxy, provider, dovecot, pki)
    r = loggedIn(relay_proxy, pki, mailbox)
    try:
        dovecot.kick(mailbox.email)
        assert r.line().startswith(b"* BYE")
        assert r.closed()
    finally:
        r.close()


def test_upstream_starttls_account(relay_proxy, provider, dovecot, pki):
    """An account whose provider speaks STARTTLS: logged in and relayed, twice (resumed)."""
    mailbox = register(relay_proxy, provider, dovecot, pki, tls="starttls")
    for _ in range(2):
        c = tls(relay_proxy.ports["ssl"], pki.ca_cert)
        try:
            c.login(mailbox.account, mailbox.token)
            assert c.select("INBOX")[0] == "OK"
        finally:
            c.logout()
