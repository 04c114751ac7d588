"""
Which mailboxes a restricted token may use: its patterns (IMAP LIST
wildcards), matched against mailbox names as the client writes them, after
decoding modified UTF-7 (RFC 3501 section 5.1.3) so that a pattern may be
written in UTF-8 or in modified UTF-7 alike.

``*`` matches anything, hierarchy delimiter included; ``%`` anything but
the delimiter. The delimiter is the provider's: ``/`` unless a ``LIST``
answer says otherwise (``Patterns.delimiter`` is updated by the relay).
``INBOX`` is case-insensitive, and only ``INBOX`` itself: ``inbox/x`` is
not taken for ``INBOX/x`` (a server may hold them apart; refusing is the
safe side).
"""

from __future__ import annotations

import base64
import binascii
import re

#: The hierarchy delimiter assumed until the provider's LIST answers tell.
DEFAULT_DELIMITER = "/"


class NotAName(ValueError):
    """Bytes that decode to no mailbox name (bad modified UTF-7, bad UTF-8)."""


def decodeModifiedUTF7(raw: bytes) -> str:
    """
    Modified UTF-7 (``&…-`` runs of modified BASE64 of UTF-16) to text.

    :raise NotAName: for anything RFC 3501 does not allow (a bare ``&``,
        bad BASE64, an encoded run of printable ASCII is tolerated).
    """
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != 0x26:  # "&"
            if c < 0x20 or c > 0x7E:
                raise NotAName()
            out.append(chr(c))
            i += 1
            continue
        end = raw.find(b"-", i + 1)
        if end < 0:
            raise NotAName()
        run = raw[i + 1 : end]
        i = end + 1
        if not run:
            out.append("&")
            continue
        b64 = run.replace(b",", b"/")
        b64 += b"=" * (-len(b64) % 4)
        try:
            utf16 = base64.b64decode(b64, validate=True)
            out.append(utf16.decode("utf-16-be"))
        except (binascii.Error, UnicodeDecodeError, ValueError) as e:
            raise NotAName() from e
    return "".join(out)


def decodeName(raw: bytes, utf8: bool = False) -> str:
    """
    A mailbox name as sent on the wire, to text: UTF-8 when it holds 8-bit
    bytes or ``UTF8=ACCEPT`` is on (``utf8``), modified UTF-7 otherwise.
    ``INBOX`` in any case is ``INBOX``.

    :raise NotAName: bytes that are neither.
    """
    if utf8 or any(c > 0x7F for c in raw):
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotAName() from e
    else:
        name = decodeModifiedUTF7(raw)
    return "INBOX" if name.upper() == "INBOX" else name


def _decodePattern(pattern: str) -> str:
    """A pattern as written in a token: UTF-8 text, or modified UTF-7 if it decodes."""
    if pattern.isascii():
        try:
            pattern = decodeModifiedUTF7(pattern.encode("ascii"))
        except NotAName:
            pass
    return "INBOX" if pattern.upper() == "INBOX" else pattern


class Patterns:
    """
    A token's mailbox patterns, compiled for one session.

    :ivar delimiter: the provider's hierarchy delimiter (``%`` stops at it).
    """

    def __init__(self, patterns: tuple[str, ...] | list[str], delimiter: str = DEFAULT_DELIMITER):
        self.patterns = tuple(_decodePattern(p) for p in patterns)
        self._compiled: re.Pattern[str] | None = None
        self.delimiter = delimiter
        #: ``ENABLE UTF8=ACCEPT`` took effect: names on the wire are UTF-8.
        self.utf8 = False

    @property
    def delimiter(self) -> str:
        return self._delimiter

    @delimiter.setter
    def delimiter(self, value: str) -> None:
        self._delimiter = value
        self._compiled = _compile(self.patterns, value)

    def allows(self, name: str) -> bool:
        """Whether the (decoded) mailbox ``name`` is one of the token's."""
        assert self._compiled is not None
        return self._compiled.fullmatch(name) is not None

    def allowsRaw(self, raw: bytes) -> bool:
        """Whether the wire form ``raw`` names one of the token's mailboxes (undecodable: no)."""
        try:
            return self.allows(decodeName(raw, self.utf8))
        except NotAName:
            return False


def _compile(patterns: tuple[str, ...], delimiter: str) -> re.Pattern[str]:
    notDelimiter = "[^" + re.escape(delimiter) + "]*" if delimiter else ".*"
    alternatives = []
    for p in patterns:
        parts = []
        for ch in p:
            if ch == "*":
                parts.append(".*")
            elif ch == "%":
                parts.append(notDelimiter)
            else:
                parts.append(re.escape(ch))
        alternatives.append("(?:" + "".join(parts) + ")")
    if not alternatives:
        return re.compile(r"(?!)")
    return re.compile("|".join(alternatives), re.DOTALL)
