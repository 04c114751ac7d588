"""
Refused certificates through the real ``twistd imapproxy``: a token endpoint
whose certificate comes from a CA the proxy does not trust (a second fake
provider with a PKI of its own) is reported as such, at once, in the client's
answer, the log and the account's state; and forgotten once it works again.
"""

from __future__ import annotations

import imaplib
import json
import os
import secrets

import pytest
import requests

from tests.conftest import CLIENT_ID, CLIENT_SECRET, ISSUED_SECRETS, add_account, issue_token
from tests.imaputil import plain
from tests.upstream import Provider, make_pki

REFUSED = "[UNAVAILABLE] The provider's certificate was refused, the operator must act"


@pytest.fixture(scope="module")
def untrusted(workdir):
    """A fake provider whose token endpoint shows a certificate from an unknown CA."""
    p = Provider(
        make_pki(os.path.join(workdir, "pki-untrusted")),
        os.path.join(workdir, "provider-untrusted"),
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


def _refusal(port: int, user: str, password: str) -> str:
    c = plain(port)
    try:
        with pytest.raises(imaplib.IMAP4.error) as e:
            c.login(user, password)
        return str(e.value)
    finally:
        c.shutdown()


def _stateReason(proxy, account: str) -> str | None:
    return json.loads(proxy.cli("accounts", "show", account).stdout)["stateReason"]


def test_untrusted_token_endpoint(proxy, provider, untrusted, dovecot, pki):
    """An untrusted token endpoint certificate: fixed NO at once, logged, shown, then cleared."""
    account = "certs-" + secrets.token_hex(3)
    email = f"{account}@example.com"
    refresh_token = "rt-" + secrets.token_urlsafe(24)
    ISSUED_SECRETS.append(refresh_token)
    common = dict(
        account=account,
        email=email,
        refresh_token=refresh_token,
        port=dovecot.tls_port,
        ca_file=pki.ca_cert,
    )
    add_account(proxy, untrusted, **common)
    token = issue_token(proxy, account, "certificate test")
    ISSUED_SECRETS.append(token)
    server = f"127.0.0.1:{untrusted.https_port}"

    assert REFUSED in _refusal(proxy.port, account, token)

    proxy.wait_for_log(f"login of {account} refused the provider's certificate")
    lines = [line for line in proxy.log().splitlines() if account in line]
    [warning] = [line for line in lines if "refused the provider's certificate" in line]
    assert "certificate-untrusted" in warning
    assert f"token endpoint {server}: unable to get local issuer certificate" in warning
    # Not retried: no backoff, and never the old, misleading reason.
    assert not [line for line in lines if "retrying" in line or "oauth2-unreachable" in line]

    reason = _stateReason(proxy, account)
    assert reason.startswith(
        f"certificate-untrusted: token endpoint {server}: unable to get local issuer certificate ("
    )
    assert json.loads(proxy.cli("accounts", "show", account).stdout)["state"] == "ok"

    # The operator points the account at a token endpoint it trusts (a PUT
    # that keeps the state and its reason): the next login works and the
    # recorded refusal goes.
    provider.add_grant(refresh_token, email, CLIENT_ID, CLIENT_SECRET)
    root = proxy.cli("tokens", "issue", "--scope", "api", "--description", "certs").stdout.strip()
    ISSUED_SECRETS.append(root)
    r = requests.put(
        f"{proxy.api_url}/v1/account/{account}",
        headers={"Authorization": f"Bearer {root}"},
        json={"oauth2": {"tokenUrl": provider.token_url}},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert _stateReason(proxy, account) == reason
    c = plain(proxy.port)
    try:
        assert c.login(account, token)[0] == "OK"
    finally:
        c.logout()
    assert _stateReason(proxy, account) is None
