"""
The HTTP API through the real ``twistd imapproxy``: the reference curl flows
with real curl, logins through the proxy with tokens the API issued,
revocation with and without disconnecting live sessions, IP restrictions
and account isolation.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import sqlite3
import subprocess
import time

import pytest
import requests

from tests.conftest import CLIENT_ID, CLIENT_SECRET, ISSUED_SECRETS
from tests.imaputil import Raw, plain
from tests.upstream.osutil import wait_until

CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def root(proxy) -> str:
    """A root API token, issued with the admin command as a new user would."""
    token = proxy.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
    ISSUED_SECRETS.append(token)
    return token


def api(proxy, method: str, path: str, token: str | None, body=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(
        method, proxy.api_url + path, headers=headers, json=body, timeout=20, **kw
    )


def curl(*args: str) -> dict:
    """Run curl as a user would and parse its JSON answer."""
    assert CURL is not None, "curl is required (tests/run installs what is missing)"
    out = subprocess.run(
        [CURL, "-sS", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return json.loads(out)


def new_account(proxy, provider, dovecot, pki, root, name: str | None = None) -> dict:
    """Create an account over the API with its own grant at the fake provider."""
    import secrets

    name = name or "api-" + secrets.token_hex(4)
    email = name + "@example.com"
    refresh = "rt-" + secrets.token_urlsafe(24)
    ISSUED_SECRETS.append(refresh)
    provider.add_grant(refresh, email, CLIENT_ID, CLIENT_SECRET)
    r = api(
        proxy,
        "POST",
        "/v1/account",
        root,
        {
            "account": name,
            "email": email,
            "imap": {
                "host": "localhost",
                "port": dovecot.tls_port,
                "tls": "implicit",
                "caFile": pki.ca_cert,
            },
            "oauth2": {
                "tokenUrl": provider.token_url,
                "clientId": CLIENT_ID,
                "clientSecret": CLIENT_SECRET,
                "refreshToken": refresh,
            },
        },
    )
    assert r.status_code == 200, r.text
    assert refresh not in r.text and CLIENT_SECRET not in r.text
    return {"account": name, "email": email, "refresh": refresh}


def imap_token(proxy, root, account: str, **extra) -> str:
    r = api(
        proxy,
        "POST",
        "/v1/token",
        root,
        {"account": account, "scopes": ["imap-proxy"], "description": "test", **extra},
    )
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    ISSUED_SECRETS.append(token)
    return token


def test_reference_curl_flow(proxy, provider, dovecot, pki, root):
    """Create, list, log in with, revoke and be refused, with curl as in the reference."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    base = proxy.api_url
    created = curl(
        "-X",
        "POST",
        f"{base}/v1/token",
        "-H",
        f"Authorization: Bearer {root}",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(
            {
                "account": acct["account"],
                "scopes": ["imap-proxy"],
                "description": "IMAP proxy token for backup script",
                "restrictions": {"addresses": ["127.0.0.0/8"]},
            }
        ),
    )
    token = created["token"]
    ISSUED_SECRETS.append(token)
    assert len(token) == 64 and int(token, 16) >= 0
    listed = curl(
        f"{base}/v1/tokens/account/{acct['account']}", "-H", f"Authorization: Bearer {root}"
    )
    assert [t["id"] for t in listed["tokens"]] == [created["id"]]
    assert listed["tokens"][0]["restrictions"] == {"addresses": ["127.0.0.0/8"]}
    assert listed["tokens"][0]["description"] == "IMAP proxy token for backup script"
    assert token not in json.dumps(listed)

    c = plain(proxy.port)
    assert c.login(acct["account"], token)[0] == "OK"
    assert c.list()[0] == "OK"
    c.logout()
    # Last use is recorded with the client's address.
    listed = curl(
        f"{base}/v1/tokens/account/{acct['account']}", "-H", f"Authorization: Bearer {root}"
    )
    assert listed["tokens"][0]["lastUse"]["address"] == "127.0.0.1"

    deleted = curl(
        "-X", "DELETE", f"{base}/v1/token/{token}", "-H", f"Authorization: Bearer {root}"
    )
    assert deleted == {"deleted": True}
    c = plain(proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="failed to authenticate user"):
        c.login(acct["account"], token)
    c.shutdown()
    again = curl("-X", "DELETE", f"{base}/v1/token/{token}", "-H", f"Authorization: Bearer {root}")
    assert again == {"error": "no such token", "statusCode": 404}


def _login_raw(proxy, account: str, token: str) -> Raw:
    r = Raw(proxy.port)
    r.line()
    r.send(f"a LOGIN {account} {token}\r\nb SELECT INBOX\r\n".encode())
    r.until(b"b")
    return r


def test_revoke_keeps_live_session_unless_disconnect(proxy, provider, dovecot, pki, root):
    """Revoking leaves live sessions running; ?disconnect=true closes them."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    kept_token = imap_token(proxy, root, acct["account"])
    cut_token = imap_token(proxy, root, acct["account"])
    kept = _login_raw(proxy, acct["account"], kept_token)
    cut = _login_raw(proxy, acct["account"], cut_token)
    try:
        r = api(proxy, "DELETE", f"/v1/token/{kept_token}", root)
        assert r.json() == {"deleted": True}
        kept.send(b"c NOOP\r\n")
        assert kept.until(b"c")[-1].startswith(b"c OK")

        r = api(proxy, "DELETE", f"/v1/tokens/{cut_token}?disconnect=true", root)
        assert r.json() == {"deleted": True, "disconnected": 1}
        assert cut.closed()
        kept.send(b"d NOOP\r\n")
        assert kept.until(b"d")[-1].startswith(b"d OK")
    finally:
        kept.close()
        cut.close()


def test_delete_account_revokes_tokens_and_closes_sessions(proxy, provider, dovecot, pki, root):
    """Deleting an account removes its tokens and ends its live sessions."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    token = imap_token(proxy, root, acct["account"])
    live = _login_raw(proxy, acct["account"], token)
    try:
        r = api(proxy, "DELETE", f"/v1/account/{acct['account']}", root)
        assert r.json() == {"deleted": True, "disconnected": 1}
        assert live.closed()
    finally:
        live.close()
    assert api(proxy, "GET", f"/v1/account/{acct['account']}", root).status_code == 404
    assert api(proxy, "GET", f"/v1/tokens?account={acct['account']}", root).status_code == 404
    c = plain(proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        c.login(acct["account"], token)
    c.shutdown()


def test_ip_restrictions_over_imap_and_api(proxy, provider, dovecot, pki, root):
    """127.0.0.0/8 tokens work from 127.0.0.1; 10.0.0.0/8 ones are refused, IMAP and API."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    near = imap_token(proxy, root, acct["account"], restrictions={"addresses": ["127.0.0.0/8"]})
    far = imap_token(proxy, root, acct["account"], restrictions={"addresses": ["10.0.0.0/8"]})
    c = plain(proxy.port)
    assert c.login(acct["account"], near)[0] == "OK"
    c.logout()
    c = plain(proxy.port)
    with pytest.raises(imaplib.IMAP4.error, match="traffic not accepted from this IP"):
        c.login(acct["account"], far)
    c.shutdown()

    def api_token(addresses):
        r = api(
            proxy,
            "POST",
            "/v1/token",
            root,
            {
                "account": acct["account"],
                "scopes": ["api"],
                "description": "api",
                "restrictions": {"addresses": addresses},
            },
        )
        ISSUED_SECRETS.append(r.json()["token"])
        return r.json()["token"]

    assert (
        api(proxy, "GET", f"/v1/account/{acct['account']}", api_token(["127.0.0.0/8"])).status_code
        == 200
    )
    r = api(proxy, "GET", f"/v1/account/{acct['account']}", api_token(["10.0.0.0/8"]))
    assert r.status_code == 403
    assert r.json() == {
        "error": "Access denied, traffic not accepted from this IP",
        "statusCode": 403,
    }


def test_expired_api_token_refused(proxy, root):
    """An expired API token gets 401."""
    r = api(
        proxy,
        "POST",
        "/v1/token",
        root,
        {"scopes": ["api"], "description": "short", "expiresIn": 3600},
    )
    token = r.json()["token"]
    ISSUED_SECRETS.append(token)
    assert api(proxy, "GET", "/v1/accounts", token).status_code == 200
    db = sqlite3.connect(proxy.store.removeprefix("sqlite://"), timeout=10)
    with db:
        db.execute("UPDATE tokens SET expires=? WHERE id=?", (time.time() - 1, r.json()["id"]))
    db.close()
    r = api(proxy, "GET", "/v1/accounts", token)
    assert (r.status_code, r.json()["error"]) == (401, "Access denied, token expired")


def test_account_tokens_stay_in_their_account(proxy, provider, dovecot, pki, root):
    """An account's API token acts on its own account and nothing else."""
    mine = new_account(proxy, provider, dovecot, pki, root)
    other = new_account(proxy, provider, dovecot, pki, root)
    r = api(
        proxy,
        "POST",
        "/v1/token",
        root,
        {"account": mine["account"], "scopes": ["api", "imap-proxy"], "description": "self"},
    )
    token = r.json()["token"]
    ISSUED_SECRETS.append(token)
    assert api(proxy, "GET", f"/v1/account/{mine['account']}", token).status_code == 200
    listed = api(proxy, "GET", "/v1/accounts", token).json()["accounts"]
    assert [a["account"] for a in listed] == [mine["account"]]
    for method, path, body in [
        ("GET", f"/v1/account/{other['account']}", None),
        ("GET", f"/v1/tokens/account/{other['account']}", None),
        ("GET", f"/v1/tokens?account={other['account']}", None),
        ("DELETE", f"/v1/account/{other['account']}", None),
        ("PUT", f"/v1/account/{other['account']}", {"email": "x@example.com"}),
        (
            "POST",
            "/v1/token",
            {"account": other["account"], "scopes": ["imap-proxy"], "description": "steal"},
        ),
        ("POST", "/v1/token", {"scopes": ["api"], "description": "root"}),
        ("POST", "/v1/account", {"account": "new1", "email": "n@example.com"}),
    ]:
        r = api(proxy, method, path, token, body)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["statusCode"] == 403
    # Its own account's tokens it may manage.
    own = imap_token(proxy, token, mine["account"])
    assert api(proxy, "DELETE", f"/v1/token/{own}", token).status_code == 200
    assert api(proxy, "GET", f"/v1/account/{other['account']}", root).status_code == 200


def test_missing_and_wrong_scope_tokens(proxy, mailbox, root):
    """No token → 401, an unknown one → 401, an imap-proxy-only token → 403."""
    assert api(proxy, "GET", "/v1/accounts", None).status_code == 401
    assert api(proxy, "GET", "/v1/accounts", "0" * 64).status_code == 401
    r = api(proxy, "GET", f"/v1/account/{mailbox.account}", mailbox.token)
    assert (r.status_code, r.json()["error"]) == (403, "Access denied, invalid scope")


def test_put_account_and_login_after(proxy, provider, dovecot, pki, root):
    """PUT changes an account without touching its secrets; logins keep working."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    r = api(
        proxy,
        "PUT",
        f"/v1/account/{acct['account']}",
        root,
        {
            "imap": {
                "host": "localhost",
                "port": dovecot.tls_port,
                "tls": "implicit",
                "caFile": pki.ca_cert,
            },
            "state": "ok",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["oauth2"]["refreshTokenSet"] and body["oauth2"]["clientSecretSet"]
    token = imap_token(proxy, root, acct["account"])
    c = plain(proxy.port)
    assert c.login(acct["account"], token)[0] == "OK"
    c.logout()


def test_openapi_served(proxy):
    """/openapi.json is served without a token and is the packaged description."""
    r = requests.get(proxy.api_url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    assert r.json()["openapi"].startswith("3.")


def test_disconnect_closes_tls_sessions(proxy, provider, dovecot, pki, root):
    """disconnect=true ends a session whose client speaks TLS (both legs TLS)."""
    import socket

    from tests.imaputil import client_context

    acct = new_account(proxy, provider, dovecot, pki, root)
    token = imap_token(proxy, root, acct["account"])
    raw = socket.create_connection(("127.0.0.1", proxy.ports["ssl"]), timeout=20)
    s = client_context(pki.ca_cert).wrap_socket(raw, server_hostname="localhost")
    f = s.makefile("rb")
    try:
        f.readline()
        s.sendall(f"a LOGIN {acct['account']} {token}\r\nb SELECT INBOX\r\n".encode())
        while not f.readline().startswith(b"b OK"):
            pass
        r = api(proxy, "DELETE", f"/v1/token/{token}?disconnect=true", root)
        assert r.json() == {"deleted": True, "disconnected": 1}
        f.read()  # returns only at EOF: the proxy closed the session
    finally:
        s.close()
    user = acct["email"].encode()
    wait_until(
        lambda: user not in dovecot.doveadm("who", "-1").stdout, 30, "the provider session closed"
    )


def test_tokens_cannot_mint_wider_api_tokens(proxy, provider, dovecot, pki, root):
    """A restricted, expiring API token cannot hand out more management power than it has."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    r = api(
        proxy,
        "POST",
        "/v1/token",
        root,
        {
            "account": acct["account"],
            "scopes": ["api", "imap-proxy"],
            "description": "narrow",
            "expiresIn": 3600,
            "restrictions": {"addresses": ["127.0.0.0/8"]},
        },
    )
    narrow = r.json()["token"]
    ISSUED_SECRETS.append(narrow)
    for body in (
        {"scopes": ["*"]},
        {"scopes": ["api"], "expiresIn": 7200},
        {"scopes": ["api"], "restrictions": {"addresses": ["0.0.0.0/0"]}},
    ):
        r = api(
            proxy,
            "POST",
            "/v1/token",
            narrow,
            {"account": acct["account"], "description": "wider", **body},
        )
        assert r.status_code == 403, (body, r.text)
    r = api(
        proxy,
        "POST",
        "/v1/token",
        narrow,
        {"account": acct["account"], "scopes": ["api"], "description": "same"},
    )
    assert r.status_code == 200
    ISSUED_SECRETS.append(r.json()["token"])
    listed = api(proxy, "GET", f"/v1/tokens/account/{acct['account']}", root).json()["tokens"]
    minted = next(t for t in listed if t["id"] == r.json()["id"])
    assert minted["restrictions"] == {"addresses": ["127.0.0.0/8"]}
    assert minted["expires"] is not None
    # Minting IMAP tokens is what API tokens are for: those carry no such limits.
    r = api(
        proxy,
        "POST",
        "/v1/token",
        narrow,
        {"account": acct["account"], "scopes": ["imap-proxy"], "description": "imap"},
    )
    assert r.status_code == 200
    ISSUED_SECRETS.append(r.json()["token"])


def test_account_token_cannot_reconfigure_its_account(proxy, provider, dovecot, pki, root):
    """An account token may hand in a new grant, but not move its mailbox or re-enable it."""
    acct = new_account(proxy, provider, dovecot, pki, root)
    r = api(
        proxy,
        "POST",
        "/v1/token",
        root,
        {"account": acct["account"], "scopes": ["api"], "description": "self"},
    )
    own = r.json()["token"]
    ISSUED_SECRETS.append(own)
    for body in (
        {"state": "ok"},
        {"imap": {"host": "evil.example.net"}},
        {"oauth2": {"tokenUrl": "https://evil.example.net/token", "clientId": "x"}},
        {"email": "someone-else@example.com"},
    ):
        r = api(proxy, "PUT", f"/v1/account/{acct['account']}", own, body)
        assert r.status_code == 403, (body, r.text)
    r = api(
        proxy,
        "PUT",
        f"/v1/account/{acct['account']}",
        own,
        {"oauth2": {"refreshToken": acct["refresh"]}},
    )
    assert r.status_code == 200, r.text
    r = api(
        proxy,
        "POST",
        "/v1/oauth2/authorize",
        own,
        {"app": "none", "account": acct["account"], "imap": {"host": "evil.example.net"}},
    )
    assert r.status_code == 403
