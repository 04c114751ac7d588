"""
The real admin command (``imapproxy``, its own process) writes its change
events to the audit log file named by ``IMAPPROXY_AUDIT_LOG`` or
``--audit-log``: one JSON line each, naming the acting user and never a
token; an audit log it cannot open stops it before it changes anything.
"""

from __future__ import annotations

import getpass
import json
import os

from tests.upstream.proxyproc import ProxyProcess


def lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_admin_command_changes_reach_the_audit_log(workdir):
    home = os.path.join(workdir, "admin-audit")
    path = os.path.join(home, "audit.jsonl")
    admin = ProxyProcess(home, env={"IMAPPROXY_AUDIT_LOG": path})
    token = admin.cli("tokens", "issue", "--scope", "api", "--description", "ops").stdout.strip()
    listed = admin.cli("tokens", "list").stdout
    other = os.path.join(home, "other.jsonl")
    tid = listed.split("\t", 1)[0]
    admin.cli("tokens", "revoke", "--audit-log", other, tid)
    [issued] = lines(path)
    assert {k: issued[k] for k in ("event", "operation", "actor", "user")} == {
        "event": "change",
        "operation": "token.issue",
        "actor": "cli",
        "user": getpass.getuser(),
    }
    assert len(issued["target"]) == 64 and issued["target"] != token
    [revoked] = lines(other)
    assert (revoked["operation"], revoked["target"]) == ("token.revoke", issued["target"])
    for name in (path, other):
        with open(name, encoding="utf-8") as f:
            assert token not in f.read()


def test_unwritable_audit_log_stops_the_command(workdir):
    home = os.path.join(workdir, "admin-audit-bad")
    bad = os.path.join(home, "no-such-dir", "audit.jsonl")
    admin = ProxyProcess(home, env={"IMAPPROXY_AUDIT_LOG": bad})
    result = admin.cli("tokens", "issue", "--scope", "api", "--description", "x", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"imapproxy: cannot open the audit log {bad}: No such file or directory"
    )
    # Stopped before it opened (here: would have created) the store.
    assert not os.path.exists(os.path.join(home, "state", "imapproxy.sqlite3"))
