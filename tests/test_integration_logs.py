"""
No secret in any log line: after traffic of its own (a plain and a rotating
grant, a good and a wrong login), every proxy log written so far in this
session is searched for every token, refresh token and client secret the
tests handed out, and for the shapes of XOAUTH2 and bearer strings. Run
alone it checks its own secrets; run after other tests, theirs too.

The same runs against a proxy started with ``--log-format json``: there,
every line of its log is also one JSON object, and the login, session-end
and change audit events are there with their documented fields.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import requests

from proxy.tokens import tokenId
from tests.conftest import CLIENT_SECRET, ISSUED_SECRETS, OAUTH2_DEADLINE, register
from tests.imaputil import plain
from tests.upstream.proxyproc import ProxyProcess

LOGIN_FIELDS = {"protocol", "result", "reason", "account", "token_id", "client", "duration"}
SESSION_END_FIELDS = {
    "protocol",
    "account",
    "token_id",
    "client",
    "bytes_up",
    "bytes_down",
    "duration",
    "closed_by",
}


@pytest.fixture(scope="module")
def json_proxy(pki, workdir, dovecot):
    """A second proxy, its own store, logging JSON lines to its twistd.log."""
    p = ProxyProcess(os.path.join(workdir, "proxy-json"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start("--log-format", "json", "--oauth2-deadline", str(OAUTH2_DEADLINE))
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(params=["text", "json"])
def logged(request):
    """The proxy under test: the suite's own (text log) or the JSON one."""
    name = "proxy" if request.param == "text" else "json_proxy"
    return request.param, request.getfixturevalue(name)


def events(proxy: ProxyProcess) -> list[dict]:
    """Every line of the proxy's log, each parsed as JSON (fails on any other line)."""
    return [json.loads(line) for line in proxy.full_log().splitlines()]


def test_no_secret_in_any_log(logged, provider, dovecot, pki, workdir):
    """Tokens, refresh tokens, client secrets and XOAUTH2 strings never reach the logs."""
    form, proxy = logged
    rotating = register(proxy, provider, dovecot, pki, rotate=True)
    steady = register(proxy, provider, dovecot, pki)
    for box in (rotating, steady):
        c = plain(proxy.port)
        c.login(box.account, box.token)
        c.logout()
    failing = plain(proxy.port)
    try:
        failing.login(rotating.account, "f" * 64)
    except Exception:
        pass
    failing.shutdown()
    if form == "json":
        # One change through the API, by a root token of the admin command.
        root = proxy.cli("tokens", "issue", "--scope", "api", "--description", "root")
        rootToken = root.stdout.strip()
        ISSUED_SECRETS.append(rootToken)
        r = requests.post(
            proxy.api_url + "/v1/token",
            headers={"Authorization": f"Bearer {rootToken}"},
            json={"account": steady.account, "scopes": ["imap-proxy"], "description": "api"},
            timeout=20,
        )
        assert r.status_code == 200, r.text
        ISSUED_SECRETS.append(r.json()["token"])
        proxy.wait_for_log('"event":"session-end"', count=2)
        _checkAuditEvents(proxy, rotating, steady, rootToken, r.json()["id"])

    logs = glob.glob(os.path.join(workdir, "**", "twistd.log"), recursive=True)
    assert logs, "no proxy log found"
    text = "\n".join(open(p, encoding="utf-8", errors="replace").read() for p in logs)
    assert "session " + rotating.account in text  # the log is the real one
    own = [CLIENT_SECRET, *(m.token for m in (rotating, steady))]
    own += [m.refresh_token for m in (rotating, steady)]
    assert set(own) <= set(ISSUED_SECRETS)
    leaked = [s[:6] + "…" for s in ISSUED_SECRETS if s in text]
    assert leaked == []
    for shape in ("auth=Bearer", "Bearer ", "dXNlcj0", "refresh_token=", "client_secret="):
        assert shape not in text, shape


def _checkAuditEvents(proxy, rotating, steady, rootToken: str, issuedId: str) -> None:
    """The JSON log: every line an object, and the audit events as documented."""
    lines = events(proxy)
    assert all({"time", "level", "namespace", "message"} <= set(e) for e in lines)
    assert "\x1e" not in proxy.full_log()
    logins = [e for e in lines if e.get("event") == "login"]
    for e in logins:
        assert LOGIN_FIELDS <= set(e), e
        assert e["protocol"] == "imap" and e["client"] == "127.0.0.1"
        assert isinstance(e["duration"], float) and e["duration"] >= 0
    ok = {e["account"]: e for e in logins if e["result"] == "ok"}
    assert ok[steady.account]["token_id"] == tokenId(steady.token)
    assert ok[rotating.account]["reason"] == "-"
    refused = [e for e in logins if e["result"] == "refused"]
    assert [(e["account"], e["reason"], e["token_id"]) for e in refused] == [
        (rotating.account, "unknown-token", "-")
    ]
    ends = [e for e in lines if e.get("event") == "session-end"]
    assert {e["account"] for e in ends} == {rotating.account, steady.account}
    for e in ends:
        assert SESSION_END_FIELDS <= set(e), e
        assert e["closed_by"] in ("client", "provider")
        assert e["bytes_up"] > 0 and e["bytes_down"] > 0
    changes = [e for e in lines if e.get("event") == "change"]
    assert {"operation": "token.issue", "target": issuedId, "actor": tokenId(rootToken)} in [
        {k: e[k] for k in ("operation", "target", "actor")} for e in changes
    ]
