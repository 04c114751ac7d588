"""
Who ended a session the provider closed: the provider itself, or the client
that said goodbye (SMTP ``QUIT``, IMAP ``LOGOUT``) and was answered before
the provider closed, as the protocols have it. Told from the last line the
provider sent: SMTP's ``221`` answers only ``QUIT``; an IMAP server closes
after a tagged ``OK`` only for ``LOGOUT`` (one that ends a session itself
says an untagged ``* BYE`` last). The splice keeps the last ``TAIL`` bytes
the provider sent for this; nothing else on the relay path.
"""

from __future__ import annotations

import re

TAIL = 256
_LAST_LINE = re.compile(rb"(?:\A|\n)([^\n]*)\r?\n?\Z")
_GOODBYE = {
    "smtp": re.compile(rb"\A221[ -]"),
    "imap": re.compile(rb"\A[^*+ ][^ ]* OK\b", re.I),
}


def joinTail(tail: bytes, more: bytes) -> bytes:
    """The last ``TAIL`` bytes of ``tail`` followed by ``more`` (a whole read may be long)."""
    return more[-TAIL:] if len(more) >= TAIL else (tail + more)[-TAIL:]


def endedBy(protocol: str, tail: bytes) -> str:
    """
    ``client`` when the provider's last line answered the client's goodbye,
    else ``provider``.
    """
    goodbye = _GOODBYE.get(protocol)
    found = _LAST_LINE.search(tail.rstrip(b"\r\n") + b"\r\n") if goodbye else None
    if found is None or goodbye is None:
        return "provider"
    line = found.group(1)
    # A line longer than the tail was cut: its start is unknown.
    if len(line) + 2 >= len(tail) and len(tail) >= TAIL:
        return "provider"
    return "client" if goodbye.match(line) else "provider"
