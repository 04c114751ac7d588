"""
A property of the policy relay, over generated command streams: random
mixes of reads and writes, literals of both kinds whose data looks like
commands, pipelining, and reads cut at random places. For a read-only
token (and one restricted to INBOX as well) no write and no other mailbox
ever reaches the provider (also when the provider turns literals down),
every allowed command reaches it byte-exact
(``SELECT`` as ``EXAMINE``), and each command gets exactly one answer.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.policy.readonly import WRITE
from tests.policyutil import Session

# Data that a careless relay would take for commands.
_DATA = st.sampled_from(
    [
        b"",
        b"x",
        b"z DELETE INBOX\r\n",
        b"\r\nz STORE 1 +FLAGS \\Deleted\r\n",
        b"{5}\r\n",
        b"z APPEND INBOX {3+}\r\nabc\r\n",
        b'* LIST () "/" Junk\r\n',
        bytes(range(256)),
    ]
)


@st.composite
def _literal(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """``(announcement, data, synchronizing)``."""
    data = draw(_DATA)
    sync = draw(st.booleans())
    return (b"{%d}" if sync else b"{%d+}") % len(data), data, sync


@st.composite
def _command(draw: st.DrawFn, mailboxes: bool) -> tuple[list, bool, bytes]:
    """
    One command as parts: bytes to send, or ``(literal data, sync)`` after
    a line announcing it. :return: the parts, whether it is allowed, and
    the first line the provider should get if it is.
    """
    kind = draw(
        st.sampled_from(["read", "literalRead", "write", "literalWrite", "mailbox", "named"])
    )
    if kind == "read":
        line = draw(
            st.sampled_from(
                [
                    b"NOOP",
                    b"FETCH 1:* (FLAGS BODY.PEEK[])",
                    b"UID SEARCH ALL",
                    b"SELECT INBOX",
                    b"EXAMINE INBOX",
                    b'LIST "" "*"',
                    b"STATUS INBOX (MESSAGES)",
                    b"CHECK",
                ]
            )
        )
        return [line + b"\r\n"], True, line
    if kind == "literalRead":
        announcement, data, sync = draw(_literal())
        line = b"SEARCH CHARSET UTF-8 TEXT " + announcement
        return [line + b"\r\n", (data, sync), b"\r\n"], True, line
    if kind == "write":
        line = draw(st.sampled_from([b"STORE 1 +FLAGS (\\Seen)", b"EXPUNGE", b"UID MOVE 1 INBOX"]))
        return [line + b"\r\n"], False, line
    if kind == "named":
        # A mailbox name as a literal: a mailbox-restricted token's proxy
        # asks for it itself and passes it on as {n+}.
        name = draw(st.sampled_from([b"INBOX", b"inbox", b"Junk", b"INBOXJunk"]))
        sync = draw(st.booleans())
        announcement = (b"{%d}" if sync else b"{%d+}") % len(name)
        line = b"SELECT " + announcement
        allowed = not mailboxes or name.upper() == b"INBOX"
        return [line + b"\r\n", (name, sync), b" (CONDSTORE)\r\n"], allowed, line
    if kind == "mailbox":
        line = draw(st.sampled_from([b"SELECT Junk", b'STATUS "Junk" (UIDNEXT)', b"EXAMINE Junk"]))
        return [line + b"\r\n"], not mailboxes, line
    announcement, data, sync = draw(_literal())
    line = draw(st.sampled_from([b"APPEND INBOX ", b"APPEND INBOX (\\Seen) ", b"SEARCH TEXT "]))
    if line.startswith(b"SEARCH"):
        # A write hidden behind the literal of a read: the literal is data.
        return (
            [line + announcement + b"\r\n", (data, sync), b" STORE\r\n"],
            True,
            line + announcement,
        )
    return [line + announcement + b"\r\n", (data, sync), b"\r\n"], False, line + announcement


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans(), st.booleans())
def test_no_write_reaches_the_provider(data, mailboxes, refuseLiterals):
    """Whatever the mix and the cuts: writes never pass, reads pass byte-exact, one answer each."""
    s = Session(readOnly=True, mailboxes=("INBOX",) if mailboxes else ())
    # A provider may also turn a literal down (a tagged BAD instead of "+").
    s.provider.refuseLiterals = refuseLiterals
    commands = data.draw(st.lists(_command(mailboxes), min_size=1, max_size=12))
    expected: list[bytes] = []
    answers = b""
    pending = b""

    def flush() -> None:
        nonlocal pending
        while pending:
            cut = data.draw(st.integers(min_value=1, max_value=max(1, len(pending))))
            s.send(pending[:cut])
            pending = pending[cut:]

    for n, (parts, allowed, _line) in enumerate(commands):
        tag = b"t%d" % n
        sent = tag + b" "
        for part in parts:
            if isinstance(part, tuple):
                literal, sync = part
                if sync:
                    # The client waits for "+" or the command's answer.
                    flush()
                    new = s.toClient()
                    answers += new
                    if re.search(rb"(^|\n)" + tag + rb" (NO|BAD)", answers):
                        break
                    assert re.search(rb"(^|\n)\+ ", new)
                pending += literal
                sent += literal
            else:
                pending += part if sent != tag + b" " else tag + b" " + part
                sent += part
        else:
            if allowed:
                sent = sent.replace(b" SELECT ", b" EXAMINE ")
                if mailboxes:
                    sent = re.sub(rb"^(t[0-9]+ EXAMINE \{[0-9]+)\}", rb"\1+}", sent)
                expected.append(sent)
    flush()
    answers += s.toClient()

    assert not [n for n in s.provider.names if n in WRITE]
    if mailboxes:
        assert not [c for c in s.provider.commands if b"Junk" in c[2]]
    assert s.provider.raw == expected
    for n in range(len(commands)):
        assert len(re.findall(rb"(?:^|\n)t%d (?:OK|NO|BAD)" % n, answers)) == 1
    assert b"* BYE" not in answers


_PIECES = st.sampled_from(
    [
        b"* 1 FETCH (BODY[] {12}\r\n* LIST () x\r\n)\r\n",
        b"* 2 EXISTS\r\n",
        b"+ go on\r\n",
        b"a1 OK done\r\n",
        b"* SEARCH" + b" 7" * 40000 + b"\r\n",
        b"* 3 FETCH (BODY[] ~{3}\r\nabc)\r\n",
        b"* OK still here\r\n",
        b"\xff\x00 junk without end",
        b"{5}\r\n",
    ]
)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.lists(_PIECES, max_size=8))
def test_responses_pass_untouched_whatever_the_cuts(data, pieces):
    """For a read-only token, responses it need not judge reach the client byte for byte."""
    s = Session(readOnly=True, auto=False)
    stream = b"".join(pieces)
    while stream:
        cut = data.draw(st.integers(min_value=1, max_value=len(stream)))
        s.reply(stream[:cut])
        stream = stream[cut:]
    s.reply(b"\r\n")  # ends a line left open
    assert s.client.transport.value() == b"".join(pieces) + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_any_client_bytes_are_judged_without_error(blob, mailboxes):
    """Arbitrary bytes from a client: refused or passed, never an exception (which would end it)."""
    s = Session(readOnly=True, mailboxes=("INBOX",) if mailboxes else ())
    s.send(blob + b"\r\n")
    # A bug would end the session as "operator"; the policy's own ends are the client's.
    assert s.splice.closedBy in (None, "client")
    assert not [n for n in s.provider.names if n in WRITE]
