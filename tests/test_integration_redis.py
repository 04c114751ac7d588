"""
The real ``twistd imapproxy`` on the Redis store: accounts and tokens made
with the admin command work for IMAP logins, a Redis outage under the
running service gives clear refusals (IMAP and API) and heals by itself, and
a Redis emptied under it is reported by ``/health`` rather than looking healthy.
"""

from __future__ import annotations

import os
import time

import pytest
import requests
from cryptography.fernet import Fernet

from tests.conftest import ISSUED_SECRETS, register
from tests.imaputil import plain
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer


@pytest.fixture(scope="module")
def redis_proxy(pki, workdir, dovecot):
    redis = RedisServer()
    redis.start()
    keyfile = os.path.join(workdir, "redis-secret.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    p = ProxyProcess(
        os.path.join(workdir, "proxy-redis"),
        store=redis.url,
        secret_file=keyfile,
        env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
    )
    p.start()
    try:
        yield p, redis
    finally:
        p.stop()
        redis.stop()


def _login(port: int, account: str, token: str) -> str:
    c = plain(port)
    try:
        return c.login(account, token)[0]
    except Exception as e:
        return str(e)
    finally:
        try:
            c.logout()
        except Exception:
            c.shutdown()


def test_logins_through_the_redis_store(redis_proxy, provider, dovecot, pki):
    """An account and token made with the admin command on Redis log in through the proxy."""
    p, redis = redis_proxy
    mb = register(p, provider, dovecot, pki)
    assert _login(p.port, mb.account, mb.token) == "OK"
    dump = repr(redis.dump())
    assert mb.refresh_token not in dump and mb.token not in dump  # hashed / encrypted


def test_redis_outage_refuses_clearly_and_heals(redis_proxy, provider, dovecot, pki):
    """Redis hung: NO [UNAVAILABLE] and 503, quickly; Redis back: it works again, no restart."""
    p, redis = redis_proxy
    mb = register(p, provider, dovecot, pki)
    root = p.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
    ISSUED_SECRETS.append(root)
    assert _login(p.port, mb.account, mb.token) == "OK"
    redis.pause()  # hung, not gone: the harder case (no connection error, no answer)
    try:
        started = time.monotonic()
        text = _login(p.port, mb.account, mb.token)
        assert "[UNAVAILABLE]" in text
        assert time.monotonic() - started < 6
        r = requests.get(
            p.api_url + "/v1/accounts", headers={"Authorization": f"Bearer {root}"}, timeout=20
        )
        assert r.status_code == 503 and r.json()["statusCode"] == 503
    finally:
        redis.resume()
    deadline = time.monotonic() + 15
    result = ""
    while time.monotonic() < deadline:
        result = _login(p.port, mb.account, mb.token)
        if result == "OK":
            break
    assert result == "OK"


def test_redis_restarted_empty_is_unhealthy(redis_proxy, provider, dovecot, pki):
    """Redis emptied under the service: /health 503 saying why, logins UNAVAILABLE; restored: ok."""
    p, redis = redis_proxy
    mb = register(p, provider, dovecot, pki)
    assert _login(p.port, mb.account, mb.token) == "OK"
    assert requests.get(p.api_url + "/health", timeout=20).json() == {"status": "ok"}
    meta = redis.command("HGETALL", "imapproxy:meta")
    redis.command("FLUSHALL")  # what a restart without persistence leaves
    try:
        r = requests.get(p.api_url + "/health", timeout=20)
        assert (r.status_code, r.json()) == (
            503,
            {
                "status": "unavailable",
                "store": "data lost: marker missing (Redis restarted empty?)",
                "statusCode": 503,
            },
        )
        assert "[UNAVAILABLE]" in _login(p.port, mb.account, mb.token)
        assert requests.get(p.api_url + "/health", timeout=20).status_code == 503
        p.wait_for_log("has lost its data")
        assert p.log().count("has lost its data") == 1  # once, however often it is seen
    finally:
        # The data restored (here only the marker): healthy again, no restart.
        redis.command("HSET", "imapproxy:meta", *meta)
    r = requests.get(p.api_url + "/health", timeout=20)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
