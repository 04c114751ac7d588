"""End-to-end checks of the test upstream: PKI, fake OAuth2 provider, Dovecot."""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import json
import secrets
import ssl
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests_oauthlib import OAuth2Session
from twisted.internet import task

from tests.upstream import PKI, Dovecot, Provider, ProviderError, make_pki
from tests.upstream.osutil import wait_until
from tests.upstream.provider import (
    DEVICE_CODE_GRANT,
    INTROSPECTION_CLIENT_ID,
    INTROSPECTION_CLIENT_SECRET,
    OAuthError,
    ProviderState,
    s256,
)
from tests.upstream.redisserver import RedisServer

CLIENT_ID = "app-client"
CLIENT_SECRET = "app-secret"
# Registered, never fetched: the tests follow the redirect by hand.
REDIRECT_URI = "https://127.0.0.1:9/oauth2/callback"
SCOPE = "https://mail.google.com/ openid email"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def provider(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    p = Provider(pki, str(tmp_path_factory.mktemp("provider")))
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def dovecot(pki: PKI, provider: Provider) -> Iterator[Dovecot]:
    d = Dovecot(pki, provider.introspection_url)
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture
def http(pki: PKI) -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # no proxies from the environment for 127.0.0.1
    s.verify = pki.ca_cert
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def _clean_provider_faults(provider: Provider) -> Iterator[None]:
    yield
    provider.fail(503, 0)
    provider.delay(0)
    provider.device_interval(1)


@pytest.fixture
def app_client(provider: Provider) -> str:
    """The test app, registered with :data:`REDIRECT_URI`; its client id."""
    provider.register_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])
    return CLIENT_ID


def fresh_user() -> tuple[str, str]:
    """A unique (username, refresh token) pair, so tests do not interfere."""
    tag = uuid.uuid4().hex[:12]
    return f"u{tag}@example.com", f"rt-{tag}"


def refresh(
    http: requests.Session, provider: Provider, refresh_token: str, **kw: object
) -> requests.Response:
    data = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    return http.post(provider.token_url, data=data, timeout=10, **kw)


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def authorize(
    http: requests.Session, provider: Provider, challenge: str | None, **params: str
) -> requests.Response:
    """One authorization request, answered without following the redirect."""
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPE,
        "state": "st-" + uuid.uuid4().hex,
    }
    if challenge is not None:
        query.update(code_challenge=challenge, code_challenge_method="S256")
    query.update(params)
    return http.get(provider.authorize_url, params=query, allow_redirects=False, timeout=10)


def redirect_params(r: requests.Response) -> dict[str, str]:
    """The query of an answer's redirect back to :data:`REDIRECT_URI`."""
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.split("?")[0] == REDIRECT_URI
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def exchange(
    http: requests.Session, provider: Provider, code: str, verifier: str | None, **fields: str
) -> requests.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    if verifier is not None:
        data["code_verifier"] = verifier
    data.update(fields)
    return http.post(provider.token_url, data=data, timeout=10)


def poll_device(http: requests.Session, provider: Provider, device_code: str) -> requests.Response:
    data = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": CLIENT_ID}
    return http.post(provider.token_url, data=data, timeout=10)


def id_token_claims(id_token: str, key: str) -> dict[str, Any]:
    """The payload of an HS256 JWT after checking its signature with *key*."""

    def b64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header, payload, signature = id_token.split(".")
    assert json.loads(b64(header)) == {"alg": "HS256", "typ": "JWT"}
    mac = hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    assert hmac.compare_digest(mac.digest(), b64(signature))
    return json.loads(b64(payload))


def assert_refresh_works(
    http: requests.Session, provider: Provider, refresh_token: str, user: str
) -> None:
    """*refresh_token* yields an access token that introspects active for *user*."""
    r = refresh(http, provider, refresh_token)
    assert r.status_code == 200, r.text
    r = http.post(
        provider.introspection_url,
        data={"token": r.json()["access_token"]},
        auth=(INTROSPECTION_CLIENT_ID, INTROSPECTION_CLIENT_SECRET),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["active"] is True
    assert (r.json()["username"], r.json()["client_id"]) == (user, CLIENT_ID)


def imap_login(dovecot: Dovecot, pki: PKI, user: str, token: str) -> imaplib.IMAP4_SSL:
    ctx = ssl.create_default_context(cafile=pki.ca_cert)
    imap = imaplib.IMAP4_SSL(dovecot.host, dovecot.tls_port, ssl_context=ctx, timeout=10)
    sent = []

    def xoauth2(challenge: bytes) -> bytes:
        # First the XOAUTH2 string; to an error challenge, the empty reply.
        if sent:
            return b""
        sent.append(True)
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()

    try:
        imap.authenticate("XOAUTH2", xoauth2)
    except BaseException:
        close_quietly(imap)
        raise
    return imap


def close_quietly(imap: imaplib.IMAP4) -> None:
    """Log out if the connection still works; always release the socket."""
    try:
        if imap.state != "LOGOUT":
            imap.logout()
    except (imaplib.IMAP4.error, OSError):
        pass
    try:
        imap.shutdown()
    except OSError:
        pass


def test_pki_files_have_expected_modes(pki: PKI) -> None:
    """Certificates are world-readable PEM files and the key is private."""
    import os
    import stat

    assert stat.S_IMODE(os.stat(pki.ca_cert).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(pki.cert).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(pki.key).st_mode) == 0o600


def test_refresh_token_grant(provider: Provider, http: requests.Session) -> None:
    """A registered refresh token yields a bearer access token without rotation."""
    user, rt = fresh_user()
    provider.add_grant(rt, user, expires_in=1234)
    r = refresh(http, provider, rt)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 1234
    assert body["access_token"]
    assert "refresh_token" not in body
    assert provider.stats()["token_calls_by_username"][user] == 1


def test_basic_client_auth(provider: Provider, http: requests.Session) -> None:
    """Client credentials are also accepted with HTTP Basic."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    r = http.post(
        provider.token_url,
        data={"grant_type": "refresh_token", "refresh_token": rt},
        auth=(CLIENT_ID, CLIENT_SECRET),
        timeout=10,
    )
    assert r.status_code == 200, r.text


def test_token_endpoint_errors(provider: Provider, http: requests.Session) -> None:
    """Wrong secrets get 401 invalid_client; unknown/revoked tokens invalid_grant."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    r = http.post(
        provider.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": rt,
            "client_id": CLIENT_ID,
            "client_secret": "wrong",
        },
        timeout=10,
    )
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
    r = refresh(http, provider, "no-such-token")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert r.json()["error_description"]
    assert provider.revoke_grant(rt)
    r = refresh(http, provider, rt)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")


def test_imap_login_select_and_seed(
    provider: Provider, dovecot: Dovecot, pki: PKI, http: requests.Session
) -> None:
    """XOAUTH2 over IMAPS works with a fresh token and seeded mail is visible."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    token = refresh(http, provider, rt).json()["access_token"]
    imap = imap_login(dovecot, pki, user, token)
    try:
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"0"])
        dovecot.seed(user, b"From: a@example.com\r\nSubject: seeded\r\n\r\nhello\r\n")
        typ, data = imap.select("INBOX")  # re-SELECT picks up the new message
        assert (typ, data) == ("OK", [b"1"])
        typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        assert b"Subject: seeded" in data[0][1]
    finally:
        close_quietly(imap)


def test_expired_access_token_is_refused(
    provider: Provider, dovecot: Dovecot, pki: PKI, http: requests.Session
) -> None:
    """After expire_access, logging in with the old token fails; a new one works."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    token = refresh(http, provider, rt).json()["access_token"]
    imap_login(dovecot, pki, user, token).logout()
    assert provider.expire_access(user) == 1
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_login(dovecot, pki, user, token)
    new_token = refresh(http, provider, rt).json()["access_token"]
    imap_login(dovecot, pki, user, new_token).logout()


def test_injected_failure(provider: Provider, http: requests.Session) -> None:
    """fail(503, 1) makes exactly the next token call answer 503."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    provider.fail(503, 1)
    assert refresh(http, provider, rt).status_code == 503
    assert refresh(http, provider, rt).status_code == 200


def test_injected_delay(provider: Provider, http: requests.Session) -> None:
    """delay() holds token answers back long enough for a client to time out."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    provider.delay(5)
    with pytest.raises(requests.Timeout):
        http.post(
            provider.token_url,
            data={
                "grant_type": "refresh_token",
                "refresh_token": rt,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
            timeout=(5, 0.3),
        )
    provider.delay(0)
    assert refresh(http, provider, rt).status_code == 200


def test_rotation(provider: Provider, http: requests.Session) -> None:
    """A rotating grant returns a new refresh token and retires the old one."""
    user, rt = fresh_user()
    provider.add_grant(rt, user, rotate=True)
    body = refresh(http, provider, rt).json()
    new_rt = body["refresh_token"]
    assert new_rt != rt
    assert refresh(http, provider, rt).json()["error"] == "invalid_grant"
    assert refresh(http, provider, new_rt).status_code == 200


def test_stats_count_introspection(
    provider: Provider, dovecot: Dovecot, pki: PKI, http: requests.Session
) -> None:
    """Stats count token calls per user and Dovecot's introspection calls."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    provider.reset_stats()
    token = refresh(http, provider, rt).json()["access_token"]
    imap_login(dovecot, pki, user, token).logout()
    stats = provider.stats()
    assert stats["token_calls"] == 1
    assert stats["token_calls_by_username"] == {user: 1}
    assert stats["introspect_calls"] == 1


def test_kick_disconnects(
    provider: Provider, dovecot: Dovecot, pki: PKI, http: requests.Session
) -> None:
    """kick() ends the user's session with a BYE."""
    user, rt = fresh_user()
    provider.add_grant(rt, user)
    token = refresh(http, provider, rt).json()["access_token"]
    imap = imap_login(dovecot, pki, user, token)
    try:
        imap.select("INBOX")
        dovecot.kick(user)
        # Blocks (bounded by the socket timeout) until the server speaks.
        assert imap.readline().startswith(b"* BYE")
        with pytest.raises(imaplib.IMAP4.abort):
            imap.noop()
    finally:
        close_quietly(imap)


def test_code_flow_with_pkce(provider: Provider, app_client: str, http: requests.Session) -> None:
    """The code flow with PKCE yields a working refresh token and an email id_token."""
    user, _ = fresh_user()
    provider.consent(user)
    provider.reset_stats()
    verifier, challenge = pkce_pair()
    r = authorize(http, provider, challenge, state="xyz/+=", nonce="n-0S6")
    params = redirect_params(r)
    assert params["state"] == "xyz/+="
    r = exchange(http, provider, params["code"], verifier)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == SCOPE
    assert body["expires_in"] > 0
    assert body["access_token"] and body["refresh_token"]
    claims = id_token_claims(body["id_token"], CLIENT_SECRET)
    assert claims["iss"] == provider.issuer
    assert claims["aud"] == CLIENT_ID
    assert claims["email"] == claims["preferred_username"] == user
    assert claims["email_verified"] is True
    assert claims["nonce"] == "n-0S6"
    assert claims["sub"] and claims["iat"] < claims["exp"]
    assert_refresh_works(http, provider, body["refresh_token"], user)
    stats = provider.stats()
    assert (stats["authorize_calls"], stats["code_exchanges"]) == (1, 1)
    assert stats["token_calls_by_username"] == {user: 2}


def test_code_exchange_refusals(
    provider: Provider, app_client: str, http: requests.Session
) -> None:
    """A wrong or missing verifier, a reused code and a wrong redirect_uri get invalid_grant."""
    user, _ = fresh_user()
    provider.consent(user)

    def new_code() -> tuple[str, str]:
        verifier, challenge = pkce_pair()
        return redirect_params(authorize(http, provider, challenge))["code"], verifier

    code, verifier = new_code()
    r = exchange(http, provider, code, pkce_pair()[0])
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    # The failed attempt spent the code.
    assert exchange(http, provider, code, verifier).json()["error"] == "invalid_grant"

    code, _ = new_code()
    assert exchange(http, provider, code, None).json()["error"] == "invalid_grant"

    code, verifier = new_code()
    assert exchange(http, provider, code, verifier).status_code == 200
    r = exchange(http, provider, code, verifier)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")

    code, verifier = new_code()
    r = exchange(http, provider, code, verifier, redirect_uri=REDIRECT_URI + "/other")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")

    code, verifier = new_code()
    r = exchange(http, provider, code, verifier, client_secret="wrong")
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")


def test_authorize_refuses_without_redirecting(
    provider: Provider, app_client: str, http: requests.Session
) -> None:
    """An unknown client or unregistered redirect_uri gets a 400 page, not a redirect."""
    provider.consent(fresh_user()[0])
    _, challenge = pkce_pair()
    for params in (
        {"client_id": "no-such-client"},
        {"redirect_uri": REDIRECT_URI + "/other"},
        {"redirect_uri": "https://evil.example/cb"},
    ):
        r = authorize(http, provider, challenge, **params)
        assert r.status_code == 400, params
        assert "location" not in r.headers
        assert r.headers["content-type"].startswith("text/html")


def test_denied_consent_and_bad_requests_redirect_with_errors(
    provider: Provider, app_client: str, http: requests.Session
) -> None:
    """Declined consent, a plain challenge and a wrong response_type come back as errors."""
    user, _ = fresh_user()
    verifier, challenge = pkce_pair()
    provider.consent(user, deny=True)
    params = redirect_params(authorize(http, provider, challenge, state="s1"))
    assert params == {"error": "access_denied", "state": "s1"}

    provider.consent(user)
    params = redirect_params(authorize(http, provider, verifier, code_challenge_method="plain"))
    assert params["error"] == "invalid_request"
    params = redirect_params(authorize(http, provider, challenge, response_type="token"))
    assert params["error"] == "unsupported_response_type"


def test_code_flow_without_pkce(
    provider: Provider, app_client: str, http: requests.Session
) -> None:
    """PKCE is optional, but a verifier for a code without challenge is refused."""
    user, _ = fresh_user()
    provider.consent(user)
    code = redirect_params(authorize(http, provider, None))["code"]
    r = exchange(http, provider, code, None)
    assert r.status_code == 200, r.text
    assert id_token_claims(r.json()["id_token"], CLIENT_SECRET)["email"] == user
    code = redirect_params(authorize(http, provider, None))["code"]
    assert exchange(http, provider, code, pkce_pair()[0]).json()["error"] == "invalid_grant"


def test_requests_oauthlib_code_flow(
    provider: Provider, app_client: str, pki: PKI, http: requests.Session
) -> None:
    """requests-oauthlib runs the PKCE code flow and a refresh against the provider."""
    user, _ = fresh_user()
    provider.consent(user)
    with OAuth2Session(
        CLIENT_ID, redirect_uri=REDIRECT_URI, scope=SCOPE.split(), pkce="S256"
    ) as session:
        session.trust_env = False
        url, state = session.authorization_url(provider.authorize_url)
        r = http.get(url, allow_redirects=False, timeout=10)
        assert r.status_code == 302, r.text
        token = session.fetch_token(
            provider.token_url,
            authorization_response=r.headers["location"],
            client_secret=CLIENT_SECRET,
            verify=pki.ca_cert,
            timeout=10,
        )
        assert id_token_claims(token["id_token"], CLIENT_SECRET)["email"] == user
        refreshed = session.refresh_token(
            provider.token_url,
            auth=(CLIENT_ID, CLIENT_SECRET),
            verify=pki.ca_cert,
            timeout=10,
        )
    assert refreshed["access_token"] != token["access_token"]
    assert refreshed["refresh_token"] == token["refresh_token"]
    assert_refresh_works(http, provider, token["refresh_token"], user)


def test_device_flow(provider: Provider, app_client: str, http: requests.Session) -> None:
    """A device code is pending, then slow_down if polled fast, then granted once approved."""
    user, _ = fresh_user()
    provider.device_interval(60)
    provider.reset_stats()
    r = http.post(provider.device_url, data={"client_id": CLIENT_ID, "scope": SCOPE}, timeout=10)
    assert r.status_code == 200, r.text
    start = r.json()
    assert start["verification_uri"] == provider.issuer + "/verify"
    assert (start["expires_in"], start["interval"]) == (600, 60)
    assert start["user_code"] in provider.pending_device_codes()

    r = poll_device(http, provider, start["device_code"])
    assert (r.status_code, r.json()["error"]) == (400, "authorization_pending")
    r = poll_device(http, provider, start["device_code"])
    assert (r.status_code, r.json()["error"]) == (400, "slow_down")

    provider.approve_device(start["user_code"], user)
    assert start["user_code"] not in provider.pending_device_codes()
    assert poll_device(http, provider, start["device_code"]).json()["error"] == "slow_down"
    provider.device_interval(0)
    r = poll_device(http, provider, start["device_code"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["scope"] == SCOPE
    assert id_token_claims(body["id_token"], CLIENT_SECRET)["email"] == user
    r = poll_device(http, provider, start["device_code"])
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert_refresh_works(http, provider, body["refresh_token"], user)
    stats = provider.stats()
    assert (stats["device_authorizations"], stats["device_polls"]) == (1, 5)


def test_device_flow_denied(provider: Provider, app_client: str, http: requests.Session) -> None:
    """A declined device code answers access_denied; unknown user codes are refused."""
    r = http.post(
        provider.device_url,
        data={"client_id": CLIENT_ID, "scope": SCOPE},
        auth=(CLIENT_ID, CLIENT_SECRET),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    start = r.json()
    provider.deny_device(start["user_code"].lower().replace("-", ""))
    r = poll_device(http, provider, start["device_code"])
    assert (r.status_code, r.json()["error"]) == (400, "access_denied")
    with pytest.raises(ProviderError, match="404"):
        provider.approve_device(start["user_code"], "someone@example.com")
    r = http.post(
        provider.device_url, data={"client_id": CLIENT_ID, "client_secret": "x"}, timeout=10
    )
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")


def test_codes_expire_on_the_injected_clock() -> None:
    """Codes die after 60s, device codes after 600s; slow_down follows the clock."""
    clock = task.Clock()
    state = ProviderState(clock)
    client = state.register_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])
    state.set_consent("clock@example.com")
    form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    def token_error(**fields: str) -> str:
        with pytest.raises(OAuthError) as info:
            state.token({**form, **fields}, None)
        return info.value.error

    location = state.authorize(
        {
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "scope": SCOPE,
        }
    )
    code = parse_qs(urlsplit(location).query)["code"][0]
    clock.advance(60)
    grant = {"grant_type": "authorization_code", "redirect_uri": REDIRECT_URI}
    assert token_error(code=code, **grant) == "invalid_grant"

    state.device_interval = 5
    device = state.device_authorization({"client_id": client.client_id, "scope": SCOPE}, None)
    poll = {"grant_type": DEVICE_CODE_GRANT, "device_code": device["device_code"]}
    assert token_error(**poll) == "authorization_pending"
    clock.advance(4)
    assert token_error(**poll) == "slow_down"
    clock.advance(5)
    assert token_error(**poll) == "authorization_pending"
    clock.advance(600)
    assert token_error(**poll) == "expired_token"
    assert state.pending_user_codes() == []


def test_redis_restart_waits_for_loading() -> None:
    """A restarted redis-server is ready only once it has loaded its data (no LOADING)."""
    with RedisServer(persist=True, load_delay_us=2000) as redis:
        keys = [f"k{i}" for i in range(400)]
        redis.command("MSET", *(part for k in keys for part in (k, "v")))
        # Compact the log into an RDB base file, which is what key-load-delay slows.
        redis.command("BGREWRITEAOF")
        wait_until(lambda: _rewritten(redis.command("INFO", "persistence")), 30, "the AOF rewrite")
        redis.stop()
        redis.start()
        assert redis.command("DBSIZE") == len(keys)


def _rewritten(info: str) -> bool:
    return "aof_rewrite_in_progress:0" in info and "aof_rewrite_scheduled:0" in info
