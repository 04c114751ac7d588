"""
The OAuth2 lifecycle through the real ``twistd imapproxy`` and the fake
provider: onboarding in a browser (authorization code + PKCE) and with the
device grant, one refresh for a burst of logins, rotated refresh tokens that
survive a restart, and secret-key rotation while the service runs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading

import pytest
import requests

from tests.conftest import CLIENT_ID, CLIENT_SECRET, ISSUED_SECRETS, register
from tests.imaputil import plain
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess, _script


@pytest.fixture(scope="module")
def root(proxy) -> str:
    token = proxy.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
    ISSUED_SECRETS.append(token)
    return token


@pytest.fixture(scope="module")
def app(proxy, provider, root) -> str:
    """An OAuth2 app at the fake provider, registered with the proxy over the API."""
    callback = f"{proxy.api_url}/oauth2/callback"
    provider.register_client(CLIENT_ID, CLIENT_SECRET, [callback])
    r = requests.post(
        f"{proxy.api_url}/v1/oauth2",
        headers={"Authorization": f"Bearer {root}"},
        json={
            "app": "fake",
            "provider": "generic",
            "clientId": CLIENT_ID,
            "clientSecret": CLIENT_SECRET,
            "redirectUrl": callback,
            "authorizationUrl": provider.authorize_url,
            "tokenUrl": provider.token_url,
            "deviceAuthorizationUrl": provider.device_url,
            "scopes": ["mail", "openid", "email"],
        },
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert CLIENT_SECRET not in r.text
    return "fake"


def _login_ok(proxy, account: str, token: str) -> None:
    c = plain(proxy.port)
    try:
        assert c.login(account, token)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
    finally:
        c.logout()


def _browser(
    proxy, provider, pki, root, account: str, username: str, imap=None
) -> requests.Response:
    """What the mailbox owner's browser does: open the URL, consent, follow back."""
    body = {"app": "fake", "account": account}
    if imap is not None:
        body["imap"] = imap
    r = requests.post(
        f"{proxy.api_url}/v1/oauth2/authorize",
        headers={"Authorization": f"Bearer {root}"},
        json=body,
        timeout=20,
    )
    assert r.status_code == 200, r.text
    url = r.json()["url"]
    assert "code_challenge=" in url and "code_challenge_method=S256" in url
    from urllib.parse import parse_qs, urlsplit

    ISSUED_SECRETS.append(parse_qs(urlsplit(url).query)["state"][0])
    provider.consent(username)
    consent = requests.get(url, allow_redirects=False, verify=pki.ca_cert, timeout=20)
    assert consent.status_code == 302
    back = consent.headers["Location"]
    assert back.startswith(f"{proxy.api_url}/oauth2/callback?")
    ISSUED_SECRETS.append(parse_qs(urlsplit(back).query)["code"][0])
    return requests.get(back, timeout=20)


def test_browser_onboarding_creates_a_working_account(proxy, provider, dovecot, pki, root, app):
    """Consent in a browser creates the account with the provider's address and a usable grant."""
    account = "web-" + secrets.token_hex(3)
    username = account + "@example.com"
    imap = {"host": "localhost", "port": dovecot.tls_port, "caFile": pki.ca_cert}
    page = _browser(proxy, provider, pki, root, account, username, imap)
    assert page.status_code == 200
    assert "Mailbox connected" in page.text and username in page.text
    shown = requests.get(
        f"{proxy.api_url}/v1/account/{account}",
        headers={"Authorization": f"Bearer {root}"},
        timeout=20,
    ).json()
    assert shown["email"] == username
    assert shown["oauth2"]["app"] == "fake" and shown["oauth2"]["refreshTokenSet"]
    assert shown["state"] == "ok"
    token = proxy.cli(
        "tokens", "issue", "--account", account, "--scope", "imap-proxy", "--description", "web"
    ).stdout.strip()
    ISSUED_SECRETS.append(token)
    _login_ok(proxy, account, token)

    # The same link cannot be used twice.
    again = requests.get(page.url, timeout=20)
    assert again.status_code == 400 and "already used" in again.text


def test_callback_refuses_forged_state_and_declined_consent(proxy, provider, pki, root, app):
    """A state not signed by the proxy, or a consent the owner declined, creates nothing."""
    forged = requests.get(
        f"{proxy.api_url}/oauth2/callback", params={"code": "x", "state": "abc.def"}, timeout=20
    )
    assert forged.status_code == 400 and "not valid" in forged.text
    account = "no-" + secrets.token_hex(3)
    r = requests.post(
        f"{proxy.api_url}/v1/oauth2/authorize",
        headers={"Authorization": f"Bearer {root}"},
        json={"app": "fake", "account": account, "imap": {"host": "localhost"}},
        timeout=20,
    )
    provider.consent(account + "@example.com", deny=True)
    consent = requests.get(r.json()["url"], allow_redirects=False, verify=pki.ca_cert, timeout=20)
    page = requests.get(consent.headers["Location"], timeout=20)
    assert page.status_code == 400 and "declined" in page.text
    missing = requests.get(
        f"{proxy.api_url}/v1/account/{account}",
        headers={"Authorization": f"Bearer {root}"},
        timeout=20,
    )
    assert missing.status_code == 404


def test_reauthorization_clears_reauth_required(proxy, provider, dovecot, pki, root, app):
    """After invalid_grant, consenting again through the callback makes the account usable."""
    account = "re-" + secrets.token_hex(3)
    username = account + "@example.com"
    imap = {"host": "localhost", "port": dovecot.tls_port, "caFile": pki.ca_cert}
    assert _browser(proxy, provider, pki, root, account, username, imap).status_code == 200
    token = proxy.cli(
        "tokens", "issue", "--account", account, "--scope", "imap-proxy", "--description", "re"
    ).stdout.strip()
    ISSUED_SECRETS.append(token)
    # The owner revokes the app at the provider: every grant of that user dies.
    for rt in _grants_of(proxy, account):
        provider.revoke_grant(rt, revoke_access=True)
    c = plain(proxy.port)
    with pytest.raises(Exception, match="re-authorization"):
        c.login(account, token)
    c.shutdown()
    state = json.loads(proxy.cli("accounts", "show", account).stdout)["state"]
    assert state == "reauth-required"
    assert _browser(proxy, provider, pki, root, account, username).status_code == 200
    assert json.loads(proxy.cli("accounts", "show", account).stdout)["state"] == "ok"
    _login_ok(proxy, account, token)


def _grants_of(proxy, account: str) -> list[str]:
    """The refresh token the proxy holds for an account, read as the proxy would."""
    from proxy.store import makeStore

    store = makeStore(proxy.store, None)
    store.openBlocking()
    try:
        row = (
            store._conn()
            .execute("SELECT refresh_token_enc FROM accounts WHERE id=?", (account,))
            .fetchone()
        )
        return [store.secrets.decrypt(row[0])]
    finally:
        store._closeBlocking()


def test_device_onboarding_from_the_admin_command(proxy, provider, dovecot, pki, app):
    """`accounts authorize --device` shows a code, waits for approval, and saves the account."""
    account = "dev-" + secrets.token_hex(3)
    username = account + "@example.com"
    provider.device_interval(1)
    cmd = [
        _script("imapproxy"),
        "accounts",
        "authorize",
        "--store",
        proxy.store,
        account,
        "--app",
        "fake",
        "--device",
        "--imap-host",
        "localhost",
        "--imap-port",
        str(dovecot.tls_port),
        "--imap-ca-file",
        pki.ca_cert,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=proxy.workdir,
        env=proxy.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "enter the code" in line, line + proc.stderr.read()
        code = line.rsplit(" ", 1)[-1].strip()
        assert code in provider.pending_device_codes()
        provider.approve_device(code, username)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    shown = json.loads(proxy.cli("accounts", "show", account).stdout)
    assert shown["email"] == username and shown["oauth2"]["app"] == "fake"
    token = proxy.cli(
        "tokens", "issue", "--account", account, "--scope", "imap-proxy", "--description", "device"
    ).stdout.strip()
    ISSUED_SECRETS.append(token)
    _login_ok(proxy, account, token)


def _burst(proxy, account: str, token: str, n: int) -> list[str]:
    results: list[str] = []
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        try:
            c = plain(proxy.port)
            results.append(c.login(account, token)[0])
            c.logout()
        except Exception as e:  # recorded, asserted below
            results.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_fifty_concurrent_logins_cause_one_refresh(proxy, provider, dovecot, pki):
    """50 logins at once for a new account, then 50 after the token went stale: one refresh each."""
    mb = register(proxy, provider, dovecot, pki)
    assert _burst(proxy, mb.account, mb.token, 50) == ["OK"] * 50
    assert provider.stats()["token_calls_by_username"][mb.email] == 1
    provider.expire_access(mb.email)
    assert _burst(proxy, mb.account, mb.token, 50) == ["OK"] * 50
    assert provider.stats()["token_calls_by_username"][mb.email] == 2


def test_rotated_refresh_token_survives_restart(pki, workdir, dovecot, provider):
    """A refresh token the provider rotated is stored, and used after the service restarts."""
    p = ProxyProcess(os.path.join(workdir, "proxy-rotate"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start()
    try:
        mb = register(p, provider, dovecot, pki, rotate=True)
        _login_ok(p, mb.account, mb.token)  # refresh: the provider rotates
        p.stop()
        p.start()
        provider.expire_access(mb.email)  # the saved access token is refused
        _login_ok(p, mb.account, mb.token)  # refreshes with the rotated token
        assert "needs re-authorization" not in p.log()
    finally:
        p.stop()


def test_key_rotation_while_running(proxy, provider, dovecot, pki, workdir):
    """add-key, rotate, retire with the service running: every account stays usable."""
    mb = register(proxy, provider, dovecot, pki)
    _login_ok(proxy, mb.account, mb.token)
    keyfile = os.path.join(os.path.dirname(proxy.store.removeprefix("sqlite://")), "secret.key")
    with open(keyfile) as f:
        old = [ln for ln in f.read().split() if not ln.startswith("#") and len(ln) == 44]
    proxy.cli("secrets", "add-key")
    proxy.cli("secrets", "rotate")
    proxy.cli("secrets", "retire")
    with open(keyfile) as f:
        now = [ln for ln in f.read().split() if not ln.startswith("#") and len(ln) == 44]
    assert len(now) == 1 and now[0] not in old
    assert "secret keys reloaded" in proxy.log()
    # Force the server to decrypt the refresh token again, under the new key.
    provider.expire_access(mb.email)
    _login_ok(proxy, mb.account, mb.token)
    # The old key alone no longer opens the store.
    from proxy.encryption import Secrets
    from proxy.store import SQLiteStore, StoreError

    with pytest.raises(StoreError):
        SQLiteStore(
            proxy.store.removeprefix("sqlite://"), Secrets([old[0].encode()])
        ).openBlocking()


def test_slow_token_endpoint_bounded_and_late_answer_kept(proxy, provider, dovecot, pki):
    """A token endpoint slower than the deadline gives UNAVAILABLE in time; its answer is kept."""
    import time

    from tests.conftest import OAUTH2_DEADLINE

    mb = register(proxy, provider, dovecot, pki)
    provider.delay(OAUTH2_DEADLINE + 1.5)
    try:
        started = time.monotonic()
        c = plain(proxy.port)
        with pytest.raises(Exception, match="UNAVAILABLE"):
            c.login(mb.account, mb.token)
        elapsed = time.monotonic() - started
        c.shutdown()
    finally:
        provider.delay(0)
    assert elapsed < OAUTH2_DEADLINE + 1.5
    # The slow answer arrives after the refusal; the proxy keeps it, so the
    # next login needs no new refresh (one call in all, none sent twice).
    wait_until(
        lambda: "new provider access token for " + mb.account in proxy.log(),
        30,
        "the late access token kept",
    )
    _login_ok(proxy, mb.account, mb.token)
    assert provider.stats()["token_calls_by_username"][mb.email] == 1


def test_leaving_an_app_needs_own_secret_and_grant(proxy, root, app):
    """Moving an account off a shared app cannot take the app's secret or grant along."""
    account = "leave-" + secrets.token_hex(3)
    headers = {"Authorization": f"Bearer {root}"}
    r = requests.post(
        f"{proxy.api_url}/v1/account",
        headers=headers,
        timeout=20,
        json={
            "account": account,
            "email": account + "@example.com",
            "imap": {"host": "localhost"},
            "oauth2": {"app": "fake", "refreshToken": "rt-x"},
        },
    )
    assert r.status_code == 200, r.text
    for oauth in (
        {"clientId": "evil", "tokenUrl": "https://evil.example/token"},
        {"app": None, "clientId": "evil", "tokenUrl": "https://evil.example/token"},
    ):
        r = requests.put(
            f"{proxy.api_url}/v1/account/{account}",
            headers=headers,
            json={"oauth2": oauth},
            timeout=20,
        )
        assert r.status_code == 400 and "required when leaving an app" in r.text, r.text
    r = requests.put(
        f"{proxy.api_url}/v1/account/{account}",
        headers=headers,
        timeout=20,
        json={
            "oauth2": {
                "app": None,
                "clientId": "own",
                "tokenUrl": "https://own.example/token",
                "clientSecret": "own-secret",
                "refreshToken": "rt-own",
            }
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["oauth2"]["app"] is None and r.json()["oauth2"]["clientId"] == "own"
