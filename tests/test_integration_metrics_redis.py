"""
The auth-penalty gauge with a Redis store: two real ``twistd imapproxy``
instances on one real redis-server; a login refused by instance A counts
its address, and instance B's ``/metrics`` shows it (the penalties are
shared, so is their count).
"""

from __future__ import annotations

import os
import socket

import pytest
from cryptography.fernet import Fernet

from tests.test_integration_metrics import scrape, value
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer

GAUGE = "imapproxy_login_penalty_addresses"
ATTACKER = "127.0.0.2"


@pytest.fixture
def two_instances(workdir):
    redis = RedisServer()
    redis.start()
    keyfile = os.path.join(workdir, "redis-penalty-secret.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    started = []
    try:
        for name in ("a", "b"):
            p = ProxyProcess(
                os.path.join(workdir, f"proxy-penalty-{name}"), store=redis.url, secret_file=keyfile
            )
            p.start("--login-penalty", "4")
            started.append(p)
        yield started
    finally:
        for p in started:
            p.stop()
        redis.stop()


def refusedLogin(port: int) -> bytes:
    with socket.create_connection(
        ("127.0.0.1", port), timeout=30, source_address=(ATTACKER, 0)
    ) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"a LOGIN nobody " + b"0" * 64 + b"\r\n")
        while True:
            line = f.readline()
            if not line or line.startswith(b"a "):
                return line


def test_penalty_gauge_counts_every_instances_failures(two_instances):
    a, b = two_instances
    assert value(scrape(a), GAUGE) == 0
    assert refusedLogin(a.port).startswith(b"a NO [AUTHENTICATIONFAILED]")
    # B refused nothing, yet it sees the address A penalised.
    assert value(scrape(b), GAUGE) == 1
