"""
Where the admin command's audit events go. The command runs as its own
process, without the service's log, yet what it changes (accounts, apps,
tokens, an account's state, a grant through the device flow) must reach the
operator as surely as a change through the API does. So each of its audit
events (``change``, ``account-state``, ``account-authorized``) is written as
the same JSON line as the service's ``--log-format json`` (proxy.auditlog),
with the system user who ran the command (``user``):

- always to syslog, ident ``imapproxy-admin``, facility ``authpriv`` (like
  sudo's own lines: on a systemd machine in the journal,
  ``journalctl -t imapproxy-admin``; with rsyslog in ``/var/log/auth.log``
  or ``/var/log/secure``), priority ``notice``;
- and, when asked (``--audit-log PATH`` or ``IMAPPROXY_AUDIT_LOG``), appended
  to that file (created mode 0600), e.g. the file a log shipper already
  follows for the service's JSON log, or one of its own. A file that cannot
  be opened stops the command before it changes anything.

Where no syslog daemon listens (a container without ``/dev/log``) the
syslog lines are lost silently, as the stdlib's ``syslog`` does: give
``--audit-log`` there.
"""

from __future__ import annotations

import argparse
import getpass
import os
import syslog
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from . import auditlog

IDENT = "imapproxy-admin"
ENV_VAR = "IMAPPROXY_AUDIT_LOG"


_current: AdminAuditObserver | None = None


class AuditLogError(Exception):
    """The audit log file given cannot be written."""


def addArguments(parser: argparse.ArgumentParser) -> None:
    """``--audit-log PATH`` on a (sub)command's parser."""
    parser.add_argument(
        "--audit-log",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"append the command's change events (JSON lines) to PATH too "
        f"[default: ${ENV_VAR}; they always go to syslog as {IDENT}]",
    )


def toSyslog(line: str) -> None:
    """One line to syslog (``authpriv.notice``, ident ``imapproxy-admin``)."""
    syslog.openlog(IDENT, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_NOTICE, line)


def openAuditFile(path: str) -> IO[str]:
    """The file, opened to append (created 0600: it names accounts and mailboxes)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise AuditLogError(f"cannot open the audit log {path}: {e.strerror}") from None
    return os.fdopen(fd, "a", encoding="utf-8")


def currentUser() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@implementer(ILogObserver)
class AdminAuditObserver:
    """
    Writes each audit event (a log event with an ``event`` name) as one JSON
    line to ``send`` and, when given, to ``out``; every other event is left
    to whoever else observes.

    :param send: a line to syslog (``toSyslog``), or None for none.
    :param out: the audit file, or None.
    :param user: who ran the command.
    """

    def __init__(self, send: Callable[[str], None] | None, out: IO[str] | None, user: str):
        self.send = send
        self.out = out
        self.user = user

    def __call__(self, event: Mapping[str, Any]) -> None:
        if not isinstance(event.get("event"), str):
            return
        line = auditlog.eventAsLine({**event, "user": self.user})
        if self.out is not None:
            # One write of a whole line to an O_APPEND file: lines of
            # commands run at the same time do not interleave.
            self.out.write(line)
            self.out.flush()
        if self.send is not None:
            self.send(line.rstrip("\n"))


def start(
    path: str | None,
    environ: Mapping[str, str] = os.environ,
    send: Callable[[str], None] | None = toSyslog,
    publisher: Any = globalLogPublisher,
) -> AdminAuditObserver:
    """
    Begin writing the command's audit events.

    :param path: ``--audit-log``; else ``IMAPPROXY_AUDIT_LOG``; else no file.
    :raises AuditLogError: the file cannot be opened.
    """
    global _current
    path = path or environ.get(ENV_VAR) or None
    observer = AdminAuditObserver(send, openAuditFile(path) if path else None, currentUser())
    if _current is not None:
        # One command a process; but a process that runs main() again (the
        # tests) must not write each event once per run.
        publisher.removeObserver(_current)
        if _current.out is not None:
            _current.out.close()
    _current = observer
    publisher.addObserver(observer)
    return observer


def startFor(args: argparse.Namespace) -> AdminAuditObserver:
    """``start`` for the parsed command line; a one-line exit when the file cannot be opened."""
    try:
        return start(getattr(args, "audit_log", None))
    except AuditLogError as e:
        raise SystemExit(f"imapproxy: {e}") from None
