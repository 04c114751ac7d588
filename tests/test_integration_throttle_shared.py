"""
A provider's throttling shared by two ``twistd imapproxy`` instances on one
Redis: the instance that met it records the back-off, and a login through the
other instance right after is answered from it without reaching the provider
(``tests/upstream/throttler.py`` counts the logins that reach it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

from tests.conftest import ISSUED_SECRETS
from tests.test_integration_throttle import (
    THROTTLED,
    account_state,
    imap_login,
    throttled_account,
)
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer
from tests.upstream.throttler import Throttler


@pytest.fixture(scope="module")
def throttler(workdir) -> Iterator[Throttler]:
    t = Throttler(os.path.join(workdir, "throttler-shared"))
    t.start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def tredis() -> Iterator[RedisServer]:
    r = RedisServer()
    r.start()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture(scope="module")
def pair(pki, workdir, tredis) -> Iterator[list[ProxyProcess]]:
    keyfile = os.path.join(workdir, "throttle-shared-secret.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    procs: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            p = ProxyProcess(
                os.path.join(workdir, f"proxy-throttle-{name}"),
                store=tredis.url,
                secret_file=keyfile,
                env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
            )
            procs.append(p)
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def test_backoff_shared_between_instances(pair, provider, pki, throttler):
    a, b = pair
    account, email, token = throttled_account(a, provider, pki, throttler, "gmail-connections")
    # Instance A meets the provider's throttling (Gmail's connection limit).
    assert THROTTLED + b"10 seconds" in imap_login(a, pki, account, token)
    assert throttler.logins("imap", email) == 1
    # Instance B backs off as well: the provider is not asked again.
    again = imap_login(b, pki, account, token)
    assert THROTTLED in again, again
    assert throttler.logins("imap", email) == 1
    root = b.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
    ISSUED_SECRETS.append(root)
    throttled = account_state(b, root, account)["throttled"]
    assert (throttled["reason"], throttled["protocol"]) == ("throttled-connections", "imap")
    assert 9.0 <= throttled["until"] - throttled["at"] <= 11.0
    assert "refused without asking the provider" in b.log()
