"""
``imapproxy store copy``: a deployment on SQLite moved to Redis keeps every
app, account and token, and its secrets stay usable under the new key: a
service started on the copy logs in with the tokens issued before, without a
provider refresh, and refreshes with the copied grant when it must.
"""

from __future__ import annotations

import json
import os

import pytest
from cryptography.fernet import Fernet

from tests.conftest import ISSUED_SECRETS, register
from tests.imaputil import plain
from tests.upstream.proxyproc import ProxyError, ProxyProcess
from tests.upstream.redisserver import RedisServer


def _login(port: int, account: str, token: str) -> str:
    c = plain(port)
    try:
        return c.login(account, token)[0]
    finally:
        c.shutdown()


@pytest.fixture
def redis():
    r = RedisServer()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def test_store_copy_moves_everything_with_usable_secrets(pki, workdir, provider, dovecot, redis):
    """Accounts, tokens and saved access tokens copied SQLite → Redis all still work."""
    env = {"REQUESTS_CA_BUNDLE": pki.ca_cert}
    old = ProxyProcess(os.path.join(workdir, "copy-from"), env=env)
    old.start()
    try:
        boxes = [register(old, provider, dovecot, pki) for _ in range(3)]
        # One account can send: its SMTP server must come along too. (Set
        # before the logins: a changed account drops its saved access token.)
        old.cli(
            "accounts",
            "update",
            boxes[0].account,
            "--smtp-host",
            "localhost",
            "--smtp-port",
            "2465",
            "--smtp-ca-file",
            pki.ca_cert,
            "--imap-max-connections",
            "7",
            "--smtp-max-connections",
            "2",
        )
        for mb in boxes[:2]:
            assert _login(old.port, mb.account, mb.token) == "OK"
        root = old.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout
        ISSUED_SECRETS.append(root.strip())
    finally:
        old.stop()

    keyfile = os.path.join(workdir, "copy-to.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    new = ProxyProcess(
        os.path.join(workdir, "copy-to"), env=env, store=redis.url, secret_file=keyfile
    )
    copied = old.cli("store", "copy", old.store, redis.url, "--to-secret-file", keyfile)
    assert "3 accounts" in copied.stderr and "4 tokens" in copied.stderr
    assert "2 saved access tokens" in copied.stderr
    dump = repr(redis.dump())
    for mb in boxes:
        assert mb.refresh_token not in dump and mb.token not in dump

    # A second copy into the now non-empty store is refused, and changes nothing.
    again = old.cli("store", "copy", old.store, redis.url, "--to-secret-file", keyfile, check=False)
    assert again.returncode == 1 and "not empty" in again.stderr

    listed = new.cli("accounts", "list").stdout
    assert all(mb.account in listed for mb in boxes)
    shown = [json.loads(new.cli("accounts", "show", mb.account).stdout) for mb in boxes[:2]]
    assert shown[0]["smtp"] == {
        "host": "localhost",
        "port": 2465,
        "tls": "implicit",
        "caFile": pki.ca_cert,
        "maxConnections": 2,
    }
    assert shown[0]["imap"]["maxConnections"] == 7
    assert shown[1]["smtp"] is None and shown[1]["imap"]["maxConnections"] is None
    new.start()
    try:
        provider.reset_stats()
        for mb in boxes[:2]:
            assert _login(new.port, mb.account, mb.token) == "OK"
        # The saved access tokens came along: no refresh for those two.
        assert provider.stats()["token_calls"] == 0
        # The third never logged in: the copied (re-encrypted) grant refreshes.
        assert _login(new.port, boxes[2].account, boxes[2].token) == "OK"
        assert provider.stats()["token_calls_by_username"].get(boxes[2].email) == 1
    finally:
        new.stop()


def test_store_copy_needs_the_targets_key(pki, workdir, redis):
    """A Redis target without a key is refused with a clear message, before anything is written."""
    p = ProxyProcess(os.path.join(workdir, "copy-nokey"))
    with pytest.raises(ProxyError) as e:
        p.cli("store", "copy", p.store, redis.url)
    assert "key" in str(e.value)
    assert redis.dump() == {}
