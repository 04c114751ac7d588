"""
What a restricted token may ask: the allow-list of commands, which of
their arguments name mailboxes, ``SELECT`` made ``EXAMINE``, and which
capabilities a client is told. Pure data and functions.

An allow-list, never a deny-list: a command or a capability this module
does not know is refused (resp. not announced), so a new extension cannot
open a way around the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from ..model import Restrictions
from . import commands
from .commands import OPEN, WORD, CommandSyntaxError, Token
from .mailboxes import Patterns

READ_ONLY = b"[NOPERM] This token is read-only"
NOT_THAT_MAILBOX = b"[NOPERM] This token may not use that mailbox"
NOT_THAT_COMMAND = b"[NOPERM] This token may not use that command"
NOT_THAT_EXTENSION = b"[NOPERM] This token may not enable that extension"

#: Commands that cannot change a mailbox (``SELECT`` only as ``EXAMINE``:
#: then ``FETCH BODY[]`` sets no ``\Seen``, ``CLOSE`` expunges nothing and
#: the server refuses ``STORE`` and ``EXPUNGE`` itself).
READ = frozenset(
    {
        b"CAPABILITY", b"NOOP", b"LOGOUT", b"SELECT", b"EXAMINE", b"LIST", b"LSUB",
        b"STATUS", b"FETCH", b"UID FETCH", b"SEARCH", b"UID SEARCH", b"SORT",
        b"UID SORT", b"THREAD", b"UID THREAD", b"CHECK", b"CLOSE", b"UNSELECT",
        b"IDLE", b"NAMESPACE", b"ID", b"ENABLE", b"GETQUOTA", b"GETQUOTAROOT",
        b"GETACL", b"MYRIGHTS", b"LISTRIGHTS", b"GETMETADATA", b"ESEARCH",
    }
)  # fmt: skip

#: Commands that change mailboxes, which a token that is only restricted to
#: some mailboxes may send (their mailbox arguments checked).
WRITE = frozenset(
    {
        b"APPEND", b"STORE", b"UID STORE", b"COPY", b"UID COPY", b"MOVE", b"UID MOVE",
        b"EXPUNGE", b"UID EXPUNGE", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE",
        b"UNSUBSCRIBE", b"SETACL", b"DELETEACL", b"SETMETADATA",
    }
)  # fmt: skip

#: Commands that reach past the mailboxes they name (multi-mailbox search
#: with its "personal"/"subtree" sources): refused to a mailbox-restricted token.
ACROSS_MAILBOXES = frozenset({b"ESEARCH"})


def _first(tokens: Sequence[Token]) -> tuple[int, ...]:
    return (0,)


def _both(tokens: Sequence[Token]) -> tuple[int, ...]:
    return (0, 1)


def _second(tokens: Sequence[Token]) -> tuple[int, ...]:
    return (1,)


def _afterOptions(tokens: Sequence[Token]) -> tuple[int, ...] | None:
    """``GETMETADATA [(options)] mailbox …``: the mailbox after the options list."""
    if not tokens:
        return None
    if tokens[0].kind != OPEN:
        return (0,)
    depth = 0
    for i, t in enumerate(tokens):
        depth += 1 if t.kind == OPEN else -1 if t.kind == commands.CLOSE else 0
        if depth == 0:
            return (i + 1,)
    return None


#: Which arguments (indexes among the command's tokens) name mailboxes;
#: None from the function: not known yet (more tokens needed).
MAILBOX_ARGS: dict[bytes, Callable[[Sequence[Token]], tuple[int, ...] | None]] = {
    b"SELECT": _first,
    b"EXAMINE": _first,
    b"STATUS": _first,
    b"CREATE": _first,
    b"DELETE": _first,
    b"SUBSCRIBE": _first,
    b"UNSUBSCRIBE": _first,
    b"GETQUOTAROOT": _first,
    b"GETACL": _first,
    b"MYRIGHTS": _first,
    b"LISTRIGHTS": _first,
    b"SETACL": _first,
    b"DELETEACL": _first,
    b"APPEND": _first,
    b"SETMETADATA": _first,
    b"RENAME": _both,
    b"COPY": _second,
    b"UID COPY": _second,
    b"MOVE": _second,
    b"UID MOVE": _second,
    b"GETMETADATA": _afterOptions,
}

#: What ``ENABLE`` may turn on: extensions that change only how answers look.
ENABLE_SAFE = frozenset({b"CONDSTORE", b"QRESYNC", b"UTF8=ACCEPT", b"IMAP4REV2"})


@attrs.frozen
class Verdict:
    """
    :ivar refusal: the text after ``tag NO`` (or ``BAD`` when ``bad``); None: pass it.
    :ivar rewrite: the command name to send instead (``EXAMINE`` for ``SELECT``).
    """

    refusal: bytes | None = None
    bad: bool = False
    rewrite: bytes | None = None


PASS = Verdict()


def judge(
    name: bytes,
    tokens: Sequence[Token],
    complete: bool,
    restrictions: Restrictions,
    patterns: Patterns | None,
) -> Verdict | None:
    """
    Whether a command may go to the provider.

    :param tokens: its arguments read so far.
    :param complete: no more arguments will come (no literal announced).
    :return: the verdict, or None while the arguments it depends on
        (mailbox names given as literals) have not come yet.
    """
    if name in ACROSS_MAILBOXES and patterns is not None:
        return Verdict(NOT_THAT_COMMAND)
    if name in WRITE:
        if restrictions.readOnly:
            return Verdict(READ_ONLY)
    elif name not in READ:
        return Verdict(READ_ONLY if restrictions.readOnly else NOT_THAT_COMMAND)
    rewrite = b"EXAMINE" if restrictions.readOnly and name == b"SELECT" else None
    if name == b"ENABLE":
        if not complete:
            return Verdict(NOT_THAT_EXTENSION)
        for t in tokens:
            if t.kind != WORD or t.value.upper() not in ENABLE_SAFE:
                return Verdict(NOT_THAT_EXTENSION)
    where = MAILBOX_ARGS.get(name) if patterns is not None else None
    if where is None:
        return Verdict(rewrite=rewrite)
    assert patterns is not None
    positions = where(tokens)
    if positions is None or max(positions) >= len(tokens):
        if complete:
            return Verdict(b"Syntax error: Missing argument", bad=True)
        return None
    for i in positions:
        try:
            raw = commands.mailboxName(tokens[i])
        except CommandSyntaxError as e:
            return Verdict(e.text, bad=True)
        if not patterns.allowsRaw(raw):
            return Verdict(NOT_THAT_MAILBOX)
    return Verdict(rewrite=rewrite)


# -- capabilities -------------------------------------------------------------

#: Capabilities a restricted session may be told: the proxy polices what
#: they allow, or they change only how answers look. Upper case; a
#: ``NAME=`` entry allows every value.
_SAFE = frozenset(
    {
        b"IMAP4REV1", b"IMAP4REV2", b"LITERAL+", b"LITERAL-", b"IDLE", b"NAMESPACE",
        b"ID", b"CHILDREN", b"UIDPLUS", b"UNSELECT", b"ENABLE", b"CONDSTORE",
        b"QRESYNC", b"ESEARCH", b"SEARCHRES", b"SORT", b"SORT=DISPLAY", b"ESORT",
        b"LIST-EXTENDED", b"LIST-STATUS", b"SPECIAL-USE", b"QUOTA", b"ACL",
        b"METADATA", b"METADATA-SERVER", b"UTF8=ACCEPT", b"BINARY", b"WITHIN",
        b"STATUS=SIZE", b"SAVEDATE", b"OBJECTID", b"PREVIEW", b"LIST-MYRIGHTS",
        b"SEARCH=FUZZY", b"X-GM-EXT-1", b"MOVE", b"MULTIAPPEND", b"APPENDLIMIT",
        b"CREATE-SPECIAL-USE", b"MULTISEARCH",
    }
)  # fmt: skip
_SAFE_PREFIXES = (b"THREAD=", b"RIGHTS=", b"QUOTA=", b"I18NLEVEL=", b"APPENDLIMIT=")
#: Only for tokens that may write.
_WRITES = frozenset({b"MOVE", b"MULTIAPPEND", b"APPENDLIMIT", b"CREATE-SPECIAL-USE", b"UIDPLUS"})
#: Not for tokens restricted to some mailboxes: Gmail's labels name other
#: folders; a multi-mailbox search reaches past the patterns.
_ACROSS = frozenset({b"X-GM-EXT-1", b"MULTISEARCH"})


def filterCapabilities(caps: list[bytes], restrictions: Restrictions | None) -> list[bytes]:
    """
    The capabilities a client of a restricted token is told, in the
    provider's order and spelling: those the proxy can police (COMPRESS,
    NOTIFY, CATENATE, URLAUTH and anything unknown are left out).
    Unrestricted: ``caps`` unchanged.
    """
    if not restrictions:
        return list(caps)
    kept = []
    for cap in caps:
        upper = cap.upper()
        base = upper.split(b"=", 1)[0] if upper.startswith(_SAFE_PREFIXES) else upper
        if upper not in _SAFE and not upper.startswith(_SAFE_PREFIXES):
            continue
        if restrictions.readOnly and (base in _WRITES or upper in _WRITES):
            continue
        if restrictions.mailboxes and upper in _ACROSS:
            continue
        kept.append(cap)
    return kept
