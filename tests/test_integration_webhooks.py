"""
Webhooks from two ``twistd imapproxy`` instances sharing one real
redis-server, to a real HTTP receiver on loopback: when the fake provider
revokes a grant and logins through both instances find the account's grant
dead, the receiver gets exactly one signed ``account.reauth-required``
event; token revocations through either instance arrive once each, signed.

"No second event" is waited for on events, not on time: each instance
delivers its events in order, one receiver queue each, so once a later
event (a token revoked through that instance) has arrived, anything the
earlier logins made that instance send has arrived too.
"""

from __future__ import annotations

import os
import secrets

import attrs
import pytest
from cryptography.fernet import Fernet

from tests.conftest import ISSUED_SECRETS, OAUTH2_DEADLINE, register
from tests.test_integration_instances import _imap_token, _together, api
from tests.test_integration_metrics import scrape, value
from tests.upstream.certs import make_pki
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer
from tests.upstream.webhookreceiver import WebhookReceiver


@attrs.frozen
class HookedPair:
    a: ProxyProcess
    b: ProxyProcess
    receiver: WebhookReceiver
    root: str = attrs.field(repr=False)


@pytest.fixture(scope="module")
def hooked(pki, workdir, dovecot):
    secret = secrets.token_hex(24).encode()
    ISSUED_SECRETS.append(secret.decode())
    receiver = WebhookReceiver(secret).start()
    redis = RedisServer(persist=True)
    redis.start()
    keyfile = os.path.join(workdir, "webhooks-store.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    hookKey = os.path.join(workdir, "webhook.key")
    with open(hookKey, "wb") as f:
        f.write(secret + b"\n")
    os.chmod(hookKey, 0o600)
    procs: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            p = ProxyProcess(
                os.path.join(workdir, f"proxy-webhooks-{name}"),
                store=redis.url,
                secret_file=keyfile,
                env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
            )
            procs.append(p)
            p.start(
                "--plaintext-login",
                "allow",
                "--oauth2-deadline",
                str(OAUTH2_DEADLINE),
                "--webhook",
                receiver.url,
                "--webhook-secret-file",
                hookKey,
            )
        a, b = procs
        root = a.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
        ISSUED_SECRETS.append(root)
        yield HookedPair(a, b, receiver, root)
    finally:
        for p in procs:
            p.stop()
        redis.stop()
        receiver.stop()


def _revokeThrough(p: ProxyProcess, root: str, account: str) -> str:
    """Issue a token through ``p`` and revoke it there: a fence for ``p``'s queue."""
    body = {"account": account, "scopes": ["imap-proxy"], "description": "fence"}
    r = api(p, "POST", "/v1/token", root, body)
    assert r.status_code == 200, r.text
    ISSUED_SECRETS.append(r.json()["token"])
    tokenId = r.json()["id"]
    r = api(p, "DELETE", f"/v1/token/{tokenId}", root)
    assert r.status_code == 200, r.text
    return tokenId


def _counted(hooked: HookedPair, name: str, **labels: str) -> float:
    """A webhook series summed over both instances' /metrics."""
    return sum(value(scrape(p), name, **labels) or 0.0 for p in (hooked.a, hooked.b))


def test_revoked_grant_sends_one_signed_event(hooked, provider, dovecot, pki):
    events = "imapproxy_webhook_events_total"
    before = _counted(hooked, events, type="account.reauth-required")
    delivered = _counted(hooked, "imapproxy_webhook_deliveries_total", result="delivered")
    mb = register(hooked.a, provider, dovecot, pki)
    other = _imap_token(hooked.a, hooked.root, mb.account)
    provider.revoke_grant(mb.refresh_token, revoke_access=True)
    # Both instances find the grant dead, at the same moment.
    results = _together((hooked.a.port, mb.account, mb.token), (hooked.b.port, mb.account, other))
    assert all("re-authorization" in r for r in results), results
    # And once more through each, the account already marked.
    results = _together((hooked.b.port, mb.account, mb.token), (hooked.a.port, mb.account, other))
    assert all("re-authorization" in r for r in results), results

    fences = {_revokeThrough(p, hooked.root, mb.account) for p in (hooked.a, hooked.b)}

    def fenced(deliveries):
        seen = {d.event.get("tokenId") for d in deliveries if d.event["account"] == mb.account}
        return fences <= seen

    hooked.receiver.wait_for(fenced, what="both instances' fence events")
    mine = [d for d in hooked.receiver.deliveries if d.event["account"] == mb.account]
    states = [d for d in mine if d.event["type"].startswith("account.")]
    assert [d.event["type"] for d in states] == ["account.reauth-required"], mine
    [state] = states
    assert state.signed and state.status == 200
    event = state.event
    assert event["oldState"] == "ok" and event["newState"] == "reauth-required"
    assert event["reason"] == "invalid-grant"
    assert state.headers["x-imapproxy-event-id"] == event["id"]
    assert state.headers["x-imapproxy-event"] == "account.reauth-required"
    assert state.headers["content-type"] == "application/json"
    # Each revocation once, signed; no secret anywhere in what was sent.
    revoked = [d for d in mine if d.event["type"] == "token.revoked"]
    assert sorted(d.event["tokenId"] for d in revoked) == sorted(fences)
    assert all(d.signed for d in mine)
    # Counted once in the cluster; the deliveries (event, two fences) counted too.
    assert _counted(hooked, events, type="account.reauth-required") == before + 1
    # (an answer is counted once the proxy has read it: asked again until then)
    wait_until(
        lambda: (
            _counted(hooked, "imapproxy_webhook_deliveries_total", result="delivered")
            >= delivered + 3
        ),
        what="the deliveries counted",
    )
    for p in (hooked.a, hooked.b):
        log = p.full_log()
        assert hooked.receiver.secret.decode() not in log
        assert not [d for d in mine if d.headers["x-imapproxy-signature"][7:] in log]
    sent = b"".join(d.body for d in mine) + repr([d.headers for d in mine]).encode()
    for secret in (mb.token, mb.refresh_token, other, hooked.root, hooked.receiver.secret):
        assert (secret.encode() if isinstance(secret, str) else secret) not in sent


def test_deleted_account_revokes_its_tokens(hooked, provider, dovecot, pki):
    """Deleting an account through the API: one token.revoked event per token it had."""
    mb = register(hooked.a, provider, dovecot, pki)
    ids = {t["id"] for t in api(hooked.b, "GET", f"/v1/tokens?account={mb.account}", hooked.root)
           .json()["tokens"]}  # fmt: skip
    r = api(hooked.b, "DELETE", f"/v1/account/{mb.account}", hooked.root)
    assert r.status_code == 200, r.text

    def revoked(deliveries):
        return {
            d.event["tokenId"]
            for d in deliveries
            if d.event["type"] == "token.revoked" and d.event["account"] == mb.account
        } >= ids

    hooked.receiver.wait_for(revoked, what="the account's tokens revoked")
    events = hooked.receiver.events("token.revoked")
    mine = [e for e in events if e["account"] == mb.account]
    assert len(mine) == len(ids) and {e["reason"] for e in mine} == {"account-deleted"}


def test_https_receivers_certificate_checked(workdir, pki, provider, dovecot):
    """
    An https receiver whose certificate the system trusts (here the tests'
    CA, through ``SSL_CERT_FILE``) gets the event; one with a certificate
    from an unknown CA is refused at the handshake and gets nothing.
    """
    secret = secrets.token_hex(24).encode()
    stranger = make_pki(os.path.join(workdir, "pki-webhook-stranger"))
    trusted = WebhookReceiver(secret, tls=(pki.cert, pki.key)).start()
    untrusted = WebhookReceiver(secret, tls=(stranger.cert, stranger.key)).start()
    hookKey = os.path.join(workdir, "webhook-tls.key")
    with open(hookKey, "wb") as f:
        f.write(secret)
    p = ProxyProcess(
        os.path.join(workdir, "proxy-webhooks-tls"),
        env={"REQUESTS_CA_BUNDLE": pki.ca_cert, "SSL_CERT_FILE": pki.ca_cert},
    )
    try:
        p.start(
            "--webhook",
            trusted.url,
            "--webhook",
            untrusted.url,
            "--webhook-secret-file",
            hookKey,
        )
        root = p.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
        ISSUED_SECRETS.append(root)
        mb = register(p, provider, dovecot, pki)
        tokenId = _revokeThrough(p, root, mb.account)
        [got] = trusted.wait_for(lambda ds: ds, what="the event over https")
        assert got.signed and got.event["tokenId"] == tokenId
        assert untrusted.wait_for_failure()  # the proxy gave up at the handshake
        assert untrusted.deliveries == []
    finally:
        p.stop()
        trusted.stop()
        untrusted.stop()


def test_admin_command_sends_what_its_config_names(hooked, provider, dovecot, pki, workdir):
    """
    ``imapproxy tokens revoke --config FILE`` with the server's webhook
    settings sends the event itself (signed, once) before it exits; a config
    that names a webhook without a key is refused in one line.
    """
    mb = register(hooked.a, provider, dovecot, pki)
    body = {"account": mb.account, "scopes": ["imap-proxy"], "description": "cli"}
    r = api(hooked.a, "POST", "/v1/token", hooked.root, body)
    ISSUED_SECRETS.append(r.json()["token"])
    tokenId = r.json()["id"]
    config = os.path.join(workdir, "webhooks-cli.conf")
    hookKey = os.path.join(workdir, "webhook.key")
    with open(config, "w") as f:
        f.write(f"[imapproxy]\nwebhook = {hooked.receiver.url}\nwebhook-secret-file = {hookKey}\n")
    hooked.a.cli("tokens", "revoke", tokenId, "--config", config)
    # The command waited for the delivery: it is there when the command is done.
    [got] = [d for d in hooked.receiver.deliveries if d.event.get("tokenId") == tokenId]
    assert got.signed and got.event["actor"] == "cli" and got.event["reason"] == "revoked"

    with open(config, "w") as f:
        f.write(f"[imapproxy]\nwebhook = {hooked.receiver.url}\n")
    refused = hooked.a.cli("tokens", "list", "--config", config, check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        "imapproxy: --webhook needs --webhook-secret-file (the key that signs each event)\n"
    )
