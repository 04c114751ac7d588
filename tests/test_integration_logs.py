"""
No secret in any log line: after traffic of its own (a plain and a rotating
grant, a good and a wrong login), every proxy log written so far in this
session is searched for every token, refresh token and client secret the
tests handed out, and for the shapes of XOAUTH2 and bearer strings. Run
alone it checks its own secrets; run after other tests, theirs too.
"""

from __future__ import annotations

import glob
import os

from tests.conftest import CLIENT_SECRET, ISSUED_SECRETS, register
from tests.imaputil import plain


def test_no_secret_in_any_log(proxy, provider, dovecot, pki, workdir):
    """Tokens, refresh tokens, client secrets and XOAUTH2 strings never reach the logs."""
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
