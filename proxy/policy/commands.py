"""
Reading a logged-in client's commands well enough to judge them: the tag,
the command name (with its ``UID`` prefix), and the arguments the policy
needs (mailbox names), as pure functions.

The provider is the judge of the rest of a command's syntax; what this
module must get right is where a command *ends*: that a line which
announces a literal really announces one (outside a quoted string, at the
start of an argument), so that the bytes the proxy passes as a literal are
never read by the provider as a command. A line that leaves any doubt is
refused (``BAD``), never passed. Every error is a ``CommandSyntaxError``
with a fixed text: the client's input is never quoted back.
"""

from __future__ import annotations

import re

import attrs

# RFC 9051's character classes (as proxy.imap.syntax has them; not imported
# from there: the login side imports this package).
# ATOM-CHAR: any CHAR (7-bit, no NUL) except ( ) { SP CTL % * " \ ].
_NOT_ATOM = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
ATOM_CHARS = frozenset(range(1, 0x80)) - _NOT_ATOM
# ASTRING-CHAR adds resp-specials ("]"); a tag is an astring without "+".
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}


class CommandSyntaxError(Exception):
    """A command that does not parse. :ivar text: the fixed text after ``BAD``."""

    def __init__(self, text: bytes = b"Syntax error"):
        super().__init__(text)
        self.text = text


WORD = "word"
STRING = "string"  # quoted or literal
OPEN = "("
CLOSE = ")"

#: Deepest parenthesis nesting read in a command.
MAX_DEPTH = 16
#: Most arguments read for a decision (a decision needs the first few).
MAX_TOKENS = 64

BAD_TAG = CommandSyntaxError(b"Syntax error: Malformed tag")
NO_COMMAND = CommandSyntaxError(b"Missing command")
BAD_NAME = CommandSyntaxError(b"Syntax error: Malformed command name")
BAD_LITERAL = CommandSyntaxError(b"Syntax error: Malformed literal")
BAD_QUOTED = CommandSyntaxError(b"Syntax error: Malformed quoted string")
UNMATCHED = CommandSyntaxError(b"Syntax error: Unmatched quotes")
BAD_CHAR = CommandSyntaxError(b"Syntax error: Bad character")
TOO_DEEP = CommandSyntaxError(b"Syntax error: Too deeply nested")
TOO_MANY = CommandSyntaxError(b"Syntax error: Too many arguments")
SYNTAX = CommandSyntaxError(b"Syntax error")

# What the scanner takes for a literal announcement, at the end of a line
# (proxy.relay.imapframe): "{" digits ["+"] "}".
_ANNOUNCED = re.compile(rb"\{([0-9]{1,20})(\+?)\}\Z")
_NAME_CHARS = ATOM_CHARS


@attrs.frozen
class Token:
    kind: str
    value: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class Head:
    """
    The start of a command.

    :ivar name: the command name, upper case; ``UID FETCH`` for the UID forms.
    :ivar nameStart: where the (first) name starts in the line, for rewriting.
    :ivar argsStart: where the arguments start (at their SP), or the line's end.
    """

    tag: bytes
    name: bytes
    nameStart: int
    nameEnd: int
    argsStart: int


def body(segment: bytes) -> bytes:
    """A line segment without its line end (CRLF or a bare LF)."""
    if segment.endswith(b"\r\n"):
        return segment[:-2]
    if segment.endswith(b"\n"):
        return segment[:-1]
    return segment


def parseHead(line: bytes) -> Head:
    """
    The tag and the command name of a command's first line (its body).
    Strict: one SP between them, the characters RFC 9051 allows.

    :raise CommandSyntaxError: an empty line, a bad tag or name.
    """
    sp = line.find(b" ")
    tag = line if sp < 0 else line[:sp]
    if not tag or not all(c in TAG_CHARS for c in tag):
        raise BAD_TAG
    if sp < 0 or sp + 1 == len(line):
        raise NO_COMMAND
    start = sp + 1
    end = first = _nameEnd(line, start)
    name = line[start:end].upper()
    if name == b"UID":
        if end == len(line) or line[end] != 0x20:
            raise NO_COMMAND
        subEnd = _nameEnd(line, end + 1)
        name = b"UID " + line[end + 1 : subEnd].upper()
        end = subEnd
    if end < len(line) and line[end] != 0x20:
        raise BAD_NAME
    return Head(tag, name, start, first, end)


def _nameEnd(line: bytes, start: int) -> int:
    end = start
    while end < len(line) and line[end] in _NAME_CHARS:
        end += 1
    if end == start:
        raise BAD_NAME
    return end


def announced(piece: bytes) -> tuple[int, bool] | None:
    """The literal ``piece`` (a line body) announces at its end: (size, synchronizing)."""
    m = _ANNOUNCED.search(piece, max(0, len(piece) - 24))
    if m is None:
        return None
    return int(m.group(1)), not m.group(2)


def checkLine(piece: bytes) -> None:
    """
    Make sure of where ``piece`` (a line body, or the arguments part of a
    first line) ends: no CR or NUL inside, no quoted string left open, and a
    literal announcement at its end only where an argument starts (after
    SP, "(" or a BINARY "~"), outside quotes. A line that ends in "}"
    without announcing a literal is refused too: a server reading it as one
    would take the next bytes for data where the proxy saw commands.

    :raise CommandSyntaxError: any doubt.
    """
    if b"\r" in piece or b"\x00" in piece:
        raise BAD_CHAR
    lit = _ANNOUNCED.search(piece, max(0, len(piece) - 24))
    if lit is None:
        if piece.endswith(b"}"):
            raise BAD_LITERAL
        return
    end = lit.start()
    i = piece.find(b'"', 0, end)
    while i >= 0:
        i = _skipQuoted(piece, i + 1, end)
        i = piece.find(b'"', i, end)
    before = piece[:end]
    if before.endswith(b"~"):
        before = before[:-1]
    if before[-1:] not in (b" ", b"("):
        raise BAD_LITERAL


def _skipQuoted(piece: bytes, i: int, end: int) -> int:
    """The index after the quoted string whose body starts at ``i``."""
    while True:
        close = piece.find(b'"', i, end)
        if close < 0:
            raise UNMATCHED
        slash = piece.find(b"\\", i, close)
        if slash < 0:
            return close + 1
        if piece[slash + 1] not in (0x22, 0x5C) or slash + 2 > end:
            raise BAD_QUOTED
        i = slash + 2


def tokenize(piece: bytes, depth: int = 0) -> tuple[list[Token], int]:
    """
    The arguments in ``piece`` (a line body from the first argument's SP,
    or after a literal; any literal announcement at its end removed).
    Lenient about what it need not judge: a word is any run of bytes up to
    SP or a parenthesis; quoted strings are read strictly.

    :param depth: the parenthesis depth ``piece`` starts at.
    :return: the tokens and the depth at its end.
    :raise CommandSyntaxError: a bad quoted string, nesting too deep.
    """
    tokens: list[Token] = []
    i, n = 0, len(piece)
    while i < n:
        c = piece[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # "("
            depth += 1
            if depth > MAX_DEPTH:
                raise TOO_DEEP
            tokens.append(Token(OPEN))
            i += 1
        elif c == 0x29:  # ")"
            depth -= 1
            tokens.append(Token(CLOSE))
            i += 1
        elif c == 0x22:
            value, i = _quoted(piece, i + 1)
            tokens.append(Token(STRING, value))
        else:
            start = i
            while i < n and piece[i] not in (0x20, 0x28, 0x29, 0x22):
                i += 1
            tokens.append(Token(WORD, piece[start:i]))
        if len(tokens) > MAX_TOKENS:
            raise TOO_MANY
    return tokens, depth


def _quoted(piece: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    n = len(piece)
    while i < n:
        c = piece[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:
            if i + 1 == n or piece[i + 1] not in (0x22, 0x5C):
                raise BAD_QUOTED
            out.append(piece[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    raise UNMATCHED


def withoutAnnouncement(piece: bytes) -> bytes:
    """``piece`` without the literal announcement at its end (and a BINARY "~")."""
    m = _ANNOUNCED.search(piece, max(0, len(piece) - 24))
    if m is None:
        return piece
    rest = piece[: m.start()]
    return rest[:-1] if rest.endswith(b"~") else rest


def mailboxName(token: Token) -> bytes:
    """
    A mailbox argument (an astring) as sent: a quoted string or literal as
    is, a word only if it is made of ASTRING-CHARs.

    :raise CommandSyntaxError: anything else (a list, a wildcard, 8-bit bytes).
    """
    if token.kind == STRING:
        return token.value
    if token.kind == WORD and token.value and all(c in ASTRING_CHARS for c in token.value):
        return token.value
    raise SYNTAX
