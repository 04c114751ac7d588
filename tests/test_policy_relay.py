"""
The policy relay (``PolicySplice``) over in-memory transports, against a
model of the provider that frames what it gets as a server does: writes
never reach it in any form, reads pass byte-exact (``SELECT`` as
``EXAMINE``), the provider's answers are filtered by whole responses only.
"""

from __future__ import annotations

import pytest

from tests.policyutil import Session

READ_ONLY = b"NO [NOPERM] This token is read-only\r\n"
NOT_THAT_MAILBOX = b"NO [NOPERM] This token may not use that mailbox\r\n"
WRITES = [
    b"STORE 1 +FLAGS (\\Deleted)",
    b"UID STORE 1:* +FLAGS.SILENT (\\Seen)",
    b"EXPUNGE",
    b"UID EXPUNGE 1:*",
    b"COPY 1 Junk",
    b"UID MOVE 1 Junk",
    b"CREATE Junk2",
    b"DELETE INBOX",
    b"RENAME INBOX Other",
    b"SUBSCRIBE Junk",
    b"SETACL INBOX anyone lrswipkxtecda",
    b"SETMETADATA INBOX (/private/comment NIL)",
    b"XYZZY",
]


@pytest.mark.parametrize("write", WRITES)
def test_write_commands_are_refused_in_every_form(write):
    """Plain, pipelined behind a read, UID: answered by the proxy, never passed."""
    s = Session()
    s.send(b"a NOOP\r\nw " + write + b"\r\nb NOOP\r\n")
    assert s.provider.names == [b"NOOP", b"NOOP"]
    out = s.toClient()
    assert b"w " + READ_ONLY in out and b"a OK" in out and b"b OK" in out


def test_write_with_synchronizing_literal_gets_no_instead_of_continuation():
    """``APPEND … {n}``: the refusal answers the literal; the client's next command is read."""
    s = Session()
    s.send(b"w APPEND INBOX {11}\r\n")
    assert s.toClient() == b"w " + READ_ONLY
    s.send(b"a NOOP\r\n")
    assert s.provider.names == [b"NOOP"]


def test_write_with_non_synchronizing_literal_is_read_past():
    """``{n+}``: its data (which looks like a command) is thrown away, never run."""
    s = Session()
    s.send(b"w APPEND INBOX {20+}\r\nx DELETE INBOX\r\n.... (\\Seen) {3+}\r\nabc\r\na NOOP\r\n")
    assert s.provider.names == [b"NOOP"]
    assert s.toClient() == b"w " + READ_ONLY + b"a OK done\r\n"
    assert s.splice.commands.swallowed > 20
    assert s.refused == ["APPEND"]


def test_write_hidden_in_a_literal_of_a_read_stays_data():
    """``SEARCH TEXT {n}`` with a STORE as its data: the provider gets it as a literal."""
    s = Session()
    hidden = b"b STORE 1 +FLAGS \\Deleted\r\n"
    s.send(b"a SEARCH TEXT {%d}\r\n" % len(hidden))
    assert s.toClient() == b"+ go on\r\n"
    s.send(hidden + b"\r\n")
    assert s.provider.names == [b"SEARCH"]
    assert s.refused == []


def test_literal_refused_by_the_provider_is_no_literal():
    """No ``+`` but a tagged BAD: what the client sends next is a command again, judged."""
    s = Session()
    s.provider.refuseLiterals = True
    s.send(b"a SEARCH TEXT {16}\r\nb DELETE INBOX\r\nc NOOP\r\n")
    assert s.provider.names == [b"NOOP"]
    out = s.toClient()
    assert out.startswith(b"a BAD") and b"b " + READ_ONLY in out


def test_bytes_after_an_announced_literal_wait_for_the_provider():
    """Nothing after ``{n}`` is passed before the provider has said ``+`` or answered."""
    s = Session(auto=False)
    s.send(b"a SEARCH TEXT {5}\r\nhello\r\nb NOOP\r\n")
    assert s.toProvider() == b"a SEARCH TEXT {5}\r\n"
    s.reply(b"+ go on\r\n")
    assert s.toProvider() == b"hello\r\nb NOOP\r\n"
    assert s.toClient() == b"+ go on\r\n"


def test_non_synchronizing_literal_needs_the_providers_literal_plus():
    """A provider without LITERAL+ would read ``{n+}`` data as commands: the proxy refuses it."""
    s = Session(capabilities=[b"IMAP4rev1"])
    s.send(b"a SEARCH TEXT {16+}\r\nb DELETE INBOX\r\n\r\nc NOOP\r\n")
    assert s.provider.names == [b"NOOP"]
    assert s.toClient().startswith(b"a BAD")
    s = Session(capabilities=[b"IMAP4rev1", b"LITERAL-"])
    s.send(b"a SEARCH TEXT {5+}\r\nhello\r\n")
    s.send(b"b SEARCH TEXT {5000+}\r\n" + b"x" * 5000 + b"\r\n")
    assert s.provider.names == [b"SEARCH"]


def test_select_becomes_examine_keeping_tag_and_arguments():
    """Only the command name changes; a literal name is still passed as it comes."""
    s = Session()
    s.send(b"a7 select INBOX (CONDSTORE)\r\n")
    assert s.provider.commands[0][2] == b"a7 EXAMINE INBOX (CONDSTORE)\r\n"
    s.send(b"a8 SELECT {5}\r\n")
    s.send(b"INBOX\r\n")
    assert s.provider.commands[1][2] == b"a8 EXAMINE {5}\r\n"


def test_idle_and_done():
    """IDLE passes; DONE only as the end of IDLE; anything else in IDLE ends the session."""
    s = Session()
    s.send(b"a IDLE\r\nDONE\r\nb NOOP\r\n")
    assert s.provider.names == [b"IDLE", b"NOOP"]
    assert s.toClient() == b"+ idling\r\na OK Idle done\r\nb OK done\r\n"
    s.send(b"DONE\r\n")  # not idling: a command tagged DONE without a name
    assert s.toClient() == b"DONE BAD Missing command\r\n"
    s.send(b"c IDLE\r\nd DELETE INBOX\r\n")
    assert s.provider.names == [b"IDLE", b"NOOP", b"IDLE"]
    assert s.toClient().endswith(b"* BYE Expected DONE\r\n")
    assert s.upstream.transport.disconnecting or s.upstream.transport.disconnected


def test_malformed_and_too_long():
    """A malformed command gets BAD from the proxy; a line past the bound ends the session."""
    s = Session()
    s.send(b'a SEARCH SUBJECT "x {5}\r\n+ nothing\r\n')
    assert s.provider.names == []
    assert s.toClient().startswith(b"a BAD Syntax error")
    s.send(b"b FETCH " + b"1," * 40000)
    assert s.toClient() == b"* BYE Command line too long\r\n"
    assert s.provider.names == []


def test_refusal_waits_for_the_end_of_a_response():
    """A message body on its way is never cut by the proxy's answer."""
    s = Session(auto=False)
    s.send(b"a FETCH 1 BODY[]\r\n")
    s.reply(b"* 1 FETCH (BODY[] {10}\r\n01234")
    s.send(b"w STORE 1 +FLAGS \\Seen\r\n")
    assert s.toClient() == b"* 1 FETCH (BODY[] {10}\r\n01234"
    s.reply(b"56789)\r\na OK\r\n")
    assert s.toClient() == b"56789)\r\nw " + READ_ONLY + b"a OK\r\n"


def test_big_fetch_streams_byte_exact():
    """20 MB of literal go through piece by piece, untouched, nothing held."""
    s = Session(auto=False)
    s.send(b"a UID FETCH 1 BODY.PEEK[]\r\n")
    size = 20 * 1024 * 1024
    s.reply(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % size)
    chunk = bytes(range(256)) * 256
    sent = 0
    while sent < size:
        s.reply(chunk)
        sent += len(chunk)
        assert len(s.client.transport.value()) <= 2 * len(chunk)
        assert s.client.transport.value().endswith(chunk)
        s.client.transport.clear()
    s.reply(b")\r\na OK\r\n")
    assert s.toClient() == b")\r\na OK\r\n"


def test_capabilities_filtered_in_answers_and_codes():
    """Later CAPABILITY answers and [CAPABILITY] codes say only what the proxy can police."""
    s = Session(auto=False)
    s.send(b"a CAPABILITY\r\n")
    s.reply(
        b"* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE NOTIFY\r\n"
        b"a OK [CAPABILITY IMAP4rev1 X-Y] ok\r\n"
    )
    assert s.toClient() == b"* CAPABILITY IMAP4rev1 IDLE\r\na OK [CAPABILITY IMAP4rev1] ok\r\n"


def test_unknown_command_names_are_one_label():
    """``onRefused`` gets known names, and OTHER for made-up ones (no label per input)."""
    s = Session()
    s.send(b"a XYZZY1\r\nb xyzzy2\r\nc COPY 1 x\r\n")
    assert s.refused == ["OTHER", "OTHER", "COPY"]


def test_bytes_held_for_the_provider_pause_the_client():
    """Past the bound of what is held while waiting for "+", the client is paused, then resumed."""
    s = Session(auto=False)
    s.send(b"a SEARCH TEXT {5}\r\n")
    s.send(b"x" * 70000)
    assert s.client.transport.producerState == "paused"
    s.client.transport.producerState = "producing"  # as the provider's side may do
    s.send(b"y" * 100)
    assert s.client.transport.producerState == "paused"
    s.reply(b"+ go on\r\n")
    assert s.client.transport.producerState == "producing"
    assert s.toProvider() == b"a SEARCH TEXT {5}\r\nxxxxx"


def test_many_waiting_refusals_pause_the_client():
    """The proxy's answers waiting for a boundary are bounded: the client is paused a while."""
    s = Session(auto=False)
    s.send(b"a FETCH 1 BODY[]\r\n")
    s.reply(b"* 1 FETCH (BODY[] {10}\r\n01234")
    s.send(b"w STORE 1 +FLAGS \\Seen\r\n" * 300)
    assert s.client.transport.producerState == "paused"
    s.reply(b"56789)\r\n")
    assert s.client.transport.producerState == "producing"
    assert s.toClient().count(b"w " + READ_ONLY) == 300


# -- mailbox-restricted ------------------------------------------------------------


def test_mailbox_commands_outside_the_patterns_are_refused():
    """SELECT, STATUS, COPY target, RENAME: outside the patterns, refused; inside, passed."""
    s = Session(readOnly=False, mailboxes=("INBOX", "Archive/*"))
    s.send(b"a SELECT Archive\r\nb SELECT INBOXfoo\r\nc STATUS Archive2 (MESSAGES)\r\n")
    s.send(b"d SELECT inbox\r\ne COPY 1 Junk\r\nf COPY 1 Archive/2020\r\ng RENAME INBOX Junk\r\n")
    s.send(b'h STATUS "Archive/x" (UIDNEXT)\r\n')
    assert s.provider.names == [b"SELECT", b"COPY", b"STATUS"]
    out = s.toClient()
    for tag in (b"a", b"b", b"c", b"e", b"g"):
        assert b"\r\n" + tag + b" " + NOT_THAT_MAILBOX in b"\r\n" + out


def test_long_commands_without_mailboxes_are_not_taken_apart():
    """A FETCH or SEARCH with many arguments passes as it is (only mailbox arguments are read)."""
    s = Session(readOnly=True, mailboxes=("INBOX",))
    line = b"a UID SEARCH " + b" ".join(b"OR FROM x%d" % i for i in range(100)) + b" ALL\r\n"
    s.send(line)
    assert s.provider.raw == [line]


def test_mailbox_name_as_literal_is_read_then_judged():
    """``SELECT {n}``: the proxy asks for the name, judges it, passes it as ``{n+}``."""
    s = Session(readOnly=True, mailboxes=("Bücher",))
    s.send(b"a SELECT {10}\r\n")
    assert s.toClient() == b"+ Ready for literal data\r\n"
    s.send(b"B&APw-cher\r\n")
    assert s.provider.commands == [(b"a", b"EXAMINE", b"a EXAMINE {10+}\r\n")]
    s.send(b"b SELECT {4}\r\n")
    s.send(b"Junk\r\n")
    assert s.toClient().endswith(b"b " + NOT_THAT_MAILBOX)
    s = Session(readOnly=False, mailboxes=("INBOX",), capabilities=[b"IMAP4rev1"])
    s.send(b"a SELECT {5}\r\n")
    assert s.toClient().startswith(b"a BAD")


def test_list_lsub_status_answers_about_other_mailboxes_are_removed():
    """Only the token's mailboxes are listed or counted; names as literals too; bodies untouched."""
    s = Session(readOnly=True, mailboxes=("INBOX", "Archive/%"), auto=False)
    s.send(b'a LIST "" "*" RETURN (STATUS (MESSAGES))\r\n')
    s.reply(
        b'* LIST (\\HasChildren) "/" INBOX\r\n'
        b"* STATUS INBOX (MESSAGES 3)\r\n"
        b'* LIST (\\HasNoChildren) "/" INBOXfoo\r\n'
        b"* STATUS INBOXfoo (MESSAGES 9)\r\n"
        b'* LIST () "/" {12}\r\nArchive/2020\r\n'
        b'* LIST () "/" {14}\r\nArchive/2020/1\r\n'
        b"* STATUS {7}\r\nSecrets (MESSAGES 1)\r\n"
        b'* LSUB () "/" Secrets\r\n'
        b"a OK done\r\n"
    )
    assert s.toClient() == (
        b'* LIST (\\HasChildren) "/" INBOX\r\n'
        b"* STATUS INBOX (MESSAGES 3)\r\n"
        b'* LIST () "/" {12}\r\nArchive/2020\r\n'
        b"a OK done\r\n"
    )
    s.send(b"b FETCH 1 BODY[]\r\n")
    body = b'* LIST () "/" Secrets\r\n* STATUS Secrets (MESSAGES 1)\r\n'
    s.reply(b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\nb OK\r\n" % (len(body), body))
    assert body in s.toClient()


def test_delimiter_is_learned_from_list_answers():
    """``%`` stops at the provider's own delimiter once a LIST answer has told it."""
    s = Session(readOnly=True, mailboxes=("Archive.%",), auto=False)
    s.send(b'a LIST "" ""\r\n')
    s.reply(b'* LIST (\\Noselect) "." ""\r\na OK\r\n')
    assert s.toClient() == b'* LIST (\\Noselect) "." ""\r\na OK\r\n'  # the delimiter query
    s.reply(b'* LIST () "." Archive.a.b\r\n* LIST () "." Archive.a\r\n')
    assert s.toClient() == b'* LIST () "." Archive.a\r\n'


def test_gmail_labels_are_not_for_mailbox_restricted_tokens():
    """X-GM-LABELS and X-GM-RAW name and reach other folders: refused, also after a literal."""
    s = Session(readOnly=True, mailboxes=("INBOX",))
    s.send(b"a FETCH 1 (X-GM-LABELS)\r\nb UID SEARCH X-GM-RAW in:Secrets\r\nc FETCH 1 FLAGS\r\n")
    assert s.provider.names == [b"FETCH"]
    assert s.refused == ["FETCH", "UID SEARCH"]
    s.send(b"d SEARCH TEXT {1+}\r\nx X-GM-RAW in:Secrets\r\n")
    assert s.toClient().endswith(b"* BYE This token may not use that command\r\n")
    assert s.provider.names == [b"FETCH"]


def test_mailbox_restricted_writes_inside_the_patterns_pass():
    """A token only restricted to INBOX may APPEND there (literal streamed), not elsewhere."""
    s = Session(readOnly=False, mailboxes=("INBOX",))
    s.send(b"a APPEND INBOX (\\Seen) {5}\r\n")
    assert s.toClient() == b"+ go on\r\n"
    s.send(b"hello\r\nb APPEND Junk {5}\r\n")
    assert sorted(s.toClient().splitlines(True)) == [b"a OK done\r\n", b"b " + NOT_THAT_MAILBOX]
    s.send(b'c APPEND INBOX CATENATE (URL "/Junk;UID=1/;SECTION=1")\r\n')
    assert s.toClient() == b"c NO [NOPERM] This token may not use that command\r\n"
    assert s.provider.raw == [b"a APPEND INBOX (\\Seen) {5}\r\nhello\r\n"]


def test_utf8_names_once_enabled():
    """After ENABLE UTF8=ACCEPT names are UTF-8 on the wire, an "&" no longer modified UTF-7."""
    s = Session(readOnly=True, mailboxes=("Tom & Jerry",))
    s.send(b"a ENABLE UTF8=ACCEPT\r\n")
    s.reply(b"* ENABLED UTF8=ACCEPT\r\n")
    s.send(b'b SELECT "Tom & Jerry"\r\nc SELECT "Tom &- Jerry"\r\n')
    assert s.provider.names == [b"ENABLE", b"EXAMINE"]
