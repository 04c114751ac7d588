"""
Live sessions across two ``twistd imapproxy`` instances sharing one real
redis-server: a session held by B is listed by A's API (as B published it)
and ``DELETE`` on A ends it on B (over the session bus): B's client reads
the BYE, then EOF, and the session leaves A's list.
"""

from __future__ import annotations

from tests.conftest import register
from tests.test_integration_instances import _imap_token, _spliced, api, pair
from tests.upstream.osutil import wait_until

__all__ = ["pair"]  # the two instances on one Redis, for this module too


def test_listed_and_ended_across_instances(pair, provider, dovecot, pki):
    mailbox = register(pair.a, provider, dovecot, pki)
    token = _imap_token(pair.a, pair.root, mailbox.account)
    onB = _spliced(pair.b, mailbox.account, token)
    try:
        path = f"/v1/sessions?account={mailbox.account}"

        def listedOnA():
            return api(pair.a, "GET", path, pair.root).json()["sessions"]

        [session] = wait_until(listedOnA, what="B's session listed by A")
        [local] = api(pair.b, "GET", path, pair.root).json()["sessions"]
        assert session["id"] == local["id"] and session["instance"] == local["instance"]
        assert session["protocol"] == "imap" and session["address"] == "127.0.0.1"

        r = api(pair.a, "DELETE", f"/v1/session/{session['id']}", pair.root)
        assert r.status_code == 200 and r.json() == {"ended": True}
        assert onB.line() == b"* BYE Session ended by the operator"
        assert onB.closed()
        wait_until(lambda: listedOnA() == [], what="the ended session gone from A's list")
        r = api(pair.a, "DELETE", f"/v1/session/{session['id']}", pair.root)
        assert r.status_code == 404
    finally:
        onB.close()


def test_admin_command_lists_and_ends(pair, provider, dovecot, pki):
    """On a Redis store, ``imapproxy sessions list|end`` work from the published sessions."""
    import json

    mailbox = register(pair.a, provider, dovecot, pki)
    token = _imap_token(pair.a, pair.root, mailbox.account)
    onB = _spliced(pair.b, mailbox.account, token)
    try:

        def listed():
            out = pair.a.cli("sessions", "list", "--account", mailbox.account, "--json").stdout
            return json.loads(out)["sessions"]

        [session] = wait_until(listed, what="B's session listed by the admin command")
        assert session["account"] == mailbox.account and session["protocol"] == "imap"
        text = pair.a.cli("sessions", "list", "--account", mailbox.account).stdout
        assert text.startswith(session["id"] + "\timap\t" + mailbox.account + "\t")
        pair.a.cli("sessions", "end", session["id"])
        assert onB.line() == b"* BYE Session ended by the operator"
        assert onB.closed()
        wait_until(lambda: listed() == [], what="gone")
        gone = pair.a.cli("sessions", "end", session["id"], check=False)
        assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone.stderr
        assert "no such session" in gone.stderr
    finally:
        onB.close()
