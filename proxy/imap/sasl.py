"""
SASL PLAIN (RFC 4616) as the pre-auth server reads it, as pure functions:
the client's response to ``AUTHENTICATE PLAIN`` in, the account and token
out, or a fixed refusal.
"""

from __future__ import annotations

import base64
import binascii

import attrs


class SASLError(Exception):
    """A response that is not a PLAIN message. :ivar text: the fixed text after ``BAD``."""

    def __init__(self, text: bytes):
        super().__init__(text)
        self.text = text


CANCELLED = b"Authentication cancelled"


@attrs.frozen
class PlainResponse:
    """The three parts of a PLAIN message; the password never shows in a repr."""

    authzid: bytes
    authcid: bytes
    password: bytes = attrs.field(repr=False)

    @property
    def sameIdentity(self) -> bool:
        """Whether the client asks to act as itself (empty authzid or the authcid)."""
        return not self.authzid or self.authzid == self.authcid


def parsePlain(response: bytes) -> PlainResponse:
    """
    :param response: the client's line (or SASL-IR argument), whitespace
        around it ignored; ``=`` is the empty response, ``*`` cancels.
    :raise SASLError: cancelled, not base64, or not three NUL-separated parts.
    """
    response = response.strip()
    if response == b"*":
        raise SASLError(CANCELLED)
    try:
        decoded = base64.b64decode(b"" if response == b"=" else response, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(b"Invalid base64 in SASL response") from None
    parts = decoded.split(b"\x00")
    if len(parts) != 3:
        raise SASLError(b"Malformed SASL PLAIN response")
    return PlainResponse(*parts)
