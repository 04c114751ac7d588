"""
Mail clients nobody here wrote, through the proxy: mbsync (isync) syncs a
mailbox over TLS, and the result matches a direct XOAUTH2 session with the
same Dovecot.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess

from tests.imaputil import direct, message, provider_access_token

MBSYNC = shutil.which("mbsync")


def _maildir_messages(root: str) -> dict[str, bytes]:
    """Message-ID -> raw bytes of every message under a Maildir tree."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) not in ("cur", "new"):
            continue
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                # mbsync adds one header of its own, X-TUID, to track
                # messages it copied; everything else is the server's.
                raw = re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", f.read(), count=1)
            found[email.message_from_bytes(raw)["Message-ID"]] = raw
    return found


def test_mbsync_syncs_same_mail_as_direct(proxy, mailbox, dovecot, provider, pki, tmp_path):
    """mbsync pulls every folder and message through the proxy, identical to the server's."""
    assert MBSYNC is not None, "mbsync (isync) is missing: tests/run installs it"
    msgs = [message(2000 + 4000 * i, f"mbsync {i}") for i in range(6)]
    for m in msgs[:4]:
        dovecot.seed(mailbox.email, m)
    dovecot.doveadm("mailbox", "create", "-u", mailbox.email, "Archive")
    for m in msgs[4:]:
        dovecot.seed(mailbox.email, m, mailbox="Archive")

    local = tmp_path / "mail"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"""IMAPAccount proxy
Host localhost
Port {proxy.ports["ssl"]}
User {mailbox.account}
PassCmd "cat {tmp_path / "pass"}"
SSLType IMAPS
CertificateFile {pki.ca_cert}
AuthMechs LOGIN

IMAPStore remote
Account proxy

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel all
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
SyncState *
"""
    )
    (tmp_path / "pass").write_text(mailbox.token)
    result = subprocess.run(
        [MBSYNC, "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    synced = _maildir_messages(str(local))

    token = provider_access_token(provider, mailbox.refresh_token, pki.ca_cert)
    d = direct(dovecot, mailbox.email, token)
    expected = {}
    for folder in ("INBOX", "Archive"):
        d.select(folder, readonly=True)
        typ, data = d.fetch("1:*", "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                # mbsync stores Maildir files with LF line ends (its
                # local convention); the server holds CRLF.
                raw = item[1].replace(b"\r\n", b"\n")
                expected[email.message_from_bytes(raw)["Message-ID"]] = raw
    d.logout()

    assert len(expected) == 6
    assert synced == expected
    assert sorted(os.listdir(local)) == ["Archive", "INBOX"]
