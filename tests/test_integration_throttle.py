"""
Provider throttling through the real ``twistd imapproxy``: a fake provider
(``tests/upstream/throttler.py``) answers every login with Gmail's or
Microsoft's throttling texts; the client reads a fixed text, the proxy backs
off (the next logins never reach the provider), and the account's state in
the API says so.
"""

from __future__ import annotations

import imaplib
import os
import secrets
import smtplib
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import CLIENT_ID, CLIENT_SECRET, ISSUED_SECRETS, add_account, issue_token
from tests.imaputil import TIMEOUT, client_context, plain
from tests.upstream.osutil import wait_until
from tests.upstream.throttler import Throttler

THROTTLED = b"[UNAVAILABLE] The provider is throttling this account, try again in "


@pytest.fixture(scope="module")
def throttler(workdir) -> Iterator[Throttler]:
    t = Throttler(os.path.join(workdir, "throttler"))
    t.start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def root(proxy) -> str:
    token = proxy.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
    ISSUED_SECRETS.append(token)
    return token


def throttled_account(proxy, provider, pki, throttler, kind: str) -> tuple[str, str, str]:
    """An account whose IMAP and SMTP servers are the throttler: (id, mailbox, token)."""
    n = secrets.token_hex(3)
    account, email = f"thr-{kind}-{n}", f"{kind}-{n}@example.com"
    refresh_token = "rt-" + secrets.token_urlsafe(24)
    provider.add_grant(refresh_token, email, CLIENT_ID, CLIENT_SECRET)
    add_account(
        proxy,
        provider,
        account=account,
        email=email,
        refresh_token=refresh_token,
        port=throttler.imap_port,
        host="127.0.0.1",
        tls="plain",
        ca_file=pki.ca_cert,
        smtp_host="127.0.0.1",
        smtp_port=throttler.smtp_port,
        smtp_tls="plain",
    )
    token = issue_token(proxy, account, "throttled", "--scope", "smtp")
    ISSUED_SECRETS.extend([token, refresh_token])
    return account, email, token


def imap_login(proxy, pki, account: str, token: str) -> bytes:
    """The text of the proxy's refusal (the login must be refused)."""
    c = plain(proxy.port)
    try:
        with pytest.raises(imaplib.IMAP4.error) as e:
            c.login(account, token)
        return str(e.value).encode()
    finally:
        c.shutdown()


def account_state(proxy, root: str, account: str) -> dict:
    r = requests.get(
        f"{proxy.api_url}/v1/account/{account}",
        headers={"Authorization": f"Bearer {root}"},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_gmail_connection_limit_backs_off(proxy, provider, pki, throttler, root):
    account, email, token = throttled_account(proxy, provider, pki, throttler, "gmail-connections")
    first = imap_login(proxy, pki, account, token)
    assert THROTTLED + b"10 seconds" in first, first
    assert throttler.logins("imap", email) == 1
    # The back-off: answered at once, the provider not asked again.
    started = time.monotonic()
    again = imap_login(proxy, pki, account, token)
    assert THROTTLED in again, again
    assert time.monotonic() - started < 2.0
    assert throttler.logins("imap", email) == 1
    throttled = account_state(proxy, root, account)["throttled"]
    assert throttled["reason"] == "throttled-connections"
    assert throttled["protocol"] == "imap"
    assert 9.0 <= throttled["until"] - throttled["at"] <= 11.0
    listed = requests.get(
        f"{proxy.api_url}/v1/accounts", headers={"Authorization": f"Bearer {root}"}, timeout=20
    ).json()["accounts"]
    assert [a["throttled"]["reason"] for a in listed if a["account"] == account] == [
        "throttled-connections"
    ]
    assert "Too many simultaneous" not in proxy.log()


def test_microsoft_suggested_time_honoured(proxy, provider, pki, throttler, root):
    account, email, token = throttled_account(proxy, provider, pki, throttler, "ms-backoff")
    assert THROTTLED + b"3 seconds" in imap_login(proxy, pki, account, token)
    assert THROTTLED in imap_login(proxy, pki, account, token)
    assert throttler.logins("imap", email) == 1
    until = account_state(proxy, root, account)["throttled"]["until"]
    # Once the suggested 3 s are over, a login reaches the provider again.
    wait_until(lambda: time.time() > until + 0.2, 10.0, "the back-off to end")
    assert THROTTLED + b"3 seconds" in imap_login(proxy, pki, account, token)
    assert throttler.logins("imap", email) == 2


def test_smtp_thread_limit_backs_off(proxy, provider, pki, throttler, root):
    account, email, token = throttled_account(proxy, provider, pki, throttler, "smtp")
    for _ in range(2):
        c = smtplib.SMTP(proxy.host, proxy.smtp_port, timeout=TIMEOUT)
        try:
            c.starttls(context=client_context(pki.ca_cert))
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                c.login(account, token)
            assert e.value.smtp_code == 454
            assert e.value.smtp_error.startswith(
                b"4.7.0 The provider is throttling this account, try again in "
            ), e.value.smtp_error
        finally:
            c.close()
    assert throttler.logins("smtp", email) == 1
    throttled = account_state(proxy, root, account)["throttled"]
    assert (throttled["reason"], throttled["protocol"]) == ("throttled-submission", "smtp")
