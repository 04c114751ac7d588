"""
The policy's pure parts: command heads and where a line ends
(``proxy.policy.commands``), mailbox patterns and modified UTF-7
(``mailboxes``), the allow-list and capability filter (``readonly``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.model import Restrictions
from proxy.policy import commands as c
from proxy.policy import filterCapabilities
from proxy.policy.mailboxes import NotAName, Patterns, decodeModifiedUTF7, decodeName
from proxy.policy.readonly import judge

RO = Restrictions(readOnly=True)


# -- command heads ---------------------------------------------------------------


def test_head_with_uid_prefix():
    """``UID STORE`` is one command name; the name's place is kept for rewriting."""
    head = c.parseHead(b"a7 uid store 1:* +FLAGS (\\Seen)")
    assert (head.tag, head.name) == (b"a7", b"UID STORE")
    assert b"a7 uid store 1:* +FLAGS (\\Seen)"[head.nameStart : head.nameEnd] == b"uid"


@pytest.mark.parametrize(
    "line",
    [b"", b"a", b"a ", b"* NOOP", b"a+ NOOP", b"a  NOOP", b"a NO\x00OP", b"a UID", b"a UID  FETCH"],
)
def test_malformed_heads_are_refused(line):
    """A head the provider might read otherwise is a syntax error, never guessed at."""
    with pytest.raises(c.CommandSyntaxError):
        c.parseHead(line)


@pytest.mark.parametrize(
    "line",
    [
        b'a SEARCH SUBJECT "x {5}',  # inside an open quoted string
        b"a NOOP x{5}",  # inside an atom
        b"a NOOP }",  # ends in "}" without a literal
        b"a NOOP x\r{5}",  # a CR inside the line
        b'a SEARCH SUBJECT "a\\x" {5}',  # a bad escape before it
    ],
)
def test_doubtful_literal_announcements_are_refused(line):
    """Where the proxy and a server could disagree on where a command ends, it is refused."""
    with pytest.raises(c.CommandSyntaxError):
        c.checkLine(line)


@pytest.mark.parametrize(
    "line",
    [
        b"a SEARCH TEXT {5}",
        b"a SEARCH TEXT {5+}",
        b"a APPEND INBOX (\\Seen) ~{5}",
        b'a SEARCH SUBJECT "a \\"{5}\\"" TEXT {5}',
        b"a LOGIN ({5}",
        b"a FETCH 1 (BODY[])",
    ],
)
def test_plain_lines_pass_the_check(line):
    """Literals where an argument starts, quoted strings with escapes: fine."""
    c.checkLine(line)


def test_character_classes_are_the_login_sides():
    """The policy reads tags and atoms as the pre-auth parser does."""
    from proxy.imap import syntax

    assert c.TAG_CHARS == syntax.TAG_CHARS and c.ASTRING_CHARS == syntax.ASTRING_CHARS


def test_tokenize_is_strict_on_quoted_and_bounded():
    """Quoted strings with their escapes; nesting past the bound is refused."""
    tokens, depth = c.tokenize(b' "a\\"b" (x (y)) z')
    assert [t.kind for t in tokens] == ["string", "(", "word", "(", "word", ")", ")", "word"]
    assert tokens[0].value == b'a"b' and depth == 0
    with pytest.raises(c.CommandSyntaxError):
        c.tokenize(b" " + b"(" * (c.MAX_DEPTH + 1))


# -- mailboxes ---------------------------------------------------------------------


def test_modified_utf7():
    """RFC 3501's example names decode; ``&-`` is ``&``; bad forms are no name."""
    assert decodeModifiedUTF7(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert decodeModifiedUTF7(b"Tom &- Jerry") == "Tom & Jerry"
    for bad in (b"&", b"&U,BTFw", b"&!!-", b"a\x01b"):
        with pytest.raises(NotAName):
            decodeModifiedUTF7(bad)


def test_decode_name_utf8_and_inbox():
    """8-bit names are UTF-8 (UTF8=ACCEPT); INBOX in any case is INBOX, and only INBOX."""
    assert decodeName("Bücher".encode()) == "Bücher"
    assert decodeName(b"iNbOx") == "INBOX"
    assert decodeName(b"inbox/x") == "inbox/x"


@pytest.mark.parametrize(
    "patterns, allowed, refused",
    [
        (("INBOX",), [b"INBOX", b"inbox", b'"InBoX"'], [b"INBOXfoo", b"INBOX/x", b"Archive"]),
        (("Archive",), [b"Archive"], [b"Archive2", b"archive", b"Archive/2020", b"MyArchive"]),
        (("Archive/*",), [b"Archive/2020", b"Archive/2020/01"], [b"Archive", b"Archive2/x"]),
        (("Archive/%",), [b"Archive/2020"], [b"Archive/2020/01", b"Archive"]),
        (("Bücher",), [b"B&APw-cher", "Bücher".encode()], [b"Bucher", b"B&APw-cher2"]),
        (("B&APw-cher",), [b"B&APw-cher", "Bücher".encode()], [b"B&APw-chers"]),
        (("*",), [b"anything/at/all", b"INBOX"], [b"&bad"]),
        (("a.b",), [b"a.b"], [b"axb"]),
    ],
)
def test_patterns(patterns, allowed, refused):
    """LIST wildcards, substrings, case, modified UTF-7 and UTF-8 written patterns."""
    p = Patterns(patterns)
    for raw in allowed:
        assert p.allowsRaw(raw.strip(b'"')), raw
    for raw in refused:
        assert not p.allowsRaw(raw), raw


def test_percent_follows_the_providers_delimiter():
    """``%`` stops at the delimiter the provider uses, once known."""
    p = Patterns(("Archive.%",))
    assert p.allowsRaw(b"Archive.a.b") and not p.allowsRaw(b"Archive.a/b")
    p.delimiter = "."
    assert p.allowsRaw(b"Archive.a") and not p.allowsRaw(b"Archive.a.b")


@given(st.text(max_size=20))
def test_decoding_never_raises_anything_else(text):
    """Any bytes: a name or NotAName, nothing else."""
    for raw in (text.encode("utf-8"), text.encode("utf-8", "replace").replace(b"?", b"&")):
        try:
            decodeName(raw)
        except NotAName:
            pass


# -- the allow-list ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"APPEND", b"STORE", b"COPY", b"MOVE", b"EXPUNGE", b"UID EXPUNGE", b"CREATE", b"DELETE"]
    + [b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE", b"SETACL", b"DELETEACL", b"SETMETADATA"]
    + [b"SETQUOTA", b"UID STORE", b"UID COPY", b"UID MOVE", b"XYZZY", b"AUTHENTICATE"]
    + [b"COMPRESS", b"NOTIFY", b"STARTTLS", b"UID XYZZY", b"GENURLAUTH"],
)
def test_read_only_refuses_every_write_and_unknown(name):
    """An allow-list: writes and anything unknown are read-only refusals."""
    verdict = judge(name, [], True, RO, None)
    assert verdict is not None and verdict.refusal == b"[NOPERM] This token is read-only"


def test_read_only_select_becomes_examine():
    """SELECT passes as EXAMINE; FETCH and the other reads pass as they are."""
    assert judge(b"SELECT", [], True, RO, None).rewrite == b"EXAMINE"  # type: ignore[union-attr]
    for name in (b"FETCH", b"UID FETCH", b"EXAMINE", b"SEARCH", b"IDLE", b"CLOSE", b"STATUS"):
        assert judge(name, [], True, RO, None) == judge(b"NOOP", [], True, RO, None)


def test_enable_only_known_safe_extensions():
    """ENABLE CONDSTORE passes; ENABLE of anything else is refused."""
    word = c.Token(c.WORD, b"condstore")
    assert judge(b"ENABLE", [word], True, RO, None).refusal is None  # type: ignore[union-attr]
    other = c.Token(c.WORD, b"NOTIFY")
    assert judge(b"ENABLE", [word, other], True, RO, None).refusal  # type: ignore[union-attr]


def test_mailbox_arguments_are_checked():
    """Each mailbox a command names, RENAME's both, COPY's target, GETMETADATA's after options."""
    r = Restrictions(mailboxes=("INBOX",))
    p = Patterns(r.mailboxes)

    def verdict(name, *args):
        tokens, _ = c.tokenize(b" " + b" ".join(args))
        return judge(name, tokens, True, r, p)

    assert verdict(b"SELECT", b"INBOX").refusal is None
    assert verdict(b"SELECT", b"Junk").refusal == b"[NOPERM] This token may not use that mailbox"
    assert verdict(b"RENAME", b"INBOX", b"Junk").refusal
    assert verdict(b"UID COPY", b"1:*", b"INBOX").refusal is None
    assert verdict(b"UID MOVE", b"1:*", b'"Junk"').refusal
    assert verdict(b"GETMETADATA", b"(DEPTH 1)", b"INBOX", b"/private/x").refusal is None
    assert verdict(b"GETMETADATA", b"(DEPTH 1)", b"Junk", b"/private/x").refusal
    assert verdict(b"STORE", b"1", b"+FLAGS", b"x").refusal is None  # not read-only
    assert verdict(b"ESEARCH", b"IN", b"(personal)").refusal  # reaches past the patterns
    assert verdict(b"SELECT").bad  # missing mailbox
    assert verdict(b"SELECT", b"IN*").bad  # a wildcard is no mailbox name
    assert judge(b"SELECT", [], False, r, p) is None  # the name comes as a literal


# -- capabilities -----------------------------------------------------------------


def test_filter_capabilities():
    """What cannot be policed goes; unknown goes; write-only extensions go for read-only."""
    caps = [b"IMAP4rev1", b"LITERAL+", b"COMPRESS=DEFLATE", b"NOTIFY", b"CATENATE", b"URLAUTH"]
    caps += [b"IDLE", b"MOVE", b"X-UNKNOWN", b"THREAD=REFERENCES", b"APPENDLIMIT=35651584"]
    caps += [b"X-GM-EXT-1", b"AUTH=PLAIN", b"STARTTLS", b"UTF8=ACCEPT"]
    assert filterCapabilities(caps, RO) == [
        b"IMAP4rev1", b"LITERAL+", b"IDLE", b"THREAD=REFERENCES", b"X-GM-EXT-1", b"UTF8=ACCEPT"
    ]  # fmt: skip
    mailboxOnly = filterCapabilities(caps, Restrictions(mailboxes=("INBOX",)))
    assert b"MOVE" in mailboxOnly and b"X-GM-EXT-1" not in mailboxOnly
    assert filterCapabilities(caps, None) == caps
    assert filterCapabilities(caps, Restrictions()) == caps
