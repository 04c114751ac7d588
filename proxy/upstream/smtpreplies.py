"""
Reading an SMTP server's replies during the login (RFC 5321 section 4.2,
enhanced status codes of RFC 3463) and what its EHLO offers. Replies are
told apart by their code and enhanced code, never by their text: providers
word and reword the text. Pure functions and one small reader, no socket.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

# A whole multi-line reply, however many lines: an EHLO reply has a dozen.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 32768

_LINE = re.compile(rb"^([2-5][0-9][0-9])(?:([ -])(.*))?\Z", re.S)
_ENHANCED = re.compile(rb"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

# The name the proxy says EHLO with when the client's is unusable.
DEFAULT_EHLO_NAME = "localhost"


class MalformedReply(Exception):
    """A line that is no reply line, or a reply beyond the bounds."""


@attrs.frozen
class Reply:
    """
    One whole reply.

    :ivar code: the three-digit reply code.
    :ivar enhanced: the enhanced status code of its first line
        (``b"5.7.139"``), or None.
    :ivar lines: the text of each line, after the code and its separator.
    """

    code: int
    enhanced: bytes | None
    lines: tuple[bytes, ...]

    @property
    def text(self) -> bytes:
        """The text of the last line (a challenge's payload)."""
        return self.lines[-1]


class ReplyReader:
    """Gathers reply lines into whole replies, within ``MAX_REPLY_*``."""

    def __init__(self) -> None:
        self._code = b""
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, line: bytes) -> Reply | None:
        """
        :return: the reply ``line`` ends, or None when more lines follow.
        :raises MalformedReply: not a reply line, a continuation with another
            code, or a reply beyond the bounds.
        """
        m = _LINE.match(line)
        if m is None:
            raise MalformedReply()
        code, separator, text = m.group(1), m.group(2), m.group(3) or b""
        if self._lines and code != self._code:
            raise MalformedReply()
        self._code = code
        self._lines.append(text)
        self._size += len(line)
        if len(self._lines) > MAX_REPLY_LINES or self._size > MAX_REPLY_BYTES:
            raise MalformedReply()
        if separator == b"-":
            return None
        lines, self._lines, self._size = tuple(self._lines), [], 0
        number = int(code)
        e = _ENHANCED.match(lines[0])
        enhanced = e.group(0).rstrip(b" ") if e and int(e.group(1)) == number // 100 else None
        return Reply(number, enhanced, lines)


def extensionsOf(reply: Reply) -> list[bytes]:
    """
    An EHLO reply's extensions, each a keyword with its parameters
    (``b"SIZE 35882577"``): every line but the first, which names the server.
    """
    return [line.strip() for line in reply.lines[1:] if line.strip()]


def hasExtension(extensions: list[bytes], keyword: bytes) -> bool:
    keyword = keyword.upper()
    return any(e.split(None, 1)[0].upper() == keyword for e in extensions)


def authMechanisms(extensions: list[bytes]) -> list[bytes]:
    """
    The SASL mechanisms offered, upper-cased: ``AUTH XOAUTH2 PLAIN`` and the
    older ``AUTH=XOAUTH2 PLAIN`` some servers send beside it.
    """
    mechanisms: list[bytes] = []
    for e in extensions:
        words = e.upper().split()
        if words and words[0] == b"AUTH":
            mechanisms += words[1:]
        elif words and words[0].startswith(b"AUTH="):
            mechanisms += [words[0][5:], *words[1:]]
    return mechanisms


def ehloName(mind: object) -> str:
    """
    The name to say EHLO with upstream: the client's own when it is a
    domain or an address literal (RFC 5321 section 4.1.3), so the provider
    records what direct submission would have shown; otherwise a fixed one,
    so nothing the client typed that is not a name reaches the provider.
    """
    if not isinstance(mind, str) or not mind or len(mind) > 255 or not mind.isascii():
        return DEFAULT_EHLO_NAME
    if mind.startswith("[") and mind.endswith("]"):
        literal = mind[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return DEFAULT_EHLO_NAME
        return mind
    labels = mind.removesuffix(".").split(".")
    if len(mind) <= 253 and all(_LABEL.match(label) for label in labels):
        return mind
    return DEFAULT_EHLO_NAME
