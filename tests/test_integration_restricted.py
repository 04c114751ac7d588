"""
Restricted tokens end to end: the real ``twistd imapproxy``, the real Dovecot,
``doveadm`` as the witness of what the provider holds. A read-only token's
sessions change nothing whatever form a write takes (literal, non-synchronizing
literal, UID, pipelined behind an allowed command, hidden in a literal); a
mailbox-restricted token's sessions can neither see nor touch what lies outside
its patterns (wildcards, RETURN (STATUS), modified UTF-7, names that contain a
pattern); real clients (imaplib, IMAPClient, mbsync) work and see only what
they may; allowed traffic is relayed byte for byte.
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import requests
from imapclient import IMAPClient
from prometheus_client.parser import text_string_to_metric_families

from proxy.tokens import tokenId
from tests.conftest import ISSUED_SECRETS, OAUTH2_DEADLINE, Mailbox, register
from tests.imaputil import Raw, client_context, direct, message, plain, provider_access_token
from tests.upstream.proxyproc import ProxyProcess

MBSYNC = shutil.which("mbsync")
# The folders every test mailbox gets (Dovecot's Maildir++ separator is
# ".": checked by ``separator``). "Zürich" is Z&APw-rich on the wire.
FOLDERS = ["Work", "Work.Sub", "Homework", "Work2", "Secret", "Zürich", "Archive", "Archive.2024"]


@pytest.fixture(scope="module")
def proxy(pki, workdir, dovecot) -> Iterator[ProxyProcess]:
    """This module's proxy (its own store), logging JSON so that audit events show."""
    p = ProxyProcess(
        os.path.join(workdir, "proxy-restricted"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    p.start(
        "--port",
        f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
        "--log-format",
        "json",
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
    )
    try:
        yield p
    finally:
        p.stop()


def events(proxy: ProxyProcess, name: str) -> list[dict]:
    found = []
    for line in proxy.full_log().splitlines():
        if f'"{name}"' in line:
            e = json.loads(line)
            if e.get("event") == name:
                found.append(e)
    return found


# -- what the provider holds, as doveadm tells it --------------------------------


def folders(dovecot, user: str) -> list[str]:
    out = dovecot.doveadm("mailbox", "list", "-u", user).stdout.decode()
    return sorted(out.split())


def contents(dovecot, user: str) -> dict[str, list[tuple[int, str]]]:
    """Each folder's messages as (uid, flags), \\Recent aside (it is per session)."""
    state = {}
    for folder in folders(dovecot, user):
        out = dovecot.doveadm(
            "-f", "tab", "fetch", "-u", user, "uid flags", "mailbox", folder
        ).stdout.decode()
        rows = []
        for line in out.splitlines()[1:]:
            uid, _, flags = line.partition("\t")
            kept = " ".join(sorted(f for f in flags.split() if f != "\\Recent"))
            rows.append((int(uid), kept))
        state[folder] = sorted(rows)
    return state


def snapshot(dovecot, user: str) -> tuple[list[str], list[str], dict[str, list[tuple[int, str]]]]:
    """Folders, subscriptions, and each folder's messages with their flags."""
    subscribed = dovecot.doveadm("mailbox", "list", "-s", "-u", user).stdout.decode()
    return folders(dovecot, user), sorted(subscribed.split()), contents(dovecot, user)


def seeded(proxy, provider, dovecot, pki, *token_args: str) -> Mailbox:
    """A fresh account with FOLDERS, three messages in INBOX and one in each folder."""
    mb = register(proxy, provider, dovecot, pki, token_args=token_args)
    for i in range(3):
        dovecot.seed(mb.email, message(3000, f"inbox {i}"))
    for f in FOLDERS:
        dovecot.doveadm("mailbox", "create", "-u", mb.email, f)
        dovecot.seed(mb.email, message(2000, f"in {f}"), mailbox=f)
    dovecot.doveadm("mailbox", "subscribe", "-u", mb.email, "INBOX", *FOLDERS)
    return mb


def loggedIn(proxy, mb: Mailbox) -> Raw:
    r = Raw(proxy.port)
    r.line()
    r.send(f"a LOGIN {mb.account} {mb.token}\r\n".encode())
    last = r.until(b"a")[-1]
    assert last.startswith(b"a OK"), last
    return r


def answer(r: Raw, tag: bytes, command: bytes) -> list[bytes]:
    r.send(tag + b" " + command + b"\r\n")
    return r.until(tag)


def refused(lines: list[bytes], tag: bytes) -> bool:
    return lines[-1].startswith(tag + b" NO")


def listed(lines: list[bytes]) -> set[bytes]:
    """The mailbox names of untagged LIST/LSUB responses (quoted or atoms)."""
    names = set()
    for line in lines:
        m = re.match(rb'\* (?:LIST|LSUB) \([^)]*\) (?:NIL|"[^"]*") (.*)\Z', line)
        if m:
            names.add(m.group(1).strip(b'"'))
    return names


def statused(lines: list[bytes]) -> set[bytes]:
    names = set()
    for line in lines:
        m = re.match(rb"\* STATUS (.*) \(", line)
        if m:
            names.add(m.group(1).strip(b'"'))
    return names


@pytest.fixture
def separator(dovecot, provider, pki, proxy) -> Iterator[str]:
    """Dovecot's hierarchy separator, asked directly (the folder names assume '.')."""
    mb = register(proxy, provider, dovecot, pki)
    c = direct(dovecot, mb.email, provider_access_token(provider, mb.refresh_token, pki.ca_cert))
    typ, data = c.list('""', '""')
    c.logout()
    sep = data[0].decode().split('"')[1]
    assert sep == ".", sep
    yield sep


# -- read-only ----------------------------------------------------------------------

# Each write, in each form: tag, command bytes (a literal's payload included).
WRITES: list[bytes] = [
    b"STORE 1 +FLAGS (\\Deleted)",
    b"STORE 1:* FLAGS (\\Seen \\Flagged)",
    b"UID STORE 1 +FLAGS.SILENT (\\Seen)",
    b"EXPUNGE",
    b"UID EXPUNGE 1:*",
    b"COPY 1:* Work",
    b"UID COPY 1 Work",
    b"MOVE 1 Work",
    b"UID MOVE 1:* Work",
    b"CREATE NewFolder",
    b"CREATE {9+}\r\nNewFolder",
    b"DELETE Secret",
    b'DELETE "Secret"',
    b"RENAME Secret Secret2",
    b"SUBSCRIBE Secret",
    b"UNSUBSCRIBE Work",
    b"SETMETADATA INBOX (/private/comment {3+}\r\nabc)",
    b"SETACL INBOX anyone lrswipkxte",
    b"DELETEACL INBOX anyone",
    b'SETQUOTA "" (STORAGE 1)',
    b"APPEND INBOX {12+}\r\nSubject: x\r\n",
    b"APPEND INBOX (\\Seen) {12+}\r\nSubject: x\r\n",
    b"XUNKNOWN-WRITE INBOX",
    b"uid store 1 +flags (\\Deleted)",
]


def test_read_only_refuses_every_write(proxy, provider, dovecot, pki):
    """Every write form is refused by the proxy and the mailbox stays as it was."""
    mb = seeded(proxy, provider, dovecot, pki, "--read-only")
    before = snapshot(dovecot, mb.email)
    r = loggedIn(proxy, mb)
    try:
        select = answer(r, b"s", b"SELECT INBOX")
        assert select[-1].startswith(b"s OK"), select
        assert b"[READ-ONLY]" in b"".join(select)  # SELECT became EXAMINE
        for n, command in enumerate(WRITES):
            tag = b"w%d" % n
            lines = answer(r, tag, command)
            assert refused(lines, tag), (command, lines)
        # Pipelined behind an allowed command, in one write.
        r.send(b"p1 NOOP\r\np2 STORE 1 +FLAGS (\\Deleted)\r\np3 EXPUNGE\r\np4 NOOP\r\n")
        lines = r.until(b"p4")
        tagged = {ln.split(b" ", 2)[0]: ln for ln in lines if not ln.startswith(b"*")}
        assert tagged[b"p1"].startswith(b"p1 OK") and tagged[b"p4"].startswith(b"p4 OK")
        assert tagged[b"p2"].startswith(b"p2 NO") and tagged[b"p3"].startswith(b"p3 NO")
        # A write hidden in an allowed command's literal is data, not a command.
        hidden = b"h2 STORE 1 +FLAGS (\\Deleted)\r\nh3 EXPUNGE"
        lines = answer(r, b"h1", b"SEARCH TEXT {%d+}\r\n" % len(hidden) + hidden)
        assert lines[-1].startswith(b"h1 OK"), lines
        # A synchronizing literal: the proxy refuses without taking the payload,
        # or takes it and refuses; either way nothing reaches the mailbox.
        r.send(b"y APPEND INBOX {12}\r\n")
        first = r.line()
        if first.startswith(b"+"):
            r.send(b"Subject: y\r\n\r\n")
            first = r.until(b"y")[-1]
        assert first.startswith(b"y NO"), first
        # Reading bodies sets no \Seen (EXAMINE), whatever the client asks.
        lines = answer(r, b"f", b"FETCH 1:* (BODY[] FLAGS)")
        assert lines[-1].startswith(b"f OK"), lines[-1]
        lines = answer(r, b"g", b"UID FETCH 1:* BODY[TEXT]")
        assert lines[-1].startswith(b"g OK")
        answer(r, b"z", b"LOGOUT")
    finally:
        r.close()
    assert snapshot(dovecot, mb.email) == before
    assert not any("\\Seen" in flags for _, flags in contents(dovecot, mb.email)["INBOX"])
    # Refused by the proxy (the provider never saw them), each one logged.
    mine = [e for e in events(proxy, "command-refused") if e["token_id"] == tokenId(mb.token)]
    assert len(mine) >= len(WRITES) + 3, [e["command"] for e in mine]
    assert "Traceback" not in proxy.log()


def test_refusal_event_has_no_arguments(proxy, provider, dovecot, pki):
    """A refusal is a command-refused event with the token id and the name, never arguments."""
    mb = seeded(proxy, provider, dovecot, pki, "--read-only")
    r = loggedIn(proxy, mb)
    try:
        answer(r, b"s", b"EXAMINE INBOX")
        assert refused(answer(r, b"x", b"STORE 1 +FLAGS (\\Flagged-SECRET-ARG)"), b"x")
        answer(r, b"z", b"LOGOUT")
    finally:
        r.close()
    mine = [e for e in events(proxy, "command-refused") if e["token_id"] == tokenId(mb.token)]
    assert [(e["account"], e["command"]) for e in mine] == [(mb.account, "STORE")]
    assert "SECRET-ARG" not in proxy.full_log()
    # Counted by name in /metrics (from loopback, no token needed).
    page = requests.get(proxy.api_url + "/metrics", timeout=20)
    assert page.status_code == 200, page.text
    counted = [
        s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
        if s.name == "imapproxy_commands_refused_total" and s.labels == {"command": "STORE"}
    ]
    assert counted and counted[0] >= 1, counted
    assert "SECRET-ARG" not in page.text


def test_api_restricted_token_and_session_listing(proxy, provider, dovecot, pki):
    """A token issued over the API with restrictions shows them, and so do its sessions."""
    mb = seeded(proxy, provider, dovecot, pki)
    root = proxy.cli("tokens", "issue", "--scope", "*", "--description", "root").stdout.strip()
    ISSUED_SECRETS.append(root)
    auth = {"Authorization": f"Bearer {root}"}
    wanted = {"readOnly": True, "mailboxes": ["INBOX", "Archive*"]}
    r = requests.post(
        proxy.api_url + "/v1/tokens",
        headers=auth,
        json={"account": mb.account, "scopes": ["imap-proxy"], "description": "backup",
              "restrictions": wanted},
        timeout=20,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    ISSUED_SECRETS.append(token)
    listed_ = requests.get(
        proxy.api_url + f"/v1/tokens?account={mb.account}", headers=auth, timeout=20
    ).json()["tokens"]
    assert {t["id"]: t["restrictions"] for t in listed_}[r.json()["id"]] == wanted
    live = loggedIn(proxy, Mailbox(mb.account, mb.email, token, mb.refresh_token))
    try:
        sessions = requests.get(
            proxy.api_url + f"/v1/sessions?account={mb.account}", headers=auth, timeout=20
        ).json()["sessions"]
        assert [s["restrictions"] for s in sessions] == [wanted]
    finally:
        live.close()


def test_read_only_imapclient_reads(proxy, provider, dovecot, pki):
    """IMAPClient lists, selects and fetches with a read-only token; writes raise."""
    mb = seeded(proxy, provider, dovecot, pki, "--read-only")
    before = snapshot(dovecot, mb.email)
    with IMAPClient(
        "localhost", port=proxy.ports["ssl"], ssl_context=client_context(pki.ca_cert)
    ) as c:
        c.login(mb.account, mb.token)
        names = {f[2] for f in c.list_folders()}
        assert {"INBOX", "Work", "Zürich", "Archive.2024"} <= names
        # The proxy turns SELECT into EXAMINE, so the server answers
        # [READ-ONLY], which imaplib (under IMAPClient) refuses unless asked
        # for read-only: docs/restricted-tokens.md says so.
        with pytest.raises(IMAPClient.ReadOnlyError):
            c.select_folder("INBOX")
        info = c.select_folder("INBOX", readonly=True)
        assert info[b"EXISTS"] == 3
        bodies = c.fetch([1, 2, 3], ["BODY[]"])
        assert len(bodies) == 3
        with pytest.raises(IMAPClient.Error):
            c.add_flags([1], [b"\\Deleted"])
        with pytest.raises(IMAPClient.Error):
            c.create_folder("Nope")
    assert snapshot(dovecot, mb.email) == before


# -- mailboxes ----------------------------------------------------------------------

ALLOWED = {b"INBOX", b"Work", b"Z&APw-rich"}


def test_mailboxes_hide_and_refuse_the_rest(proxy, provider, dovecot, pki, separator):
    """Outside INBOX, Work and Zürich nothing can be listed, selected, counted or written."""
    mb = seeded(proxy, provider, dovecot, pki, "--mailbox", "INBOX", "--mailbox", "Work",
                "--mailbox", "Zürich")  # fmt: skip
    before = snapshot(dovecot, mb.email)
    r = loggedIn(proxy, mb)
    try:
        for n, pattern in enumerate(
            [b'"*"', b'"%"', b"Wo*", b'"*Work*"', b'"*ork*"', b"Work.*", b'"" "*"', b"*"]
        ):
            cmd = b'LIST "" ' + pattern if not pattern.startswith(b'""') else b"LIST " + pattern
            lines = answer(r, b"l%d" % n, cmd)
            assert lines[-1].startswith(b"l%d OK" % n), lines
            assert listed(lines) <= ALLOWED, (cmd, lines)
        everything = listed(answer(r, b"la", b'LIST "" "*"'))
        assert everything == ALLOWED
        assert listed(answer(r, b"ls", b'LSUB "" "*"')) <= ALLOWED
        ext = answer(r, b"lx", b'LIST (SUBSCRIBED) "" "*" RETURN (STATUS (MESSAGES UNSEEN))')
        assert listed(ext) <= ALLOWED and statused(ext) <= ALLOWED, ext
        ret = answer(r, b"lr", b'LIST "" "*" RETURN (STATUS (MESSAGES))')
        assert statused(ret) == ALLOWED, ret
        assert listed(ret) == ALLOWED
        # Named one by one, in every spelling: refused.
        for n, name in enumerate(
            [b"Secret", b'"Secret"', b"{6+}\r\nSecret", b"Homework", b"Work2", b"Work.Sub",
             b"Archive", b"Archive.2024", b'"Work.Sub"', b"Secret.nothing"]
        ):  # fmt: skip
            for verb in (b"SELECT", b"EXAMINE", b"STATUS"):
                tail = b" (MESSAGES)" if verb == b"STATUS" else b""
                tag = b"n%d%s" % (n, verb[:2])
                lines = answer(r, tag, verb + b" " + name + tail)
                assert refused(lines, tag), (verb, name, lines)
                assert not statused(lines), lines
        # Writes that name a forbidden mailbox, with the session in an allowed one.
        assert answer(r, b"sel", b"SELECT INBOX")[-1].startswith(b"sel OK")
        for n, command in enumerate(
            [b"COPY 1 Secret", b"UID COPY 1:* Work2", b"MOVE 1 Homework", b"UID MOVE 1 Archive",
             b"APPEND Secret {12+}\r\nSubject: x\r\n", b"CREATE Secret.New", b"CREATE Work.New",
             b"DELETE Secret", b"RENAME Secret Work.Moved", b"RENAME Work Secret2",
             b"SUBSCRIBE Secret", b"UNSUBSCRIBE Homework", b"GETACL Secret", b"MYRIGHTS Secret",
             b"GETQUOTAROOT Secret", b'GETMETADATA Secret (/private/comment)']
        ):  # fmt: skip
            tag = b"x%d" % n
            assert refused(answer(r, tag, command), tag), command
        # What is allowed works: Work by name, Zürich in modified UTF-7.
        status = answer(r, b"st", b"STATUS Work (MESSAGES)")
        assert status[-1].startswith(b"st OK") and b"MESSAGES 1" in status[0]
        assert answer(r, b"z", b"EXAMINE Z&APw-rich")[-1].startswith(b"z OK")
        answer(r, b"q", b"LOGOUT")
    finally:
        r.close()
    assert snapshot(dovecot, mb.email) == before


def test_mailboxes_body_that_looks_like_a_response(proxy, provider, dovecot, pki):
    """A message body holding '* LIST … Secret' lines is relayed untouched, not filtered."""
    mb = seeded(proxy, provider, dovecot, pki, "--mailbox", "INBOX")
    body = (
        b'Subject: lures\r\n\r\n* LIST (\\HasNoChildren) "." Secret\r\n'
        b'* STATUS Secret (MESSAGES 9)\r\n* LSUB () "." Secret\r\n'
    )
    dovecot.seed(mb.email, body)
    c = plain(proxy.port)
    try:
        c.login(mb.account, mb.token)
        c.select("INBOX", readonly=True)
        typ, data = c.fetch("4", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == body
    finally:
        c.logout()


def test_mailboxes_imaplib_and_imapclient_see_only_theirs(proxy, provider, dovecot, pki):
    """imaplib and IMAPClient list only the allowed folders and use them normally."""
    mb = seeded(proxy, provider, dovecot, pki, "--mailbox", "INBOX", "--mailbox", "Archive*")
    c = plain(proxy.port)
    try:
        c.login(mb.account, mb.token)
        typ, data = c.list()
        names = {line.rsplit(b" ", 1)[1].strip(b'"') for line in data}
        assert names == {b"INBOX", b"Archive", b"Archive.2024"}, data
        typ, _ = c.select("Secret")
        assert typ == "NO"
        typ, data = c.select("Archive.2024")
        assert typ == "OK" and data == [b"1"]
    finally:
        c.logout()
    with IMAPClient(
        "localhost", port=proxy.ports["ssl"], ssl_context=client_context(pki.ca_cert)
    ) as ic:
        ic.login(mb.account, mb.token)
        assert {f[2] for f in ic.list_folders()} == {"INBOX", "Archive", "Archive.2024"}
        assert ic.folder_status("Archive", [b"MESSAGES"])[b"MESSAGES"] == 1
        with pytest.raises(IMAPClient.Error):
            ic.folder_status("Work", [b"MESSAGES"])


def _maildir_messages(root: str) -> dict[str, bytes]:
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) not in ("cur", "new"):
            continue
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                raw = re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", f.read(), count=1)
            found[email.message_from_bytes(raw)["Message-ID"]] = raw
    return found


def test_mbsync_backup_with_read_only_mailbox_token(proxy, provider, dovecot, pki, tmp_path):
    """
    The backup of docs/restricted-tokens.md: mbsync pulls INBOX and Archive*
    with a read-only token, gets exactly those folders' mail, and the
    provider's mailbox is unchanged (no \\Seen, nothing moved).
    """
    assert MBSYNC is not None, "mbsync (isync) is missing: tests/run installs it"
    mb = seeded(proxy, provider, dovecot, pki, "--read-only", "--mailbox", "INBOX",
                "--mailbox", "Archive*")  # fmt: skip
    before = snapshot(dovecot, mb.email)
    local = tmp_path / "mail"
    local.mkdir()
    (tmp_path / "pass").write_text(mb.token)
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"""IMAPAccount proxy
Host localhost
Port {proxy.ports["ssl"]}
User {mb.account}
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

Channel backup
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
Expunge None
SyncState *
"""
    )
    result = subprocess.run(
        [MBSYNC, "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    synced = _maildir_messages(str(local))
    token = provider_access_token(provider, mb.refresh_token, pki.ca_cert)
    d = direct(dovecot, mb.email, token)
    expected = {}
    for folder in ("INBOX", "Archive", "Archive.2024"):
        d.select(folder, readonly=True)
        typ, data = d.fetch("1:*", "(BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                raw = item[1].replace(b"\r\n", b"\n")
                expected[email.message_from_bytes(raw)["Message-ID"]] = raw
    d.logout()
    assert len(expected) == 5
    assert synced == expected
    assert sorted(os.listdir(local)) == ["Archive", "INBOX"]
    assert snapshot(dovecot, mb.email) == before


# -- byte-exact ----------------------------------------------------------------------


def test_large_fetch_through_restricted_session_is_byte_exact(proxy, provider, dovecot, pki):
    """A 20 MB FETCH through a read-only, mailbox-restricted session equals the direct one."""
    mb = register(proxy, provider, dovecot, pki, token_args=("--read-only", "--mailbox", "INBOX"))
    dovecot.seed(mb.email, message(20 * 1024 * 1024, "large"))
    token = provider_access_token(provider, mb.refresh_token, pki.ca_cert)
    d = direct(dovecot, mb.email, token)
    d.select("INBOX", readonly=True)
    typ, want = d.fetch("1", "(BODY.PEEK[])")
    d.logout()
    c = plain(proxy.port)
    try:
        c.login(mb.account, mb.token)
        c.select("INBOX", readonly=True)
        typ, got = c.fetch("1", "(BODY[])")
        assert typ == "OK"
        assert got[0][1] == want[0][1]
        assert len(got[0][1]) >= 20 * 1024 * 1024
    finally:
        c.logout()
