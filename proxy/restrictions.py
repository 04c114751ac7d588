"""
A token's IMAP restrictions (``proxy.model.Restrictions``) outside the wire:
read from a token request, kept in a store record, shown in views, and the
least-privilege rule for tokens that mint tokens. Pure functions, no I/O.
What a restricted session may do on the wire is ``proxy.policy``'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from .model import Restrictions, Token

# Bounds on what a token may carry: every pattern is checked against each
# mailbox name a restricted session meets, so both stay small.
MAX_MAILBOXES = 100
MAX_PATTERN_LENGTH = 1024
_FORBIDDEN = ("\x00", "\r", "\n")
# A read-only token must not send mail: asking for the smtp scope with
# readOnly is refused at creation, and proxy.tokens.checkToken refuses SMTP
# logins of read-only tokens that hold scope * (which covers smtp).
SMTP_REFUSAL = "a read-only token cannot have the smtp scope (it could send mail)"


def parseRestrictions(data: Mapping[str, Any] | None) -> Restrictions | None:
    """
    The ``readOnly`` and ``mailboxes`` of a request's ``restrictions``
    object (its ``addresses`` are ``proxy.tokens.parseNetworks``'s). The API
    schema checks the same; this holds for callers that skip it.

    :return: the restrictions, or None when they restrict nothing.
    :raises ValueError: naming the bad field, safe to show.
    """
    if not data:
        return None
    readOnly = data.get("readOnly")
    if readOnly is None:
        readOnly = False
    if not isinstance(readOnly, bool):
        raise ValueError("restrictions.readOnly must be true or false")
    raw = data.get("mailboxes") or []
    if not isinstance(raw, list | tuple):
        raise ValueError("restrictions.mailboxes must be a list of mailbox patterns")
    if len(raw) > MAX_MAILBOXES:
        raise ValueError(f"restrictions.mailboxes: at most {MAX_MAILBOXES} patterns")
    mailboxes: list[str] = []
    for p in raw:
        if not isinstance(p, str) or not p:
            raise ValueError("restrictions.mailboxes: a pattern must be a non-empty string")
        if len(p) > MAX_PATTERN_LENGTH:
            raise ValueError(
                f"restrictions.mailboxes: a pattern is at most {MAX_PATTERN_LENGTH} characters"
            )
        if any(c in p for c in _FORBIDDEN):
            raise ValueError("restrictions.mailboxes: a pattern must not contain NUL, CR or LF")
        if p not in mailboxes:
            mailboxes.append(p)
    found = Restrictions(readOnly=readOnly, mailboxes=tuple(mailboxes))
    return found if found else None


def imapRestrictions(data: Mapping[str, Any], scopes: Any) -> Restrictions | None:
    """
    A token request's IMAP restrictions (``parseRestrictions``), refused
    with ``InvalidInput`` when bad or when read-only asks for ``smtp``.
    """
    # Here, not at the top: the stores import this module, and need not load
    # the request validator.
    from .validation import InvalidInput

    try:
        found = parseRestrictions(data)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    if found is not None and found.readOnly and "smtp" in scopes:
        raise InvalidInput(SMTP_REFUSAL)
    return found


def tokenRestrictionsView(t: Token) -> dict[str, Any]:
    """A token view's ``restrictions``: its networks and its IMAP restrictions."""
    view: dict[str, Any] = {"addresses": list(t.addresses)} if t.addresses else {}
    view.update(restrictionsView(t.restrictions) or {})
    return view


def restrictionsView(r: Restrictions | None) -> dict[str, Any] | None:
    """The JSON form (token views, session views), or None when unrestricted."""
    if not r:
        return None
    return {"readOnly": r.readOnly, "mailboxes": list(r.mailboxes)}


def encodeRestrictions(r: Restrictions | None) -> str | None:
    """A store column: JSON text, or None (absent) for an unrestricted token."""
    view = restrictionsView(r)
    return None if view is None else json.dumps(view, separators=(",", ":"))


def decodeRestrictions(text: str | None) -> Restrictions | None:
    """The column back; None, empty or nothing restricted is None."""
    if not text:
        return None
    data = json.loads(text)
    found = Restrictions(
        readOnly=bool(data.get("readOnly")), mailboxes=tuple(data.get("mailboxes") or ())
    )
    return found if found else None


def readOnly(token: Token) -> bool:
    return token.restrictions is not None and token.restrictions.readOnly


def inheritRestrictions(record: Token, minter: Token, data: Mapping[str, Any]) -> Token:
    """
    What a restricted minter leaves unsaid, its new token takes from it:
    ``readOnly`` absent is the minter's, ``mailboxes`` absent (or null) the
    minter's patterns. Asking for less is never refused;
    ``restrictionRefusal`` refuses asking for more.
    """
    mine = minter.restrictions
    if not mine:
        return record
    asked = data.get("restrictions") or {}
    have = record.restrictions or Restrictions()
    if asked.get("readOnly") is None and mine.readOnly:
        have = attrs.evolve(have, readOnly=True)
    if asked.get("mailboxes") is None and mine.mailboxes:
        have = attrs.evolve(have, mailboxes=mine.mailboxes)
    return attrs.evolve(record, restrictions=have if have else None)


def restrictionRefusal(minter: Token, requested: Token) -> str | None:
    """
    Whether ``requested`` is at least as restricted as ``minter``: read-only
    stays read-only, and each of its mailbox patterns is one of the
    minter's (patterns are compared as written, not by what they match:
    simple to reason about, never wider than meant); and, read-only (as
    asked or inherited), no ``smtp`` scope.

    :return: None when it is, else why not (safe to show).
    """
    if readOnly(requested) and "smtp" in requested.scopes:
        return SMTP_REFUSAL  # read-only inherited from the minter
    mine = minter.restrictions
    if not mine:
        return None
    theirs = requested.restrictions or Restrictions()
    if mine.readOnly and not theirs.readOnly:
        return "this token is read-only, so it cannot issue a token that is not"
    if mine.mailboxes:
        if not theirs.mailboxes:
            return "this token is restricted to mailboxes, so it cannot issue a token for all"
        for p in theirs.mailboxes:
            if p not in mine.mailboxes:
                return f"this token cannot issue a token for mailbox pattern {p!r}"
    return None


# The IMAP commands a refusal is counted under by name (metrics label);
# any other name counts as "other", so the label stays bounded whatever a
# client sends.
IMAP_COMMANDS = frozenset(
    """
    APPEND AUTHENTICATE CANCELUPDATE CAPABILITY CHECK CLOSE COMPRESS COPY CREATE DELETE DELETEACL
    DONE ENABLE ESEARCH EXAMINE EXPUNGE FETCH GENURLAUTH GETACL GETMETADATA GETQUOTA
    GETQUOTAROOT ID IDLE LANGUAGE LIST LISTRIGHTS LOGIN LOGOUT LSUB MOVE MYRIGHTS NAMESPACE NOOP
    NOTIFY RENAME REPLACE RESETKEY SEARCH SELECT SETACL SETMETADATA SETQUOTA SORT STARTTLS
    STATUS STORE SUBSCRIBE THREAD UID UNAUTHENTICATE UNSELECT UNSUBSCRIBE URLFETCH XLIST
    """.split()
)


def commandLabel(command: str) -> str:
    """
    A refused command's name as a metric label: upper-cased when it is a
    known IMAP command (``UID STORE`` stays two words), else ``other``.
    """
    words = command.upper().split()
    if not words or words[0] not in IMAP_COMMANDS or len(words) > 2:
        return "other"
    if len(words) == 2 and (words[0] != "UID" or words[1] not in IMAP_COMMANDS):
        return "other"
    return " ".join(words)
