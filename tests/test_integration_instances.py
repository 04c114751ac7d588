"""
Two ``twistd imapproxy`` instances, A and B, sharing one Redis store: tokens
issued or revoked on one hold on the other at once, close requests (revoke
with ``disconnect=true``, account deletion) reach the other instance's
sessions, concurrent refreshes for one account call the provider once, and a
Redis outage gives clear refusals, spares spliced sessions and heals by itself.

The module's Redis keeps its data on disk (append-only file, synced at every
write) so that the outage test can really stop it and start it again on the
same port with the accounts, tokens and close stream intact; the "hung"
(SIGSTOP) case is covered for one instance by test_integration_redis.
"""

from __future__ import annotations

import imaplib
import json
import os
import threading
import time

import attrs
import pytest
import requests
from cryptography.fernet import Fernet

from proxy.store._rediscoord import _PUBLISH, STREAM_LENGTH
from tests.conftest import ISSUED_SECRETS, OAUTH2_DEADLINE, register
from tests.imaputil import Raw, message, plain
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer

# Where the instances' SessionBus publishes (default key prefix, database 0).
CHANNEL = "imapproxy:0:sessions"
STREAM = "imapproxy:sessions:closes"


@attrs.frozen
class Pair:
    a: ProxyProcess
    b: ProxyProcess
    redis: RedisServer
    root: str = attrs.field(repr=False)


@pytest.fixture(scope="module")
def pair(pki, workdir, dovecot):
    redis = RedisServer(persist=True)
    redis.start()
    keyfile = os.path.join(workdir, "instances-secret.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    procs: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            p = ProxyProcess(
                os.path.join(workdir, f"proxy-instance-{name}"),
                store=redis.url,
                secret_file=keyfile,
                env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
            )
            procs.append(p)
            p.start(
                "--port",
                "haproxy:tcp:0:interface=127.0.0.1",
                "--plaintext-login",
                "allow",
                "--oauth2-deadline",
                str(OAUTH2_DEADLINE),
            )
        a, b = procs
        root = a.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
        ISSUED_SECRETS.append(root)
        yield Pair(a, b, redis, root)
    finally:
        for p in procs:
            p.stop()
        redis.cleanup()


def api(p: ProxyProcess, method: str, path: str, token: str, body=None) -> requests.Response:
    return requests.request(
        method,
        p.api_url + path,
        headers={"Authorization": f"Bearer {token}"},
        json=body,
        timeout=20,
    )


def _login(port: int, account: str, token: str) -> str:
    """ "OK", or the refusal's text."""
    c = plain(port)
    try:
        return c.login(account, token)[0]
    except imaplib.IMAP4.error as e:
        return str(e)
    finally:
        try:
            c.logout()
        except Exception:
            c.shutdown()


def _spliced(p: ProxyProcess, account: str, token: str) -> Raw:
    """A raw session logged in through ``p`` with INBOX selected."""
    r = Raw(p.port)
    r.line()
    r.send(f"a LOGIN {account} {token}\r\nb SELECT INBOX\r\n".encode())
    lines = r.until(b"b")
    assert lines[-1].startswith(b"b OK"), lines
    return r


def _noop(r: Raw, tag: bytes = b"n") -> bytes:
    r.send(tag + b" NOOP\r\n")
    return r.until(tag)[-1]


def _closed_within(r: Raw, seconds: float) -> bool:
    """Whether the proxy closes the session within ``seconds`` (EOF, not a timeout)."""
    r.sock.settimeout(seconds)
    return r.closed()


def _imap_token(p: ProxyProcess, root: str, account: str) -> str:
    r = api(
        p,
        "POST",
        "/v1/token",
        root,
        {"account": account, "scopes": ["imap-proxy"], "description": "t"},
    )
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    ISSUED_SECRETS.append(token)
    return token


def _together(*logins) -> list[str]:
    """Run ``(port, account, token)`` logins in threads released at the same moment."""
    barrier = threading.Barrier(len(logins))
    results: list[str] = ["not run"] * len(logins)

    def run(i: int, port: int, account: str, token: str) -> None:
        barrier.wait(timeout=10)
        results[i] = _login(port, account, token)

    threads = [threading.Thread(target=run, args=(i, *args)) for i, args in enumerate(logins)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


# -- tokens and close requests across instances ------------------------------


def test_token_issued_on_a_works_on_b_at_once(pair, provider, dovecot, pki):
    """A token issued through A's API logs in through B right away."""
    mb = register(pair.a, provider, dovecot, pki)
    token = _imap_token(pair.a, pair.root, mb.account)
    assert _login(pair.b.port, mb.account, token) == "OK"


def test_revoke_on_b_refuses_next_login_on_a(pair, provider, dovecot, pki):
    """A token revoked through B is refused on A at once; A's live session on it stays."""
    mb = register(pair.a, provider, dovecot, pki)
    live = _spliced(pair.a, mb.account, mb.token)
    try:
        r = api(pair.b, "DELETE", f"/v1/token/{mb.token}", pair.root)
        assert r.json() == {"deleted": True}
        assert "AUTHENTICATIONFAILED" in _login(pair.a.port, mb.account, mb.token)
        assert _noop(live).startswith(b"n OK")
    finally:
        live.close()


def test_disconnect_on_b_closes_sessions_on_a_and_b(pair, provider, dovecot, pki):
    """disconnect=true through B closes the token's sessions on A and B, and only those."""
    mb = register(pair.a, provider, dovecot, pki)
    other = register(pair.a, provider, dovecot, pki)
    on_a = _spliced(pair.a, mb.account, mb.token)
    on_b = _spliced(pair.b, mb.account, mb.token)
    bystander = _spliced(pair.a, other.account, other.token)
    try:
        r = api(pair.b, "DELETE", f"/v1/token/{mb.token}?disconnect=true", pair.root)
        assert r.json() == {"deleted": True, "disconnected": 1}  # counted where it was asked
        assert _closed_within(on_b, 2.0)
        assert _closed_within(on_a, 2.0)
        assert _noop(bystander).startswith(b"n OK")
    finally:
        for r in (on_a, on_b, bystander):
            r.close()


def test_delete_account_on_a_closes_its_sessions_on_b(pair, provider, dovecot, pki):
    """Deleting an account through A closes its sessions on B."""
    mb = register(pair.a, provider, dovecot, pki)
    on_b = _spliced(pair.b, mb.account, mb.token)
    try:
        r = api(pair.a, "DELETE", f"/v1/account/{mb.account}", pair.root)
        assert r.json() == {"deleted": True, "disconnected": 0}
        assert _closed_within(on_b, 2.0)
    finally:
        on_b.close()
    assert "AUTHENTICATIONFAILED" in _login(pair.b.port, mb.account, mb.token)


def test_admin_command_closes_sessions_on_every_instance(pair, provider, dovecot, pki):
    """The admin command on the shared store: revoke --disconnect and accounts remove close
    the sessions on both running instances."""
    mb = register(pair.a, provider, dovecot, pki)
    other = register(pair.a, provider, dovecot, pki)
    sessions = [_spliced(p, mb.account, mb.token) for p in (pair.a, pair.b)]
    theirs = [_spliced(p, other.account, other.token) for p in (pair.a, pair.b)]
    try:
        done = pair.a.cli("tokens", "revoke", mb.token, "--disconnect")
        assert "closed on every instance" in done.stderr
        assert all(_closed_within(r, 2.0) for r in sessions)
        assert all(_noop(r).startswith(b"n OK") for r in theirs)
        pair.b.cli("accounts", "remove", other.account)
        assert all(_closed_within(r, 2.0) for r in theirs)
    finally:
        for r in sessions + theirs:
            r.close()


def test_close_missed_while_unsubscribed_is_caught_up(pair, provider, dovecot, pki):
    """A close request published while no instance listened reaches both from the stream."""
    mb = register(pair.a, provider, dovecot, pki)
    on_a = _spliced(pair.a, mb.account, mb.token)
    on_b = _spliced(pair.b, mb.account, mb.token)
    try:
        wait_until(
            lambda: pair.redis.command("PUBSUB", "NUMSUB", CHANNEL)[1] == 2,
            30,
            "both instances subscribed",
        )
        body = json.dumps({"from": "tests", "account": mb.account, "token": None})
        # Atomically: drop both subscriptions, then publish (live delivery impossible).
        killed, (_entry, listening) = pair.redis.transaction(
            ("CLIENT", "KILL", "TYPE", "pubsub"),
            ("EVAL", _PUBLISH, "1", STREAM, str(STREAM_LENGTH), body, CHANNEL),
        )
        assert killed == 2 and listening == 0
        assert _closed_within(on_a, 5.0)
        assert _closed_within(on_b, 5.0)
    finally:
        on_a.close()
        on_b.close()


# -- refresh leases -----------------------------------------------------------


def test_concurrent_first_refresh_calls_provider_once(pair, provider, dovecot, pki):
    """Two instances refreshing one account at the same time make one token call."""
    mb = register(pair.a, provider, dovecot, pki)
    provider.delay(1.0)
    try:
        provider.reset_stats()
        results = _together(
            (pair.a.port, mb.account, mb.token), (pair.b.port, mb.account, mb.token)
        )
        assert results == ["OK", "OK"]
        assert provider.stats()["token_calls_by_username"].get(mb.email) == 1
    finally:
        provider.delay(0)


def test_concurrent_refresh_after_upstream_refusal_calls_provider_once(
    pair, provider, dovecot, pki
):
    """Both instances' cached token refused upstream: one refresh serves both."""
    mb = register(pair.a, provider, dovecot, pki)
    provider.reset_stats()
    assert _login(pair.a.port, mb.account, mb.token) == "OK"
    assert _login(pair.b.port, mb.account, mb.token) == "OK"  # A's saved token
    assert provider.stats()["token_calls_by_username"].get(mb.email) == 1
    assert provider.expire_access(mb.email) >= 1
    provider.delay(1.0)
    try:
        provider.reset_stats()
        results = _together(
            (pair.a.port, mb.account, mb.token), (pair.b.port, mb.account, mb.token)
        )
        assert results == ["OK", "OK"]
        assert provider.stats()["token_calls_by_username"].get(mb.email) == 1
    finally:
        provider.delay(0)


# -- PROXY protocol -------------------------------------------------------------


def test_proxy_protocol_address_restriction(pair, provider, dovecot, pki):
    """An --address 10.0.0.0/8 token: refused from 192.0.2.7, accepted from 10.1.2.3."""
    mb = register(pair.a, provider, dovecot, pki, token_args=("--address", "10.0.0.0/8"))

    def via_balancer(p: ProxyProcess, source: str) -> bytes:
        r = Raw(p.ports["haproxy"])
        try:
            r.send(f"PROXY TCP4 {source} 127.0.0.1 40000 143\r\n".encode())
            assert r.line() == f"* OK imapproxy ready for requests from {source}".encode()
            r.send(f"a LOGIN {mb.account} {mb.token}\r\n".encode())
            return r.until(b"a")[-1]
        finally:
            r.close()

    assert via_balancer(pair.a, "192.0.2.7") == (
        b"a NO [AUTHENTICATIONFAILED] Access denied, traffic not accepted from this IP"
    )
    assert via_balancer(pair.a, "10.1.2.3").startswith(b"a OK [CAPABILITY ")
    assert via_balancer(pair.b, "10.1.2.3").startswith(b"a OK [CAPABILITY ")


# -- Redis outage ------------------------------------------------------------------


def test_redis_down_and_back(pair, provider, dovecot, pki):
    """Redis stopped: fast NO [UNAVAILABLE] and 503, spliced session lives; back: all heals."""
    mb = register(pair.a, provider, dovecot, pki)
    dovecot.seed(mb.email, message(2000, subject="outage"))
    cut = pair.a.cli(
        "tokens", "issue", "--account", mb.account, "--scope", "imap-proxy", "--description", "c"
    ).stdout.strip()
    ISSUED_SECRETS.append(cut)
    live = _spliced(pair.a, mb.account, mb.token)
    to_cut = _spliced(pair.a, mb.account, cut)
    try:
        pair.redis.stop()
        with pytest.raises(OSError):
            pair.redis.command("PING")  # really gone
        try:
            for p in (pair.a, pair.b):
                started = time.monotonic()
                text = _login(p.port, mb.account, mb.token)
                assert "[UNAVAILABLE]" in text, text
                assert time.monotonic() - started < 6
                r = api(p, "GET", "/v1/accounts", pair.root)
                assert r.status_code == 503 and r.json()["statusCode"] == 503
            assert _noop(live).startswith(b"n OK")
            live.send(b"f FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
            fetched = live.until(b"f")
            assert fetched[-1].startswith(b"f OK") and b"Subject: outage" in b"\n".join(fetched)
        finally:
            pair.redis.start()
        for p in (pair.a, pair.b):
            wait_until(
                lambda p=p: _login(p.port, mb.account, mb.token) == "OK",
                30,
                f"a login through {p.workdir} after Redis came back",
            )
        assert _noop(live, b"m").startswith(b"m OK")
        # The close subscriptions came back: a revoke on B reaches A's session.
        r = api(pair.b, "DELETE", f"/v1/token/{cut}?disconnect=true", pair.root)
        assert r.json() == {"deleted": True, "disconnected": 0}
        assert _closed_within(to_cut, 6.0)
        assert _noop(live, b"k").startswith(b"k OK")
    finally:
        live.close()
        to_cut.close()
