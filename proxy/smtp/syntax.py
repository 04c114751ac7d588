"""
The pre-auth SMTP submission dialogue as pure functions and fixed replies:
a command line split into its verb and argument, the EHLO name, a BDAT chunk
size, and the base64 responses of AUTH LOGIN (RFC 4954). Nothing here
raises anything but ``SASLError`` and ``ValueError`` with fixed texts.
"""

from __future__ import annotations

import base64
import binascii
import re

from ..imap.sasl import CANCELLED, SASLError

# Every reply the front door gives on its own, without CRLF (RFC 5321,
# 3207, 4954 and their enhanced status codes, RFC 3463 / 5248).
OK = b"250 2.0.0 Ok"
BYE = b"221 2.0.0 Bye"
READY_FOR_TLS = b"220 2.0.0 Ready to start TLS"
TLS_UNAVAILABLE = b"454 4.7.0 TLS not available"
TLS_ACTIVE = b"503 5.5.1 TLS already active"
AUTH_OK = b"235 2.7.0 Authentication successful"
AUTH_REQUIRED = b"530 5.7.0 Authentication required"
STARTTLS_FIRST = b"530 5.7.0 Must issue a STARTTLS command first"
EHLO_FIRST = b"503 5.5.1 Send EHLO first"
UNKNOWN = b"500 5.5.2 Command not recognized"
TOO_LONG = b"500 5.5.6 Line too long"
SYNTAX = b"501 5.5.4 Syntax error in parameters"
EHLO_SYNTAX = b"501 5.5.4 Syntax: EHLO hostname"
HELO_SYNTAX = b"501 5.5.4 Syntax: HELO hostname"
MECHANISM = b"504 5.5.4 Unrecognized authentication type"
ABORTED = b"501 5.7.0 Authentication aborted"
BAD_BASE64 = b"501 5.5.2 Invalid base64 data"
BAD_PLAIN = b"501 5.5.2 Malformed SASL PLAIN response"
INTERNAL = b"454 4.7.0 Internal error, try again later"
# The EHLO this client was given offered more than its provider has (a
# server new to the proxy, learned now): EHLO again, and AUTH again.
OFFER_CHANGED = b"454 4.7.0 The offered extensions changed, send EHLO and AUTH again"
# AUTH LOGIN's challenges: "Username:" and "Password:" in base64.
USERNAME = b"334 VXNlcm5hbWU6"
PASSWORD = b"334 UGFzc3dvcmQ6"
EMPTY_CHALLENGE = b"334 "

# What an EHLO or HELO name may be: a domain or an address literal, or at
# least something that looks like one (RFC 5321 4.1.4 lets a server accept a
# name it cannot check). Printable ASCII or UTF-8, no spaces, bounded.
MAX_NAME = 255
# RFC 4954 section 4: the longest AUTH command line, CRLF included.
MAX_AUTH_LINE = 12288
_NAME = re.compile(rb"\A[\x21-\x7e\x80-\xff]{1,255}\Z")
_CHUNK_SIZE = re.compile(rb"\A[0-9]{1,18}\Z")


def splitCommand(line: bytes) -> tuple[bytes, bytes]:
    """
    :return: the verb upper-cased, and the argument after the first space,
        white space around it removed.
    """
    verb, _, rest = line.partition(b" ")
    return verb.upper(), rest.strip(b" \t")


def heloName(argument: bytes) -> str | None:
    """
    :return: the client's EHLO or HELO name, or None when there is none or
        it cannot be one (spaces, control characters, not UTF-8, too long).
        Only its first word counts: some clients add a comment.
    """
    parts = argument.split()
    if not parts or not _NAME.match(parts[0]):
        return None
    try:
        return parts[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


def chunkSize(argument: bytes) -> int:
    """
    :param argument: what follows ``BDAT``: a size and perhaps ``LAST``.
    :return: the size of the chunk that follows the command line.
    :raise ValueError: not a BDAT argument (its data cannot be skipped).
    """
    parts = argument.split()
    if not 1 <= len(parts) <= 2 or not _CHUNK_SIZE.match(parts[0]):
        raise ValueError("BDAT syntax")
    if len(parts) == 2 and parts[1].upper() != b"LAST":
        raise ValueError("BDAT syntax")
    return int(parts[0])


def decodeResponse(response: bytes) -> bytes:
    """
    One base64 SASL response (AUTH LOGIN's user name or password, or its
    initial response): ``=`` is the empty response, ``*`` cancels.

    :raise SASLError: cancelled, or not base64.
    """
    response = response.strip()
    if response == b"*":
        raise SASLError(CANCELLED)
    try:
        return base64.b64decode(b"" if response == b"=" else response, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(b"Invalid base64 in SASL response") from None


def saslReply(error: SASLError) -> bytes:
    """The fixed reply to a SASL response that ends the exchange."""
    if error.text == CANCELLED:
        return ABORTED
    if b"base64" in error.text:
        return BAD_BASE64
    return BAD_PLAIN
