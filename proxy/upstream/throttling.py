"""
Telling a provider's throttling apart from other refusals at login. Pure
tables and functions, no state: the login machines (``login``, ``smtplogin``)
ask them when a login is refused, and a match becomes ``ProviderThrottled``
(the proxy backs off, see ``proxy.throttle``) instead of a refused token,
which would be refreshed and tried again at once: the retry storm a
throttled account must not get.

IMAP providers say it in the text of a tagged ``NO`` (or a ``BYE``), with
no response code of its own, so the text is matched; SMTP servers say it
with an enhanced status code, and for the generic ``4.7.0`` with words.
Each match has a fixed reason code (logs, metrics, the account's state in
the API); the provider's words never go further than this module.
"""

from __future__ import annotations

import re

from ..errors import ProviderThrottled
from .smtpreplies import Reply

# Gmail's seconds before a login is worth trying again, when it says none.
# Its connection limit frees up as soon as another client logs out; its
# bandwidth and quota limits last longer (the operator's ``--throttle-backoff``).
CONNECTIONS_BACKOFF = 10.0

#: (reason, pattern on the refusal's text, default back-off or None for the
#: configured one). The first match wins.
IMAP_TEXTS: tuple[tuple[str, re.Pattern[bytes], float | None], ...] = (
    # Gmail: "NO [ALERT] Too many simultaneous connections. (Failure)"
    (
        "throttled-connections",
        re.compile(rb"too many simultaneous connections", re.I),
        CONNECTIONS_BACKOFF,
    ),
    # Gmail: "NO [OVERQUOTA] ..." (the code, or the words).
    ("throttled-quota", re.compile(rb"\[OVERQUOTA\]|over ?quota", re.I), None),
    # Gmail: "NO [ALERT] Account exceeded command or bandwidth limits. (Failure)"
    ("throttled-bandwidth", re.compile(rb"exceeded command or bandwidth limits", re.I), None),
    # Microsoft: "NO Request is throttled. Suggested Backoff Time: 2000 milliseconds"
    ("throttled-backoff", re.compile(rb"request is throttled", re.I), None),
)

_SUGGESTED = re.compile(
    rb"suggested backoff time:\s*([0-9]{1,9})\s*(milliseconds|ms|seconds|s)\b", re.I
)

#: SMTP enhanced status codes that mean "too much from this sender now", each
#: with the words it needs when the code alone says less (``4.3.2`` is also
#: "shutting down").
SMTP_CODES: dict[bytes, tuple[str, re.Pattern[bytes] | None]] = {
    # Microsoft: "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
    b"4.3.2": ("throttled-submission", re.compile(rb"thread limit|limit exceeded", re.I)),
    # Gmail: "421 4.7.28 ... unusual rate of unsolicited mail", rate limits.
    b"4.7.28": ("throttled-rate", None),
    # Microsoft: "451 4.7.500 Server busy. Please try again later".
    b"4.7.500": ("throttled-busy", None),
}
# Any other 4.7.x reply says throttling only in words.
_SMTP_WORDS = re.compile(rb"throttl|rate limit|too many|thread limit", re.I)


def suggestedBackoff(text: bytes) -> float | None:
    """Microsoft's ``Suggested Backoff Time: N milliseconds``, in seconds; else None."""
    m = _SUGGESTED.search(text)
    if m is None:
        return None
    n = float(m.group(1))
    return n / 1000.0 if m.group(2).lower() in (b"milliseconds", b"ms") else n


def imapThrottling(text: bytes) -> ProviderThrottled | None:
    """
    The throttling an IMAP refusal says, or None.

    :param text: the response after its tag and status (``[ALERT] Too many…``),
        or after ``* BYE``.
    """
    for reason, pattern, default in IMAP_TEXTS:
        if pattern.search(text):
            suggested = suggestedBackoff(text)
            return ProviderThrottled(reason, suggested if suggested is not None else default)
    return None


def smtpThrottling(reply: Reply) -> ProviderThrottled | None:
    """The throttling a transient SMTP reply (4xx) says, or None."""
    if not 400 <= reply.code < 500:
        return None
    enhanced = reply.enhanced or b""
    text = b" ".join(reply.lines)
    reason, words = SMTP_CODES.get(enhanced, (None, None))
    if reason is not None and words is not None and not words.search(text):
        reason = None
    if reason is None and enhanced.startswith(b"4.7.") and _SMTP_WORDS.search(text):
        reason = "throttled"
    if reason is None:
        return None
    return ProviderThrottled(reason, suggestedBackoff(text))
