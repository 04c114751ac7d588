"""
Tests for ``proxy.relay.imapframe``: line segments and literals, in one read
or cut anywhere, by ``feed`` and by ``skim`` alike.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.relay.imapframe import HEAD, LINE, LITERAL, MAX_LINE, PART, LineTooLong, Scanner

FETCH = (
    b"* 1 FETCH (UID 7 BODY[] {11}\r\nhello\r\n* BYE)\r\n"
    b"* 2 FETCH (BODY[] ~{3}\r\nabc FLAGS (\\Seen))\r\n"
    b"a1 OK FETCH completed\r\n"
)


def pieces(scanner: Scanner, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """Every piece, literal pieces joined, as one read would give them."""
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        for kind, data in scanner.feed(chunk):
            if kind == LITERAL and out and out[-1][0] == LITERAL:
                out[-1] = (LITERAL, out[-1][1] + data)
            else:
                out.append((kind, data))
    return out


def test_lines_and_literals():
    """A literal's payload is one piece, even when it holds CRLF and ``* BYE``."""
    got = pieces(Scanner(), [FETCH])
    assert got == [
        (LINE, b"* 1 FETCH (UID 7 BODY[] {11}\r\n"),
        (LITERAL, b"hello\r\n* BY"),
        (LINE, b"E)\r\n"),
        (LINE, b"* 2 FETCH (BODY[] ~{3}\r\n"),
        (LITERAL, b"abc"),
        (LINE, b" FLAGS (\\Seen))\r\n"),
        (LINE, b"a1 OK FETCH completed\r\n"),
    ]


def test_announcements():
    """``{n}``, ``{n+}`` and ``{0}`` are told apart; a brace inside a line is not one."""
    s = Scanner()
    list(s.feed(b"a APPEND INBOX {5+}\r\n"))
    assert (s.announced, s.nonSynchronizing, s.literal, s.atBoundary) == (5, True, 5, False)
    list(s.feed(b"hello\r\n"))
    assert (s.announced, s.literal, s.atBoundary) == (None, 0, True)
    list(s.feed(b"b LOGIN {0}\r\n"))
    assert (s.announced, s.literal, s.atBoundary) == (0, 0, False)
    list(s.feed(b' x\r\nc SEARCH SUBJECT "{3}" ALL\r\n'))
    assert (s.announced, s.atBoundary) == (None, True)


@pytest.mark.parametrize("method", ["feed", "skim"])
def test_boundary(method):
    """The boundary is after a whole response, never inside a literal or a line."""
    s = Scanner()
    seen = []
    for i in range(len(FETCH)):
        step = getattr(s, method)(FETCH[i : i + 1])
        if method == "feed":
            list(step)
        seen.append(s.atBoundary)
    ends = [i for i, b in enumerate(seen) if b]
    firstEnd = FETCH.index(b"E)\r\n") + 3
    secondEnd = FETCH.index(b"(\\Seen))\r\n") + 9
    assert ends == [firstEnd, secondEnd, len(FETCH) - 1]


def test_line_too_long():
    """``feed`` refuses a line past its bound; ``skim`` follows it in bounded memory."""
    s = Scanner(maxLine=100)
    with pytest.raises(LineTooLong):
        list(s.feed(b"x" * 101))
    s = Scanner()
    for _ in range(100):
        s.skim(b"y" * MAX_LINE)
    assert len(s._partial) <= 26
    s.skim(b" {3}\r\nabc)\r\n")
    assert s.atBoundary and s.literal == 0


@st.composite
def streams(draw):
    """IMAP-ish streams (lines with and without literals) and ways to cut them."""
    parts = []
    for _ in range(draw(st.integers(1, 8))):
        text = draw(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")))
        if draw(st.booleans()):
            payload = draw(st.binary(max_size=60))
            plus = draw(st.sampled_from([b"", b"+"]))
            parts.append(text + b"{%d%s}\r\n" % (len(payload), plus) + payload)
        parts.append(text + b"\r\n")
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    return stream, cuts


@given(streams())
def test_cut_anywhere(case):
    """Cut anywhere, a stream gives the pieces and state of one read; skim agrees."""
    stream, cuts = case
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole, cut, skimmed = Scanner(), Scanner(), Scanner()
    assert pieces(cut, chunks) == pieces(whole, [stream])
    for chunk in chunks:
        skimmed.skim(chunk)
    for s in (cut, skimmed):
        assert (s.atBoundary, s.literal) == (whole.atBoundary, whole.literal)


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=3000))
def test_stream_hands_out_long_lines(step, extra):
    """``stream``: a line past ``maxLine`` comes out in pieces, literals still followed."""
    long = b"* SEARCH" + b" 12345" * (20 + extra // 6) + b" {5}\r\nhello)\r\na OK\r\n"
    scanner = Scanner(maxLine=100)
    out: list[tuple[int, bytes]] = []
    for i in range(0, len(long), step):
        out.extend(scanner.stream(long[i : i + step]))
    assert b"".join(d for _, d in out) == long
    # What is held is bounded: a piece is at most maxLine and one read.
    assert max(len(d) for _, d in out) <= 100 + step
    if step < 30:
        assert PART in [k for k, _ in out]
    literal = b"".join(d for k, d in out if k == LITERAL)
    assert literal == b"hello"
    assert scanner.atBoundary
    # The two short lines after the literal come whole.
    assert [d for k, d in out if k == LINE][-2:] == [b")\r\n", b"a OK\r\n"]


def test_heads():
    """onStart gets the first bytes of each response, never a continuation segment."""
    heads: list[bytes] = []
    s = Scanner(onStart=heads.append)
    s.skim(FETCH)
    assert heads == [
        b"* 1 FETCH (UID 7 BODY[] {11}\r\n",
        b"* 2 FETCH (BODY[] ~{3}\r\n",
        b"a1 OK FETCH completed\r\n",
    ]


@given(streams())
def test_heads_cut_anywhere(case):
    """Cut anywhere, skim hands out the heads one read gives, as feed frames them."""
    stream, cuts = case
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole: list[bytes] = []
    cut: list[bytes] = []
    Scanner(onStart=whole.append).skim(stream)
    scanner = Scanner(onStart=cut.append)
    for chunk in chunks:
        scanner.skim(chunk)
    framed, opening = [], True
    for kind, data in Scanner().feed(stream):
        if kind == LINE:
            if opening:
                framed.append(data[:HEAD])
            opening = not re.search(rb"\{[0-9]+\+?\}\r\n\Z", data)
    assert cut == whole == framed


@given(streams())
def test_tagged_cut_anywhere(case):
    """Without onStart, skim counts the units begun with a tag, as feed frames them."""
    stream, cuts = case
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    scanner = Scanner()
    for chunk in chunks:
        scanner.skim(chunk)
    framed, opening = 0, True
    for kind, data in Scanner().feed(stream):
        if kind == LINE:
            if opening and data[:1] not in (b"*", b"+", b"\r", b"\n"):
                framed += 1
            opening = not re.search(rb"\{[0-9]+\+?\}\r\n\Z", data)
    assert scanner.tagged == framed


def test_tagged_fetch():
    """A FETCH with literals and a tagged OK: one tagged response, however cut."""
    for cut in range(len(FETCH) + 1):
        s = Scanner()
        s.skim(FETCH[:cut])
        s.skim(FETCH[cut:])
        assert s.tagged == 1 and s.atBoundary


@given(streams(), st.booleans())
def test_oneStepAgreesWithTheLoop(case, heads):
    """Cut at line ends (the usual reads), skim's one step leaves the loop's state."""
    stream, _ = case
    lines = stream.splitlines(keepends=True)
    quick: list[bytes] = []
    slow: list[bytes] = []
    a = Scanner(onStart=quick.append if heads else None)
    b = Scanner(onStart=slow.append if heads else None)
    for line in lines:
        a.skim(line)
        b._skim(line)
        state = ("tagged", "atBoundary", "literal", "announced", "nonSynchronizing")
        assert [getattr(a, n) for n in state] == [getattr(b, n) for n in state]
    assert quick == slow
