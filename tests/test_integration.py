"""
The proxy end to end: the real ``twistd imapproxy``, a real Dovecot logging
in with XOAUTH2 against the fake provider, and real clients (imaplib,
IMAPClient, raw sockets).
"""

from __future__ import annotations

import imaplib
import socket
import sqlite3
import time

import pytest
from imapclient import IMAPClient

from tests.conftest import register
from tests.imaputil import (
    Raw,
    client_context,
    direct,
    message,
    plain,
    provider_access_token,
    tls,
)
from tests.upstream.osutil import wait_until


def _login_refusal(port: int, user: str, password: str) -> str:
    c = plain(port)
    try:
        with pytest.raises(imaplib.IMAP4.error) as e:
            c.login(user, password)
        return str(e.value)
    finally:
        c.shutdown()


# -- logging in -------------------------------------------------------------


def test_greeting_names_client_address(proxy):
    """The greeting says who is connecting, as the reference product does."""
    c = plain(proxy.port)
    try:
        assert c.welcome == b"* OK imapproxy ready for requests from 127.0.0.1"
    finally:
        c.shutdown()


def test_login_list_select_logout(proxy, mailbox):
    """LOGIN with account id + token gives the provider's session: LIST, SELECT, LOGOUT."""
    c = plain(proxy.port)
    typ, data = c.login(mailbox.account, mailbox.token)
    assert typ == "OK"
    assert data[0].startswith(b"[CAPABILITY IMAP4rev1 ")
    assert b"IDLE" in data[0] and b"AUTH=" not in data[0]
    assert data[0].endswith(b"] " + mailbox.account.encode() + b" authenticated")
    typ, boxes = c.list()
    assert typ == "OK" and any(b"INBOX" in b for b in boxes)
    typ, count = c.select("INBOX")
    assert typ == "OK" and count == [b"0"]
    typ, bye = c.logout()
    assert typ == "BYE"


def test_authenticate_plain_with_continuation(proxy, mailbox):
    """AUTHENTICATE PLAIN through a continuation (imaplib does not use SASL-IR)."""
    c = plain(proxy.port)
    try:
        typ, data = c.authenticate(
            "PLAIN", lambda _: f"\0{mailbox.account}\0{mailbox.token}".encode()
        )
        assert typ == "OK" and data[0].endswith(b"authenticated")
        assert c.select("INBOX")[0] == "OK"
    finally:
        c.logout()


def test_authenticate_plain_sasl_ir(proxy, mailbox):
    """AUTHENTICATE PLAIN with an initial response (RFC 4959) logs in in one round trip."""
    import base64

    r = Raw(proxy.port)
    try:
        r.line()
        ir = base64.b64encode(f"\0{mailbox.account}\0{mailbox.token}".encode())
        r.send(b"a AUTHENTICATE PLAIN " + ir + b"\r\n")
        lines = r.until(b"a")
        assert lines == [lines[-1]] and lines[-1].startswith(b"a OK [CAPABILITY ")
    finally:
        r.close()


def test_imapclient_over_tls_and_idle_sees_exists(proxy, mailbox, pki, dovecot):
    """Implicit TLS with IMAPClient; IDLE sees an EXISTS caused by another connection."""
    with IMAPClient(
        "localhost",
        port=proxy.ports["ssl"],
        ssl=True,
        ssl_context=client_context(pki.ca_cert),
        timeout=20,
    ) as c:
        c.login(mailbox.account, mailbox.token)
        assert b"IDLE" in c.capabilities()
        c.select_folder("INBOX")
        c.idle()
        other = tls(proxy.ports["ssl"], pki.ca_cert)
        try:
            other.login(mailbox.account, mailbox.token)
            other.append("INBOX", "", None, message(2000, "idle wake-up"))
        finally:
            other.logout()
        responses = c.idle_check(timeout=15)
        c.idle_done()
        assert (1, b"EXISTS") in responses


def test_commands_pipelined_behind_login_go_upstream_in_order(proxy, mailbox):
    """Commands sent in the same packet as LOGIN are answered by the provider, in order."""
    r = Raw(proxy.port)
    try:
        r.line()
        r.send(
            f"a LOGIN {mailbox.account} {mailbox.token}\r\n"
            "b SELECT INBOX\r\nc NAMESPACE\r\nd LOGOUT\r\n".encode()
        )
        lines = r.until(b"d")
        tags = [ln.split(b" ", 1)[0] for ln in lines if not ln.startswith(b"*")]
        assert tags == [b"a", b"b", b"c", b"d"]
        assert lines[0].startswith(b"a OK [CAPABILITY ")
        # NAMESPACE is answered by Dovecot (its separator), not by the proxy.
        assert any(ln.startswith(b'* NAMESPACE (("" ".")') for ln in lines)
        assert any(ln.startswith(b"b OK [READ-WRITE]") for ln in lines)
        assert r.closed()
    finally:
        r.close()


def test_starttls_then_login(proxy, mailbox, pki):
    """STARTTLS on the plain port (with --tls-certificate) and a login inside TLS."""
    c = plain(proxy.port)
    assert "STARTTLS" in c.capabilities
    c.starttls(client_context(pki.ca_cert))
    try:
        assert c.login(mailbox.account, mailbox.token)[0] == "OK"
    finally:
        c.logout()


def test_upstream_starttls_account(proxy, provider, dovecot, pki):
    """An account whose provider speaks STARTTLS on a plain port works the same."""
    mb = register(proxy, provider, dovecot, pki, tls="starttls")
    c = plain(proxy.port)
    try:
        assert c.login(mb.account, mb.token)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
    finally:
        c.logout()


# -- refusals ---------------------------------------------------------------


def test_unknown_token_refused(proxy, mailbox):
    """A token that does not exist: AUTHENTICATIONFAILED, and the token is not echoed."""
    bogus = "0" * 64
    text = _login_refusal(proxy.port, mailbox.account, bogus)
    assert "[AUTHENTICATIONFAILED] Access denied, failed to authenticate user" in text
    assert bogus not in text


def test_token_of_another_account_refused(proxy, provider, dovecot, pki, mailbox):
    """A token used with another account id as user name: invalid username."""
    other = register(proxy, provider, dovecot, pki)
    text = _login_refusal(proxy.port, other.account, mailbox.token)
    assert "[AUTHENTICATIONFAILED] Access denied, invalid username" in text


def test_token_without_imap_scope_refused(proxy, mailbox):
    """A token with only the smtp scope cannot log in to IMAP."""
    token = proxy.cli(
        "tokens",
        "issue",
        "--account",
        mailbox.account,
        "--scope",
        "smtp",
        "--description",
        "smtp only",
    ).stdout.strip()
    text = _login_refusal(proxy.port, mailbox.account, token)
    assert "[AUTHENTICATIONFAILED] Access denied, invalid scope" in text


def test_ip_restrictions(proxy, provider, dovecot, pki):
    """A token for 10.0.0.0/8 is refused from 127.0.0.1; one for 127.0.0.0/8 works."""
    far = register(proxy, provider, dovecot, pki, token_args=("--address", "10.0.0.0/8"))
    text = _login_refusal(proxy.port, far.account, far.token)
    assert "[AUTHENTICATIONFAILED] Access denied, traffic not accepted from this IP" in text
    near = register(
        proxy,
        provider,
        dovecot,
        pki,
        token_args=("--address", "::1/128", "--address", "127.0.0.0/8"),
    )
    c = plain(proxy.port)
    try:
        assert c.login(near.account, near.token)[0] == "OK"
    finally:
        c.logout()


def test_expired_token_refused(proxy, mailbox):
    """A token past its expiry time is refused with its own text."""
    from proxy.tokens import tokenId

    path = proxy.store.removeprefix("sqlite://")
    db = sqlite3.connect(path, timeout=10)
    with db:
        db.execute(
            "UPDATE tokens SET expires=? WHERE id=?", (time.time() - 1, tokenId(mailbox.token))
        )
    db.close()
    text = _login_refusal(proxy.port, mailbox.account, mailbox.token)
    assert "[AUTHENTICATIONFAILED] Access denied, token expired" in text


def test_revoked_token_refused(proxy, mailbox):
    """A revoked token stops working for new logins at once."""
    proxy.cli("tokens", "revoke", mailbox.token)
    text = _login_refusal(proxy.port, mailbox.account, mailbox.token)
    assert "[AUTHENTICATIONFAILED] Access denied, failed to authenticate user" in text


def test_plaintext_login_denied_without_tls(pki, workdir, dovecot, provider):
    """With --plaintext-login deny, a plain connection gets LOGINDISABLED and STARTTLS."""
    import os

    from tests.upstream.proxyproc import ProxyProcess

    p = ProxyProcess(os.path.join(workdir, "proxy-deny"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start("--plaintext-login", "deny", "--tls-certificate", pki.cert, "--tls-key", pki.key)
    try:
        mb = register(p, provider, dovecot, pki)
        c = plain(p.port)
        assert "LOGINDISABLED" in c.capabilities and "AUTH=PLAIN" not in c.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            c.login(mb.account, mb.token)
        c.starttls(client_context(pki.ca_cert))
        assert c.login(mb.account, mb.token)[0] == "OK"
        c.logout()
    finally:
        p.stop()


# -- the provider misbehaving -----------------------------------------------


def test_stale_access_token_is_refreshed_and_login_retried(proxy, provider, mailbox):
    """When the provider rejects the cached access token, the proxy refreshes once and retries."""
    c = plain(proxy.port)
    c.login(mailbox.account, mailbox.token)
    c.logout()
    calls = provider.stats()["token_calls_by_username"].get(mailbox.email, 0)
    assert calls == 1
    provider.expire_access(mailbox.email)
    c = plain(proxy.port)
    try:
        assert c.login(mailbox.account, mailbox.token)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
    finally:
        c.logout()
    assert provider.stats()["token_calls_by_username"][mailbox.email] == 2


def test_cached_access_token_reused(proxy, provider, mailbox):
    """Logins within the access token's lifetime do not call the token endpoint again."""
    for _ in range(3):
        c = plain(proxy.port)
        c.login(mailbox.account, mailbox.token)
        c.logout()
    assert provider.stats()["token_calls_by_username"][mailbox.email] == 1


def test_token_endpoint_hiccup_is_retried(proxy, provider, mailbox):
    """A single 503 from the token endpoint is retried with backoff; the login succeeds."""
    provider.fail(503, 1)
    c = plain(proxy.port)
    try:
        assert c.login(mailbox.account, mailbox.token)[0] == "OK"
    finally:
        c.logout()
    assert provider.stats()["token_calls_by_username"][mailbox.email] == 2


def test_token_endpoint_outage_gives_unavailable_then_recovers(proxy, provider, mailbox):
    """A failing token endpoint gives NO [UNAVAILABLE] within the bound; then it recovers."""
    from tests.conftest import OAUTH2_DEADLINE

    provider.fail(503, -1)
    try:
        started = time.monotonic()
        text = _login_refusal(proxy.port, mailbox.account, mailbox.token)
        elapsed = time.monotonic() - started
    finally:
        provider.fail(503, 0)
    assert "[UNAVAILABLE]" in text
    assert elapsed < OAUTH2_DEADLINE + 2
    assert provider.stats()["token_calls_by_username"][mailbox.email] >= 2
    c = plain(proxy.port)
    try:
        assert c.login(mailbox.account, mailbox.token)[0] == "OK"
    finally:
        c.logout()


def test_revoked_grant_needs_reauthorization(proxy, provider, mailbox):
    """invalid_grant: the account becomes reauth-required, fails fast, and a new grant clears it."""
    import json
    import secrets

    provider.revoke_grant(mailbox.refresh_token)
    text = _login_refusal(proxy.port, mailbox.account, mailbox.token)
    assert "[AUTHENTICATIONFAILED] Account needs re-authorization" in text
    shown = json.loads(proxy.cli("accounts", "show", mailbox.account).stdout)
    assert shown["state"] == "reauth-required"
    assert shown["stateReason"].startswith("invalid_grant")
    calls = provider.stats()["token_calls"]

    text = _login_refusal(proxy.port, mailbox.account, mailbox.token)
    assert "Account needs re-authorization" in text
    assert provider.stats()["token_calls"] == calls  # failed fast, no provider call

    fresh = "rt-" + secrets.token_urlsafe(24)
    provider.add_grant(fresh, mailbox.email, "app-client", "app-secret")
    proxy.cli(
        "accounts",
        "add",
        mailbox.account,
        "--replace",
        "--email",
        mailbox.email,
        "--imap-host",
        "localhost",
        "--imap-port",
        str(shown["imap"]["port"]),
        "--imap-ca-file",
        shown["imap"]["caFile"],
        "--token-url",
        provider.token_url,
        "--client-id",
        "app-client",
        "--client-secret",
        "app-secret",
        "--refresh-token",
        "-",
        input=fresh + "\n",
    )
    assert json.loads(proxy.cli("accounts", "show", mailbox.account).stdout)["state"] == "ok"
    c = plain(proxy.port)
    try:
        assert c.login(mailbox.account, mailbox.token)[0] == "OK"
    finally:
        c.logout()


def test_imap_server_down_gives_unavailable(proxy, provider, dovecot, pki):
    """An account whose IMAP server does not answer gets NO [UNAVAILABLE] quickly."""
    import socket

    mb = register(proxy, provider, dovecot, pki)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    proxy.cli(
        "accounts",
        "add",
        mb.account,
        "--replace",
        "--email",
        mb.email,
        "--imap-host",
        "127.0.0.1",
        "--imap-port",
        str(dead_port),
        "--token-url",
        provider.token_url,
        "--client-id",
        "app-client",
        "--client-secret",
        "app-secret",
        "--refresh-token",
        "-",
        input=mb.refresh_token + "\n",
    )
    started = time.monotonic()
    text = _login_refusal(proxy.port, mb.account, mb.token)
    assert "[UNAVAILABLE]" in text
    assert time.monotonic() - started < 10


# -- pre-auth bounds ----------------------------------------------------------


def test_long_line_before_login_is_cut_off(proxy):
    """A command line longer than the limit ends the connection with * BYE."""
    r = Raw(proxy.port)
    try:
        r.line()
        r.send(b"a NOOP " + b"x" * 20000 + b"\r\n")
        assert r.line().startswith(b"* BYE")
        assert r.closed()
    finally:
        r.close()


def test_large_literal_before_login_is_refused(proxy):
    """A LOGIN literal larger than the limit is refused without reading it."""
    r = Raw(proxy.port)
    try:
        r.line()
        r.send(b"a LOGIN {100000000}\r\n")
        line = r.line()
        assert line.startswith(b"a BAD") and b"Literal too long" in line
        r.send(b"b NOOP\r\n")
        assert r.line().startswith(b"b OK")
    finally:
        r.close()


def test_too_many_bad_commands_end_connection(proxy):
    """Repeated invalid commands end with * BYE and a closed connection."""
    r = Raw(proxy.port)
    try:
        r.line()
        r.send(b"".join(b"t%d SELECT INBOX\r\n" % i for i in range(10)))
        lines = [r.line() for _ in range(11)]
        assert all(ln.startswith(b"t") and b" BAD " in ln for ln in lines[:10])
        assert lines[10].startswith(b"* BYE")
        assert r.closed()
    finally:
        r.close()


def test_too_many_failed_logins_end_connection(proxy, mailbox):
    """Three refused logins on one connection end it."""
    r = Raw(proxy.port)
    try:
        r.line()
        for i in range(3):
            r.send(b"l%d LOGIN %s %s\r\n" % (i, mailbox.account.encode(), b"f" * 64))
            assert b"NO [AUTHENTICATIONFAILED]" in r.line()
        assert r.line().startswith(b"* BYE")
        assert r.closed()
    finally:
        r.close()


def test_login_timeout(pki, workdir, dovecot):
    """A client that never logs in is disconnected after --login-timeout."""
    import os

    from tests.upstream.proxyproc import ProxyProcess

    p = ProxyProcess(os.path.join(workdir, "proxy-timeout"))
    p.start("--login-timeout", "1")
    try:
        r = Raw(p.port)
        started = time.monotonic()
        r.line()
        r.send(b"a NOOP\r\n")
        assert r.line().startswith(b"a OK")
        assert r.line().startswith(b"* BYE")
        assert r.closed()
        assert 0.9 < time.monotonic() - started < 10
        r.close()
    finally:
        p.stop()


def test_spliced_session_outlives_login_timeout(pki, workdir, dovecot, provider):
    """After login, the pre-auth timeout no longer applies (IDLE may last hours)."""
    import os

    from tests.upstream.proxyproc import ProxyProcess

    p = ProxyProcess(
        os.path.join(workdir, "proxy-timeout2"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    # Long enough for a first login (token refresh, upstream TLS) on a loaded
    # machine; the wait below outlasts it from the connection's start.
    p.start("--login-timeout", "3")
    try:
        mb = register(p, provider, dovecot, pki)
        r = Raw(p.port)
        r.line()
        r.send(f"a LOGIN {mb.account} {mb.token}\r\nb SELECT INBOX\r\n".encode())
        r.until(b"b")
        # Wait out more than the login timeout on an event that never comes:
        # the IDLE gets no update, and the session must still be there after.
        r.send(b"i IDLE\r\n")
        assert r.line().startswith(b"+")
        # Dovecot may still report the mailbox (untagged lines) meanwhile;
        # a BYE or a close would be the proxy ending the session.
        r.sock.settimeout(3.5)
        seen: list[bytes] = []
        with pytest.raises(TimeoutError):
            while True:
                seen.append(r.line())
        assert all(line.startswith(b"* ") and b"BYE" not in line for line in seen), seen
        r.sock.settimeout(20)
        r.send(b"DONE\r\nn NOOP\r\n")
        assert r.until(b"i")[-1].startswith(b"i OK")
        assert r.until(b"n")[-1].startswith(b"n OK")
        r.close()
    finally:
        p.stop()


def test_client_disconnect_closes_upstream(proxy, mailbox, dovecot):
    """When the client goes away, the proxy closes its provider connection too."""
    c = plain(proxy.port)
    c.login(mailbox.account, mailbox.token)
    c.select("INBOX")
    user = mailbox.email.encode()
    assert user in dovecot.doveadm("who", "-1").stdout
    c.shutdown()
    wait_until(
        lambda: user not in dovecot.doveadm("who", "-1").stdout, 30, "the provider session closed"
    )


def test_provider_disconnect_closes_client(proxy, mailbox, dovecot):
    """When the provider ends the session (kick), the client sees its BYE and EOF."""
    r = Raw(proxy.port)
    try:
        r.line()
        r.send(f"a LOGIN {mailbox.account} {mailbox.token}\r\n".encode())
        assert r.line().startswith(b"a OK")
        dovecot.kick(mailbox.email)
        assert r.line().startswith(b"* BYE")
        assert r.closed()
    finally:
        r.close()


def test_same_result_as_direct_connection(proxy, mailbox, pki, dovecot, provider):
    """What a client sees through the proxy equals what it sees talking to Dovecot directly."""
    for i in range(5):
        dovecot.seed(mailbox.email, message(3000 + i * 997, f"seed {i}"))
    via = plain(proxy.port)
    via.login(mailbox.account, mailbox.token)
    via.select("INBOX", readonly=True)
    got_proxy = via.fetch("1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
    via.logout()
    token = provider_access_token(provider, mailbox.refresh_token, pki.ca_cert)
    d = direct(dovecot, mailbox.email, token)
    d.select("INBOX", readonly=True)
    got_direct = d.fetch("1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
    d.logout()
    assert got_proxy == got_direct
    assert len(got_proxy[1]) == 10  # five (envelope, body) pairs


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _unread_from(port: int) -> int:
    """The most bytes waiting unread in a local TCP socket whose peer is ``port``."""
    most = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = f.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                most = max(most, int(fields[4].split(":")[1], 16))
    return most


def test_flow_control_bounds_memory_for_a_client_that_does_not_read(proxy, mailbox, dovecot):
    """A 40 MB FETCH to a client that stops reading is not buffered in the proxy."""
    size = 40 * 1024 * 1024
    msg = message(size, "flow control")
    dovecot.seed(mailbox.email, msg)
    r = Raw(proxy.port)
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        r.line()
        r.send(f"a LOGIN {mailbox.account} {mailbox.token}\r\nb EXAMINE INBOX\r\n".encode())
        r.until(b"b")
        before = _rss_kib(proxy.pid())
        r.send(b"c FETCH 1 BODY.PEEK[]\r\n")
        # Flow control has taken hold once the proxy leaves Dovecot's bytes
        # unread in its socket (the client's buffers and the proxy's are
        # full). A proxy that buffered instead would read all 40 MB and
        # leave nothing queued, and fail here.
        wait_until(
            lambda: _unread_from(dovecot.tls_port) >= 32 * 1024,
            30,
            "the proxy to stop reading from Dovecot",
        )
        grown = _rss_kib(proxy.pid()) - before
        assert grown < 8 * 1024, f"proxy grew by {grown} KiB while the client did not read"
        got = r.until(b"c")
        assert got[-1].startswith(b"c OK")
    finally:
        r.close()


def test_proxy_protocol_client_address(pki, workdir, dovecot, provider):
    """Behind a load balancer (haproxy:), greeting, IP restrictions and policy see the client."""
    import os

    from tests.upstream.proxyproc import ProxyProcess

    p = ProxyProcess(
        os.path.join(workdir, "proxy-haproxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    p.start("--port", "haproxy:tcp:0:interface=127.0.0.1", "--plaintext-login", "loopback")
    try:
        inside = register(p, provider, dovecot, pki, token_args=("--address", "203.0.113.0/24"))
        outside = register(p, provider, dovecot, pki, token_args=("--address", "127.0.0.0/8"))
        port = p.ports["haproxy"]

        def via_balancer(source: str) -> Raw:
            r = Raw(port)
            r.send(f"PROXY TCP4 {source} 127.0.0.1 40000 2143\r\n".encode())
            return r

        r = via_balancer("203.0.113.9")
        assert r.line() == b"* OK imapproxy ready for requests from 203.0.113.9"
        r.send(b"c CAPABILITY\r\n")
        caps = r.until(b"c")[0]
        assert b"LOGINDISABLED" in caps  # not loopback: no password in the clear
        r.close()

        # A balancer on loopback must not make remote clients "loopback": with
        # plaintext allowed, the restrictions still judge the real address.
        p.stop()
        p.start("--port", "haproxy:tcp:0:interface=127.0.0.1", "--plaintext-login", "allow")
        port = p.ports["haproxy"]
        r = via_balancer("203.0.113.9")
        r.line()
        r.send(f"a LOGIN {inside.account} {inside.token}\r\n".encode())
        assert r.line().startswith(b"a OK [CAPABILITY ")
        r.close()
        r = via_balancer("203.0.113.9")
        r.line()
        r.send(f"a LOGIN {outside.account} {outside.token}\r\n".encode())
        assert r.line() == (
            b"a NO [AUTHENTICATIONFAILED] Access denied, traffic not accepted from this IP"
        )
        r.close()

        r = Raw(port)
        r.send(b"a LOGIN x y\r\n")  # no PROXY header: not a balancer, closed
        assert r.closed()
        r.close()
    finally:
        p.stop()
