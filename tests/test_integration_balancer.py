"""
Two ``twistd imapproxy`` instances on one Redis behind a real HAProxy (TCP
mode, PROXY protocol v2, TLS passed through to ``haproxy:ssl:`` listeners),
the deployment of docs/scaling.md: logins are spread over both instances, and
token address restrictions see the client's address, not the balancer's.
"""

from __future__ import annotations

import os
import re
import socket
import ssl

import pytest
from cryptography.fernet import Fernet

from tests.conftest import ISSUED_SECRETS, register
from tests.imaputil import TIMEOUT
from tests.upstream.haproxy import HAProxy
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer


@pytest.fixture(scope="module")
def balanced(pki, workdir):
    redis = RedisServer()
    redis.start()
    keyfile = os.path.join(workdir, "balanced.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    listener = f"haproxy:ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}"
    instances = []
    balancer = None
    try:
        for name in ("a", "b"):
            p = ProxyProcess(
                os.path.join(workdir, f"balanced-{name}"),
                store=redis.url,
                secret_file=keyfile,
                env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
            )
            p.start("--port", listener)
            instances.append(p)
        balancer = HAProxy(
            os.path.join(workdir, "haproxy"),
            {f"i{n}": p.ports["haproxy+ssl"] for n, p in enumerate(instances)},
        )
        balancer.start()
        yield balancer, instances
    finally:
        if balancer is not None:
            balancer.stop()
        for p in instances:
            p.stop()
        redis.stop()


def login(port: int, ca: str, account: str, token: str, source: str = "127.0.0.1") -> bytes:
    """TLS to the balancer from ``source``, LOGIN; :return: the tagged answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    with ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost") as s:
        f = s.makefile("rb")
        greeting = f.readline()
        assert greeting.startswith(b"* OK"), greeting
        s.sendall(f"a1 LOGIN {account} {token}\r\n".encode())
        while True:
            line = f.readline()
            if line.startswith(b"a1 ") or not line:
                break
        s.sendall(b"a2 LOGOUT\r\n")
        return line


def test_logins_through_haproxy_reach_both_instances(balanced, pki, provider, dovecot):
    """Round robin over two instances: every login works, and both instances serve some."""
    balancer, (a, b) = balanced
    mb = register(a, provider, dovecot, pki)
    answers = [login(balancer.port, pki.ca_cert, mb.account, mb.token) for _ in range(4)]
    assert all(ans.startswith(b"a1 OK") for ans in answers), answers
    spliced = re.compile(rf"session {re.escape(mb.account)}@127\.0\.0\.1 spliced")
    assert spliced.search(a.log()) and spliced.search(b.log())


def test_restrictions_see_the_client_behind_haproxy(balanced, pki, provider, dovecot):
    """A token for 127.0.0.2/32 logs in from 127.0.0.2 and not from 127.0.0.3 (HAProxy is .1)."""
    balancer, (a, b) = balanced
    mb = register(a, provider, dovecot, pki, token_args=("--address", "127.0.0.2/32"))
    for _ in range(2):  # once on each instance
        ok = login(balancer.port, pki.ca_cert, mb.account, mb.token, source="127.0.0.2")
        assert ok.startswith(b"a1 OK"), ok
        refused = login(balancer.port, pki.ca_cert, mb.account, mb.token, source="127.0.0.3")
        assert refused.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), refused
    assert "from 127.0.0.3" in a.log() + b.log()
    ISSUED_SECRETS.append(mb.token)
