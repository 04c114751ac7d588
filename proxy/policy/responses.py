"""
The provider's side of a restricted session: its responses, framed by
lines and literals (``imapframe.Scanner.stream``), so that a message body
holding ``* LIST`` is never taken for a response.

Almost everything passes as it comes, a literal piece by piece. Held whole
(bounded) and judged at their end are only the responses the policy
rewrites or removes: ``CAPABILITY`` (answers and response codes) and, for a
token restricted to some mailboxes, ``LIST``, ``LSUB`` and ``STATUS`` of
other mailboxes. The proxy's own answers (refusals) are put in only between
two whole responses, in the order they were given.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..model import Restrictions
from ..relay.imapframe import LINE, LITERAL, PART, Scanner
from . import commands
from .commands import CLOSE, OPEN, STRING, WORD, CommandSyntaxError
from .mailboxes import NotAName, Patterns, decodeName
from .readonly import filterCapabilities

#: Most bytes of a response held to be judged; a longer one is removed.
MAX_HELD = 16 * 1024
#: Longest mailbox name given as a literal that is read.
MAX_NAME = 1024

_PASS, _HOLD, _DROP = 0, 1, 2
_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_NAMED = (b"LIST", b"LSUB", b"STATUS", b"XLIST")


class ResponseFilter:
    """
    One direction: the provider's bytes in, the client's bytes out.

    :param write: where the client's bytes go.
    :param onContinuation: called after a ``+`` continuation request passed.
    :param onTagged: called with the tag after a tagged response passed.
    :param onDrained: called when the proxy's waiting answers have gone out.
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        restrictions: Restrictions,
        patterns: Patterns | None,
        onContinuation: Callable[[], object],
        onTagged: Callable[[bytes], object],
        onDrained: Callable[[], object] = lambda: None,
    ):
        self._write = write
        self.restrictions = restrictions
        self.patterns = patterns
        self._onContinuation = onContinuation
        self._onTagged = onTagged
        self._onDrained = onDrained
        self.scanner = Scanner()
        # Between two responses (as far as the client has seen).
        self.atStart = True
        self._mode = _PASS
        self._held: list[tuple[int, bytes]] = []
        self._heldSize = 0
        self._tag: bytes | None = None
        self._continuation = False
        self._pending: list[bytes] = []
        self._out: list[bytes] | None = None

    @property
    def pending(self) -> int:
        """How many of the proxy's own answers wait for a boundary."""
        return len(self._pending)

    def local(self, response: bytes) -> None:
        """The proxy's own whole response: now if between two responses, else at the next end."""
        if self.atStart:
            self._emit(response)
        else:
            self._pending.append(response)

    def _emit(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        else:
            self._write(data)

    def feed(self, data: bytes) -> None:
        if self._mode == _PASS and self.scanner.literal >= len(data) > 0:
            # Inside a literal that passes (a message body): as it is.
            self.scanner.literal -= len(data)
            self._write(data)
            return
        out = self._out = []
        try:
            for kind, piece in self.scanner.stream(data):
                if self.atStart:
                    self._begin(piece)
                if self._mode == _PASS:
                    out.append(piece)
                elif self._mode == _HOLD:
                    self._hold(kind, piece)
                if kind == LINE and self.scanner.atBoundary:
                    self._end()
        finally:
            self._out = None
            if out:
                self._write(b"".join(out))

    def _begin(self, head: bytes) -> None:
        """A response starts with ``head`` (its first line, or that line's first bytes)."""
        self.atStart = False
        self._mode = _PASS
        self._tag = None
        self._continuation = False
        first = head[:1]
        if first == b"+":
            self._continuation = True
            return
        if first != b"*" or head[1:2] != b" ":
            self._tag = head.split(b" ", 1)[0]
            if b"[CAPABILITY " in head[:256].upper():
                self._startHolding()
            return
        if head[2:3].isdigit():
            return  # "* 12 FETCH …", "* 3 EXISTS": message data, passed
        word = head[2:].split(b" ", 1)[0].rstrip(b"\r\n").upper()
        if word in (b"CAPABILITY", b"ENABLED") or b"[CAPABILITY " in head[:64].upper():
            self._startHolding()
        elif word in _NAMED and self.patterns is not None:
            self._startHolding()

    def _startHolding(self) -> None:
        self._mode = _HOLD
        self._held = []
        self._heldSize = 0

    def _hold(self, kind: int, piece: bytes) -> None:
        self._heldSize += len(piece)
        if kind == PART or self._heldSize > MAX_HELD:
            self._mode = _DROP
            self._held = []
            return
        self._held.append((kind, piece))

    def _end(self) -> None:
        """A response ended: judge it if held, then the proxy's waiting answers."""
        if self._mode == _HOLD:
            judged = self._judge(self._held)
            if judged is not None:
                self._emit(judged)
        self._held = []
        self._mode = _PASS
        self.atStart = True
        if self._pending:
            pending, self._pending = self._pending, []
            for response in pending:
                self._emit(response)
            self._onDrained()
        if self._continuation:
            self._onContinuation()
        elif self._tag is not None:
            self._onTagged(self._tag)

    def _judge(self, held: list[tuple[int, bytes]]) -> bytes | None:
        """What the client gets of a held response: all of it, rewritten, or nothing."""
        whole = b"".join(p for _, p in held)
        first = held[0][1]
        upper = first[:32].upper()
        if upper.startswith((b"* CAPABILITY", b"* ENABLED")) or b"[CAPABILITY " in first.upper():
            if len(held) != 1:
                return None  # a literal in there: nothing a server sends
        if upper.startswith(b"* CAPABILITY"):
            body = commands.body(first)
            eol = first[len(body) :]
            caps = filterCapabilities(body[12:].split(), self.restrictions)
            return b"* CAPABILITY " + b" ".join(caps) + eol
        if upper.startswith(b"* ENABLED"):
            if self.patterns is not None and b"UTF8=ACCEPT" in first.upper().split():
                self.patterns.utf8 = True
            return whole
        if b"[CAPABILITY " in first.upper():
            return _CODE.sub(self._codes, first, count=1)
        if self.patterns is None:
            return whole
        return whole if self._mailboxAllowed(held) else None

    def _codes(self, m: re.Match[bytes]) -> bytes:
        caps = filterCapabilities(m.group(1).split(), self.restrictions)
        return b"[CAPABILITY " + b" ".join(caps) + b"]"

    def _mailboxAllowed(self, held: list[tuple[int, bytes]]) -> bool:
        """A held LIST, LSUB or STATUS answer: whether it is about a mailbox of the token's."""
        assert self.patterns is not None
        try:
            tokens = _tokens(held)
        except (CommandSyntaxError, ValueError):
            return False
        if len(tokens) < 3 or tokens[1].kind != WORD:
            return False
        kind = tokens[1].value.upper()
        if kind == b"STATUS":
            nameToken = tokens[2]
        else:
            # "*" LIST "(" flags ")" delimiter name [extended data]
            try:
                close = next(i for i, t in enumerate(tokens) if t.kind == CLOSE)
            except StopIteration:
                return False
            if tokens[2].kind != OPEN or len(tokens) < close + 3:
                return False
            delimiter = tokens[close + 1]
            if delimiter.kind == STRING and len(delimiter.value) == 1:
                learned = delimiter.value.decode("ascii", "replace")
                if learned != self.patterns.delimiter:
                    self.patterns.delimiter = learned
            nameToken = tokens[close + 2]
        if kind != b"STATUS" and nameToken.kind == STRING and nameToken.value == b"":
            return True  # LIST "" "": the delimiter, no mailbox
        try:
            raw = commands.mailboxName(nameToken)
            name = decodeName(raw, self.patterns.utf8)
        except (CommandSyntaxError, NotAName):
            return False
        return self.patterns.allows(name)


def _tokens(held: list[tuple[int, bytes]]) -> list[commands.Token]:
    """The tokens of a whole held response: its line segments, its literals as strings."""
    tokens: list[commands.Token] = []
    depth = 0
    literal = bytearray()
    for i, (kind, piece) in enumerate(held):
        if kind == LITERAL:
            literal += piece
            if len(literal) > MAX_NAME:
                raise ValueError("literal too long")
            if i + 1 < len(held) and held[i + 1][0] == LITERAL:
                continue
            tokens.append(commands.Token(STRING, bytes(literal)))
            literal.clear()
            continue
        more, depth = commands.tokenize(commands.withoutAnnouncement(commands.body(piece)), depth)
        tokens.extend(more)
    return tokens
