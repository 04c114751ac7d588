"""
Following an IMAP stream (a client's commands or a server's responses) as
line segments and literal payloads, without ever holding a literal.

In both directions IMAP is made of lines ending in CRLF; a line that ends in
``{n}``, ``{n+}`` or ``~{n}`` (RFC 3501, 7888, 3516) announces ``n`` bytes
of literal, after which the same command or response goes on with another
line segment. A command or a response is whole when a line segment ends
without announcing a literal: that is a *boundary*, the only place where
another response (an untagged ``* BYE``, say) may be put into the stream
without corrupting it, and where a command is known to be complete.

``Scanner.skim`` keeps only the state (cheap enough for the byte relay: a
``find`` a line and nothing a literal byte); ``Scanner.feed`` also hands out
the pieces, for code that reads commands or responses. ``skim`` can also
hand out the first bytes of each command or response (``onStart``): enough
to tell a tagged response from an untagged one, or an ``IDLE`` command.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

#: A line segment, CRLF included.
LINE = 0
#: A piece of a literal's payload (a literal may come in several pieces).
LITERAL = 1
#: The head of a line longer than ``maxLine`` (``stream`` only): its end
#: comes later as a ``LINE`` piece.
PART = 2

#: The longest line segment ``feed`` hands out whole (the pre-auth side's
#: bound); ``skim`` has no bound, it keeps only a line's last bytes.
MAX_LINE = 64 * 1024

# "{" 20 digits "+}" CR LF: the longest announcement, and what skim keeps.
_TAIL = 26
# An announcement anywhere (it ends its line), and a line that begins a
# tagged command or response (after a line that announced nothing).
_ANNOUNCEMENT = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?\n")
_TAGGED_START = re.compile(rb"\n[^*+\r\n]")
_UNTAGGED = b"*+\r\n"
#: How many of the first bytes of a command or response ``onStart`` gets.
HEAD = 32
_ANNOUNCED = re.compile(rb"\{([0-9]{1,20})(\+?)\}\r?\n\Z")


def _announcement(data: bytes, pos: int) -> re.Match[bytes] | None:
    """The first literal announcement in ``data`` from ``pos`` (a ``find`` a ``}``)."""
    close = data.find(b"}", pos)
    while close >= 0:
        opening = data.rfind(b"{", max(pos, close - 21), close)
        if opening >= 0:
            m = _ANNOUNCEMENT.match(data, opening)
            if m is not None:
                return m
        close = data.find(b"}", close + 1)
    return None


class LineTooLong(Exception):
    """A line segment went past ``maxLine`` before its CRLF."""


class Scanner:
    """
    The framing state of one direction of one IMAP connection.

    :ivar atBoundary: the stream so far ends with a whole command or
        response (true before anything is read).
    :ivar literal: bytes of the current literal still to come (0: none).
    :ivar announced: the size announced by the last line segment handed
        out or skimmed, None when it announced none.
    :ivar nonSynchronizing: that announcement was ``{n+}`` (a client need
        not wait for a continuation request).
    :ivar tagged: without ``onStart``, how many commands or responses
        ``skim`` saw begin with a byte other than ``*``, ``+``, CR or LF (a
        server's tagged responses; counted as their first byte comes).
    :param onStart: called by ``skim`` with the first ``HEAD`` bytes (fewer
        when the line is shorter; CRLF included then) of the first line
        segment of each command or response, once that segment has ended.
        It costs a Python call a line; without it ``skim`` reads runs of
        whole lines at C speed (many small responses: FETCH FLAGS of a
        large mailbox).
    """

    # Two a spliced session: slots, not a dictionary each.
    __slots__ = (
        "maxLine",
        "onStart",
        "_head",
        "tagged",
        "atBoundary",
        "literal",
        "announced",
        "nonSynchronizing",
        "_partial",
        "_spilling",
    )

    def __init__(self, maxLine: int = MAX_LINE, onStart: Callable[[bytes], None] | None = None):
        self.maxLine = maxLine
        self.onStart = onStart
        self._head: bytes | None = None
        self.tagged = 0
        self.atBoundary = True
        self.literal = 0
        self.announced: int | None = None
        self.nonSynchronizing = False
        self._partial = bytearray()
        # stream(): the line being handed out is longer than maxLine.
        self._spilling = False

    def _ended(self, segment: bytes) -> None:
        """A line segment ended (``segment`` holds at least its last bytes)."""
        m = _ANNOUNCED.search(segment, max(0, len(segment) - _TAIL))
        if m is None:
            self.announced = None
            self.nonSynchronizing = False
            self.atBoundary = True
        else:
            self.announced = self.literal = int(m.group(1))
            self.nonSynchronizing = bool(m.group(2))
            self.atBoundary = False

    def skim(self, data: bytes) -> None:
        """Follow ``data`` keeping only the state: no piece, no bound on a line."""
        if self.literal or self._partial or data[-1:] != b"\n" or b"}" in data:
            self._skim(data)
            return
        # The usual read: whole lines, none announcing a literal (each
        # announcement ends in "}"), nothing partial before. One step.
        onStart = self.onStart
        if onStart is None:
            if self.atBoundary and data[:1] not in _UNTAGGED:
                self.tagged += 1
            self.tagged += len(_TAGGED_START.findall(data))
        elif data.find(b"\n") != len(data) - 1:
            self._skim(data)  # more than one command: each is looked at
            return
        head = data[:HEAD] if self.atBoundary else None
        self.announced, self.nonSynchronizing, self.atBoundary = None, False, True
        if head is not None and onStart is not None:
            onStart(head)

    def _skim(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.literal:
                taken = min(self.literal, end - pos)
                self.literal -= taken
                pos += taken
                continue
            if self.onStart is None and not self._partial:
                # Whole lines up to the next announcement, at C speed.
                m = _announcement(data, pos)
                stop = m.end() if m is not None else data.rfind(b"\n", pos) + 1
                if self.atBoundary and data[pos : pos + 1] not in _UNTAGGED:
                    self.tagged += 1
                if stop > pos:
                    self.tagged += len(_TAGGED_START.findall(data, pos, stop))
                    self._ended(data[max(pos, stop - _TAIL) : stop])
                    pos = stop
                    continue
            newline = data.find(b"\n", pos)
            if self.onStart is not None:
                self._keepHead(data, pos, end if newline < 0 else newline + 1)
            if newline < 0:
                self._partial += data[max(pos, end - _TAIL) : end]
                del self._partial[:-_TAIL]
                self.atBoundary = False
                return
            if self._partial:
                self._partial += data[max(pos, newline + 1 - _TAIL) : newline + 1]
                self._ended(bytes(self._partial))
                self._partial.clear()
            else:
                self._ended(data[max(pos, newline + 1 - _TAIL) : newline + 1])
            pos = newline + 1
            head, self._head = self._head, None
            if head is not None and self.onStart is not None:
                self.onStart(head)

    def _keepHead(self, data: bytes, pos: int, stop: int) -> None:
        """Keep the first bytes of a segment that begins a command or response."""
        if not self._partial:
            # A segment begins here: it begins a command or response when
            # the stream was at a boundary before it.
            if self.atBoundary:
                self._head = data[pos : min(stop, pos + HEAD)]
        elif self._head is not None and len(self._head) < HEAD:
            self._head += data[pos : min(stop, pos + HEAD - len(self._head))]

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """
        Follow ``data`` and yield its pieces: ``(LINE, segment)`` for each
        whole line segment (CRLF included; ``announced`` tells whether a
        literal follows) and ``(LITERAL, chunk)`` for literal payload as it
        comes. A partial line is kept until its end arrives.

        :raises LineTooLong: a line segment past ``maxLine``; the scanner
            cannot follow this stream any further.
        """
        pos, end = 0, len(data)
        while pos < end:
            if self.literal:
                taken = min(self.literal, end - pos)
                self.literal -= taken
                yield LITERAL, data[pos : pos + taken]
                pos += taken
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._partial += data[pos:]
                self.atBoundary = False
                if len(self._partial) > self.maxLine:
                    raise LineTooLong()
                return
            if self._partial:
                self._partial += data[pos : newline + 1]
                segment = bytes(self._partial)
                self._partial.clear()
            else:
                segment = data[pos : newline + 1]
            pos = newline + 1
            if len(segment) > self.maxLine:
                raise LineTooLong()
            self._ended(segment)
            yield LINE, segment

    def stream(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """
        As ``feed``, for a stream whose lines may be of any length (a
        server's ``* SEARCH`` answer): a line longer than ``maxLine`` is not
        an error but handed out as it comes, its first bytes as ``(PART,
        piece)`` pieces and its end as ``(LINE, rest)``. Memory stays
        bounded by ``maxLine`` (a ``LINE`` that came whole in one read may
        be longer: it is that read).
        """
        pos, end = 0, len(data)
        while pos < end:
            if self.literal:
                taken = min(self.literal, end - pos)
                self.literal -= taken
                yield LITERAL, data[pos : pos + taken]
                pos += taken
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.atBoundary = False
                if self._spilling:
                    self._partial += data[max(pos, end - _TAIL) : end]
                    del self._partial[:-_TAIL]
                    yield PART, data[pos:]
                    return
                self._partial += data[pos:]
                if len(self._partial) > self.maxLine:
                    piece = bytes(self._partial)
                    del self._partial[:-_TAIL]
                    self._spilling = True
                    yield PART, piece
                return
            if self._spilling:
                self._partial += data[max(pos, newline + 1 - _TAIL) : newline + 1]
                self._ended(bytes(self._partial))
                self._partial.clear()
                self._spilling = False
                segment = data[pos : newline + 1]
            elif self._partial:
                self._partial += data[pos : newline + 1]
                segment = bytes(self._partial)
                self._partial.clear()
                self._ended(segment)
            else:
                segment = data[pos : newline + 1]
                self._ended(segment)
            pos = newline + 1
            yield LINE, segment
