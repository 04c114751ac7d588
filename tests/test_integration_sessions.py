"""
Live sessions through the real ``twistd imapproxy``: a session logged in
over IMAP (real Dovecot behind) is listed by ``GET /v1/sessions`` with its
fields, ``DELETE /v1/session/{id}`` ends it (the client reads the BYE, then
EOF), and an account token neither sees nor ends another account's session.
"""

from __future__ import annotations

import hashlib

from tests.test_integration_api import _login_raw, api, imap_token, new_account, root
from tests.upstream.osutil import wait_until

__all__ = ["root"]  # the module's root API token fixture, shared


def _token(proxy, root: str, account: str) -> str:
    r = api(
        proxy,
        "POST",
        "/v1/token",
        root,
        {"account": account, "scopes": ["api"], "description": "sessions test"},
    )
    assert r.status_code == 200, r.text
    from tests.conftest import ISSUED_SECRETS

    ISSUED_SECRETS.append(r.json()["token"])
    return str(r.json()["token"])


def test_list_and_end(proxy, provider, dovecot, pki, root):
    """A live IMAP session is listed with its fields, and DELETE ends it with a BYE."""
    mine = new_account(proxy, provider, dovecot, pki, root)
    other = new_account(proxy, provider, dovecot, pki, root)
    token = imap_token(proxy, root, mine["account"])
    live = _login_raw(proxy, mine["account"], token)
    others = _login_raw(proxy, other["account"], imap_token(proxy, root, other["account"]))
    try:
        r = api(proxy, "GET", f"/v1/sessions?account={mine['account']}", root)
        assert r.status_code == 200, r.text
        [session] = r.json()["sessions"]
        assert session["protocol"] == "imap"
        assert session["account"] == mine["account"]
        assert session["tokenId"] == hashlib.sha256(token.encode()).hexdigest()
        assert session["address"] == "127.0.0.1"
        assert session["upstream"].endswith(f":{dovecot.tls_port}")
        assert session["bytesToProvider"] > 0 and session["bytesToClient"] > 0
        assert session["started"].endswith("Z") and session["lastActivity"].endswith("Z")
        assert token not in r.text and session["id"] not in token

        # An account token sees its own account's sessions only, and cannot end another's.
        own = _token(proxy, root, other["account"])
        r = api(proxy, "GET", "/v1/sessions", own)
        assert [s["account"] for s in r.json()["sessions"]] == [other["account"]]
        assert api(proxy, "GET", f"/v1/sessions?account={mine['account']}", own).status_code == 403
        assert api(proxy, "DELETE", f"/v1/session/{session['id']}", own).status_code == 404

        r = api(proxy, "DELETE", f"/v1/session/{session['id']}", root)
        assert r.status_code == 200 and r.json() == {"ended": True}
        assert live.line() == b"* BYE Session ended by the operator"
        assert live.closed()
        gone = f"/v1/sessions?account={mine['account']}"
        wait_until(lambda: api(proxy, "GET", gone, root).json()["sessions"] == [], what="gone")
        assert api(proxy, "DELETE", f"/v1/session/{session['id']}", root).status_code == 404
        # The other account's session runs on.
        others.send(b"z NOOP\r\n")
        assert others.until(b"z")[-1].startswith(b"z OK")
    finally:
        live.close()
        others.close()
