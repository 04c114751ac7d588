"""
A token endpoint in trouble, through the real ``twistd imapproxy``, the fake
OAuth2 provider and the real Dovecot: a failing endpoint fails no login while
the access token in hand is still valid, and once a hung endpoint recovers,
the next login succeeds at once.
"""

from __future__ import annotations

import os
import sqlite3
import time

import requests

from proxy.encryption import loadSecrets
from proxy.store import _records as R
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OAUTH2_DEADLINE, register
from tests.imaputil import plain


def access_token(provider, pki, refresh_token: str) -> str:
    """An access token for the grant, straight from the provider's token endpoint."""
    r = requests.post(
        provider.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        verify=pki.ca_cert,
        timeout=10,
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


def save_access_token(proxy, account: str, token: str, expires: float, lifetime: float) -> None:
    """Put an access token in the store's copy, as an instance would have saved it."""
    state = os.path.join(proxy.workdir, "state")
    secrets = loadSecrets(None, os.path.join(state, "secret.key"))
    fields = R.accessRecord(token, expires, lifetime, secrets)
    db = sqlite3.connect(os.path.join(state, "imapproxy.sqlite3"), timeout=10)
    try:
        with db:
            sets = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE accounts SET {sets} WHERE id=?", (*fields.values(), account))
    finally:
        db.close()


def login(proxy, box) -> float:
    """Log in through the proxy (it must succeed); :return: seconds it took."""
    started = time.monotonic()
    c = plain(proxy.port)
    c.login(box.account, box.token)
    took = time.monotonic() - started
    c.select("INBOX")
    c.logout()
    return took


def test_failing_endpoint_with_valid_token(proxy, provider, dovecot, pki):
    box = register(proxy, provider, dovecot, pki)
    # The store's copy has 60 s of life left: due for its early refresh.
    token = access_token(provider, pki, box.refresh_token)
    save_access_token(proxy, box.account, token, time.time() + 60, 3600.0)
    before = provider.stats()["token_calls"]
    provider.fail(503, -1)
    try:
        took = login(proxy, box)
    finally:
        provider.fail(503, 0)
    assert provider.stats()["token_calls"] > before, "the early refresh was not tried"
    assert took < OAUTH2_DEADLINE, took


def test_hung_endpoint_recovers_at_once(proxy, provider, dovecot, pki):
    box = register(proxy, provider, dovecot, pki)
    login(proxy, box)
    # The provider stops accepting the token in hand, and its token endpoint hangs.
    provider.expire_access(box.email)
    provider.delay(30)
    try:
        c = plain(proxy.port)
        try:
            try:
                c.login(box.account, box.token)
                raise AssertionError("logged in while the token endpoint hangs")
            except c.error as e:
                assert "[UNAVAILABLE]" in str(e), e
        finally:
            c.shutdown()
    finally:
        provider.delay(0)
    # Recovered: the next login does not wait for the request still hung.
    took = login(proxy, box)
    assert took < 2.0, took
