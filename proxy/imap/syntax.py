"""
The grammar of the few commands the pre-auth server answers (RFC 9051 and
RFC 3501, section 9): tags, atoms, quoted strings, literals and
parenthesised lists, parsed strictly, as pure functions.

Every error is a :class:`CommandSyntaxError` carrying a fixed text: the
client's input (which may hold a token) is never quoted back, and no input
makes these functions raise anything else (the fuzz test holds them to it).
"""

from __future__ import annotations

import re

import attrs

# ATOM-CHAR: any CHAR (7-bit, no NUL) except ( ) { SP CTL % * " \ ].
_NOT_ATOM = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
ATOM_CHARS = frozenset(range(1, 0x80)) - _NOT_ATOM
# ASTRING-CHAR adds resp-specials ("]"); a tag is an astring without "+".
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}

# "{" number "}" or "{" number "+}" ending the line, and nothing else.
_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}\Z")
# A literal's size is a number of at most 10 digits (number64 needs more,
# but nothing a pre-auth command takes comes near it).
_MAX_DIGITS = 10

ATOM = "atom"
STRING = "string"  # quoted or literal
OPEN = "("
CLOSE = ")"


class CommandSyntaxError(Exception):
    """
    A command that does not parse. :ivar text: the fixed text after ``BAD``.
    """

    def __init__(self, text: bytes = b"Syntax error"):
        super().__init__(text)
        self.text = text


MISSING = CommandSyntaxError(b"Syntax error: Missing argument")
TOO_MANY = CommandSyntaxError(b"Syntax error: Too many arguments")
UNMATCHED = CommandSyntaxError(b"Syntax error: Unmatched quotes")
BAD_QUOTED = CommandSyntaxError(b"Syntax error: Malformed quoted string")
BAD_ATOM = CommandSyntaxError(b"Syntax error: Malformed atom")
BAD_SIZE = CommandSyntaxError(b"Syntax error: Bad literal size")
BAD_LITERAL = CommandSyntaxError(b"Syntax error: Malformed literal")
TOO_LONG = CommandSyntaxError(b"Syntax error: Literal too long")
SYNTAX = CommandSyntaxError(b"Syntax error")


@attrs.frozen
class Token:
    kind: str
    value: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class Literal:
    """A literal announced at the end of a line: ``{size}`` or ``{size+}``."""

    size: int
    synchronizing: bool


def splitCommand(line: bytes) -> tuple[bytes, bytes, bytes]:
    """
    :return: the tag, the command name (upper case) and the rest of the line
        (starting with its SP, or empty).
    :raise CommandSyntaxError: for an empty line or a malformed tag.
    """
    tag, _sp, rest = line.partition(b" ")
    if not tag:
        raise CommandSyntaxError(b"Missing command")
    if not all(c in TAG_CHARS for c in tag):
        raise CommandSyntaxError(b"Syntax error: Malformed tag")
    name, sp, args = rest.partition(b" ")
    return tag, name.upper(), sp + args


def trailingLiteral(piece: bytes) -> Literal | None:
    """
    The literal a line announces at its end, whatever comes before it: for
    skipping the literals of a command that is refused anyway.

    :raise CommandSyntaxError: ``{…}`` at the end that is not a literal.
    """
    start = piece.rfind(b"{")
    if start == -1 or not piece.endswith(b"}"):
        return None
    return _literal(piece[start:])


def _literal(text: bytes) -> Literal:
    m = _LITERAL.match(text)
    if m is None:
        raise BAD_SIZE if text.endswith(b"}") else BAD_LITERAL
    digits = m.group(1)
    if len(digits) > _MAX_DIGITS:
        raise TOO_LONG
    return Literal(int(digits), not m.group(2))


def tokenize(piece: bytes) -> tuple[list[Token], Literal | None]:
    """
    Parse one piece of a command's arguments: from after the command name,
    or from after a literal's data, to the end of that line.

    Arguments are separated by one SP; a parenthesised list needs none after
    its "(" or before its ")". A literal may only end the piece.

    :return: the tokens and the literal announced at the end, if any.
    :raise CommandSyntaxError: with the fixed text for what is wrong.
    """
    tokens: list[Token] = []
    i, n = 0, len(piece)
    needSpace = True
    while i < n:
        c = piece[i]
        if c == 0x29:  # ")"
            tokens.append(Token(CLOSE))
            i += 1
            needSpace = True
            continue
        if needSpace:
            if c != 0x20 or i + 1 == n:
                raise SYNTAX
            i += 1
            needSpace = False
            continue
        if c == 0x20:  # a second SP
            raise SYNTAX
        if c == 0x28:  # "("
            tokens.append(Token(OPEN))
            i += 1
        elif c == 0x22:  # '"'
            value, i = _quoted(piece, i + 1)
            tokens.append(Token(STRING, value))
            needSpace = True
        elif c == 0x7B:  # "{"
            return tokens, _literal(piece[i:])
        else:
            start = i
            while i < n and piece[i] in ASTRING_CHARS:
                i += 1
            if i == start or (i < n and piece[i] not in (0x20, 0x29)):
                raise BAD_ATOM
            tokens.append(Token(ATOM, piece[start:i]))
            needSpace = True
    return tokens, None


def _quoted(piece: bytes, i: int) -> tuple[bytes, int]:
    """The quoted string starting after its '"' at ``i``; :return: it and the index after it."""
    out = bytearray()
    n = len(piece)
    while i < n:
        c = piece[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:  # backslash: only \" and \\ are quoted-specials
            if i + 1 == n or piece[i + 1] not in (0x22, 0x5C):
                raise BAD_QUOTED
            out.append(piece[i + 1])
            i += 2
            continue
        if c in (0x00, 0x0A, 0x0D):
            raise BAD_QUOTED
        out.append(c)  # 8-bit bytes: RFC 9051 allows UTF-8 here
        i += 1
    raise UNMATCHED


# -- the arguments of each pre-auth command ---------------------------------


def noArguments(tokens: list[Token]) -> tuple[()]:
    if tokens:
        raise TOO_MANY
    return ()


def loginArguments(tokens: list[Token]) -> tuple[bytes, bytes]:
    """``LOGIN SP userid SP password``, each an astring."""
    for t in tokens[:2]:
        if t.kind not in (ATOM, STRING):
            raise SYNTAX
    if len(tokens) < 2:
        raise MISSING
    if len(tokens) > 2:
        raise TOO_MANY
    return tokens[0].value, tokens[1].value


def authenticateArguments(tokens: list[Token]) -> tuple[bytes, bytes | None]:
    """``AUTHENTICATE SP auth-type [SP (base64 / "=")]``."""
    if not tokens:
        raise MISSING
    if len(tokens) > 2:
        raise TOO_MANY
    if any(t.kind != ATOM or b"]" in t.value for t in tokens):
        raise BAD_ATOM
    return tokens[0].value, tokens[1].value if len(tokens) == 2 else None


def idArguments(tokens: list[Token]) -> tuple[()]:
    """``ID SP ("(" *(string SP nstring) ")" / nil)``; the values are not kept."""
    if not tokens:
        raise MISSING
    if len(tokens) == 1 and tokens[0].kind == ATOM and tokens[0].value.upper() == b"NIL":
        return ()
    if tokens[0].kind != OPEN or tokens[-1].kind != CLOSE:
        raise SYNTAX
    inner = tokens[1:-1]
    if len(inner) % 2 or any(
        t.kind not in (ATOM, STRING) or (t.kind == ATOM and t.value.upper() != b"NIL")
        for t in inner
    ):
        raise SYNTAX
    return ()


# Which commands take literals (their arguments are strings).
TAKES_LITERALS = frozenset({b"LOGIN", b"ID"})

# Most arguments a command may have, for refusing early (before more
# continuations are sent for a command that is already too long).
# ID: RFC 2971 allows 30 field-value pairs, in parentheses.
MAX_TOKENS = {b"LOGIN": 2, b"AUTHENTICATE": 2, b"ID": 62}
