"""
Webhook events as data: what is sent (a JSON body that never holds a
secret), and how it is signed. Pure functions, tested without a reactor.

The signature is an HMAC-SHA256, in hex, over ``TIMESTAMP.BODY`` (the
``X-Imapproxy-Timestamp`` header's value, a dot, the exact body bytes): a
receiver that refuses timestamps older than a few minutes cannot be fed an
old request again, and one that keeps the ``X-Imapproxy-Event-Id`` values
it has seen drops a retried delivery it already has.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import uuid
from typing import Any

import attrs

from .. import __version__

# What a receiver routes on: the account's new state, or a revoked token.
ACCOUNT_EVENTS = {
    "reauth-required": "account.reauth-required",
    "ok": "account.recovered",
    "disabled": "account.disabled",
}
TOKEN_REVOKED = "token.revoked"
EVENT_TYPES = (*ACCOUNT_EVENTS.values(), TOKEN_REVOKED)

SIGNATURE_HEADER = "X-Imapproxy-Signature"
TIMESTAMP_HEADER = "X-Imapproxy-Timestamp"
EVENT_ID_HEADER = "X-Imapproxy-Event-Id"
EVENT_HEADER = "X-Imapproxy-Event"

# Event ids of revocations are derived from the token's id (a token is revoked
# once), so that two instances revoking it together claim the same id.
_NAMESPACE = uuid.UUID("0b6c3f0e-6f43-4c55-9a59-4d6e2f3a7c11")


@attrs.frozen
class Event:
    """
    One event, as every receiver gets it.

    :ivar type: one of ``EVENT_TYPES``.
    :ivar id: unique per event (a UUID), the receiver's de-duplication key.
    :ivar time: when it happened (POSIX seconds).
    :ivar fields: the rest of the payload: account, states, fixed reason
        code, token id; ids and codes only, never a secret.
    """

    type: str
    id: str
    time: float
    fields: dict[str, Any] = attrs.field(factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "time": isoTime(self.time), **self.fields}

    def body(self) -> bytes:
        """The exact bytes sent (and signed): compact JSON, keys sorted."""
        return json.dumps(self.payload(), sort_keys=True, separators=(",", ":")).encode()


def isoTime(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def accountEvent(account: str, old: str, new: str, reason: str, now: float) -> Event | None:
    """
    The event for an account's state change, or None when nothing changed
    (or the new state is not one anyone is told about).

    :param reason: a fixed code: ``invalid-grant`` (the provider refused the
        grant), ``operator`` (the API or the admin command), ``authorized``
        (a new grant through onboarding).
    """
    kind = ACCOUNT_EVENTS.get(new)
    if kind is None or old == new:
        return None
    fields = {"account": account, "oldState": old, "newState": new, "reason": reason}
    return Event(kind, str(uuid.uuid4()), now, fields)


def tokenEvent(token: str, account: str | None, reason: str, actor: str, now: float) -> Event:
    """
    The event for a revoked token (its id, never the token itself).

    :param reason: ``revoked`` (the API or the admin command) or
        ``account-deleted`` (its account was removed, and its tokens with it).
    :param actor: the acting token's id, or ``cli``.
    """
    fields = {"account": account, "tokenId": token, "reason": reason, "actor": actor}
    return Event(TOKEN_REVOKED, str(uuid.uuid5(_NAMESPACE, f"token.revoked:{token}")), now, fields)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Imapproxy-Signature`` value: ``sha256=`` and the hex HMAC."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """What a receiver does (the tests' receiver does it): constant time."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)


def headers(event: Event, secret: bytes, body: bytes, now: float) -> dict[bytes, list[bytes]]:
    """The request's headers, signed at ``now`` (each attempt signs afresh)."""
    timestamp = str(int(now))
    return {
        b"Content-Type": [b"application/json"],
        b"User-Agent": [f"imapproxy/{__version__}".encode()],
        EVENT_HEADER.encode(): [event.type.encode()],
        EVENT_ID_HEADER.encode(): [event.id.encode()],
        TIMESTAMP_HEADER.encode(): [timestamp.encode()],
        SIGNATURE_HEADER.encode(): [signature(secret, timestamp, body).encode()],
    }
