"""
Reading an IMAP server's responses during the login: response codes and
capability lists (RFC 9051 section 7.1). Pure functions, no state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

_CODE = re.compile(rb"^\[([A-Za-z0-9-]+)(?: ([^\]]*))?\]")


def responseCode(text: bytes) -> tuple[bytes | None, bytes]:
    """``b"[CODE args] text"`` → ``(b"CODE", b"args")``; no code → ``(None, b"")``."""
    m = _CODE.match(text)
    if m is None:
        return None, b""
    return m.group(1).upper(), m.group(2) or b""


# The longest capability line shared; real ones are a few hundred bytes.
SHARED_MAX = 2048


def parseCapabilities(text: bytes) -> tuple[bytes, ...]:
    """
    The capabilities in ``text``. The same server announces the same ones at
    every login: a usual line gives one tuple that every session holding
    it shares (about 2 KiB a held session otherwise). A line longer than
    ``SHARED_MAX`` is parsed afresh, so that the cache's memory stays small
    whatever a server sends (at most 256 lines of ``SHARED_MAX``).
    """
    if len(text) > SHARED_MAX:
        return tuple(text.split())
    return _shared(text)


@functools.lru_cache(maxsize=256)
def _shared(text: bytes) -> tuple[bytes, ...]:
    return tuple(text.split())


def hasCapability(caps: Sequence[bytes], name: bytes) -> bool:
    name = name.upper()
    return any(c.upper() == name for c in caps)
