"""End-to-end checks of the test upstream: PKI, fake OAuth2 provider, Dovecot."""

from __future__ import annotations

import imaplib
import ssl
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.upstream import PKI, Dovecot, Provider, make_pki

CLIENT_ID = "app-client"
CLIENT_SECRET = "app-secret"


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
