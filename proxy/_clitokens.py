"""
The admin command's token restrictions: the ``tokens issue`` options
``--read-only`` and ``--mailbox`` and the ``tokens list`` line, apart from
``proxy.cli`` (at its size limit). The request they build is the API's.
"""

from __future__ import annotations

import argparse
from typing import Any

from .model import Token


def addRestrictionArguments(issue: argparse.ArgumentParser) -> None:
    issue.add_argument(
        "--read-only",
        action="store_true",
        help="IMAP sessions may only read (no STORE, EXPUNGE, APPEND…); not with --scope smtp",
    )
    issue.add_argument(
        "--mailbox",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a mailbox IMAP sessions may see, IMAP LIST wildcards * and %% (repeatable; "
        "none: all)",
    )


def restrictionsRequest(args: argparse.Namespace) -> dict[str, Any]:
    """The request's ``restrictions`` object."""
    request: dict[str, Any] = {"addresses": args.address}
    if args.read_only:
        request["readOnly"] = True
    if args.mailbox:
        request["mailboxes"] = args.mailbox
    return request


def tokenLine(t: Token) -> str:
    """
    One token in ``tokens list``: id, account, scopes, description, then
    its IMAP restrictions (``read-only``, ``mailboxes=A,B``; ``-`` for none).
    """
    r = t.restrictions
    shown = []
    if r is not None and r.readOnly:
        shown.append("read-only")
    if r is not None and r.mailboxes:
        shown.append("mailboxes=" + ",".join(r.mailboxes))
    return (
        f"{t.id}\t{t.account or '(root)'}\t{','.join(t.scopes)}\t{t.description}"
        f"\t{' '.join(shown) or '-'}\n"
    )
