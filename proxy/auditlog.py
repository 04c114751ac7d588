"""
Logs for machines: ``--log-format json`` writes each log event as one JSON
object a line (no record separator, unlike Twisted's ``jsonFileLogObserver``)
so that Loki, Elasticsearch or journald take the lines as they are; and the
stable audit events (``login``, ``session-end``, ``change``,
``account-state``, ``account-authorized``, ``api-login``) that such a log
is searched for. docs/monitoring.md lists each with its fields.

An audit event has a fixed ``event`` field and fixed fields of its own, and
no format string: it shows in the JSON log only, so the text log (and the
fail2ban filter reading it) stays as it was. No field ever holds a token, a
refresh token, a client secret, an XOAUTH2 string or an exception's text.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.logfile import LogFile

log = Logger(namespace="proxy.audit")

LOG_FORMATS = ("text", "json")
# The fixed keys of every JSON line; an event's own fields come after them
# and never replace them.
_FIXED = ("time", "level", "namespace", "message")
_SCALARS = (str, int, float, bool, type(None))


def _value(value: Any) -> Any:
    """A field as JSON holds it: scalars as they are, anything else as its text."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    return str(value)


def eventAsLine(event: dict[str, Any]) -> str:
    """
    One log event as one line of JSON: ``time`` (ISO 8601, UTC), ``level``,
    ``namespace``, ``message`` (the text the text log shows; an audit event's
    name when it has none), then the event's own fields. A failure adds only
    its exception's type (``error_type``): its traceback, which might carry
    a token, stays out, as it does from the login path's text lines.
    """
    when = event.get("log_time")
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(when or 0.0, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event) if event.get("log_format") else event.get("event", ""),
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["error_type"] = getattr(failure.type, "__name__", "Exception")
    for key, value in event.items():
        if key.startswith("log_") or key in _FIXED or key.startswith("_"):
            continue
        line[key] = _value(value)
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


def jsonLineObserver(outFile: IO[Any]) -> ILogObserver:
    """Write each event to ``outFile`` as one JSON object a line, flushed."""
    return FileLogObserver(outFile, eventAsLine)


def twistdObserver(logfile: str | None, nodaemon: bool) -> ILogObserver:
    """
    The JSON observer where twistd would have put its text log: stdout for
    ``--logfile -`` (or no ``--logfile`` with ``-n``), else the file (by
    default ``twistd.log``), rotated as twistd rotates its own.
    """
    if logfile == "-" or (nodaemon and not logfile):
        return jsonLineObserver(sys.stdout)
    return jsonLineObserver(LogFile.fromFullPath(logfile or "twistd.log"))


# -- the audit events ------------------------------------------------------


def _account(account: str | None) -> str:
    return account if account else "-"


def login(
    protocol: str,
    result: str,
    reason: str,
    account: str | None,
    tokenId: str | None,
    address: str,
    duration: float,
) -> None:
    """
    One login attempt, decided.

    :param result: ``ok``, ``refused`` (the client's fault: a bad token,
        scope, address…) or ``failed`` (the provider's or ours).
    :param reason: the fixed reason code (``-`` for ``ok``).
    :param account: a valid account id, else None (logged as ``-``).
    """
    log.emit(
        LogLevel.info,
        "",
        event="login",
        protocol=protocol,
        result=result,
        reason=reason,
        account=_account(account),
        token_id=tokenId or "-",
        client=address,
        duration=round(duration, 6),
    )


def sessionEnd(info: dict[str, Any], up: int, down: int, duration: float, closedBy: str) -> None:
    """
    A relayed session ended.

    :param info: protocol, account, token_id and client of the session.
    :param up: bytes from the client to the provider; ``down`` the other way.
    :param closedBy: ``client``, ``provider``, ``operator`` or ``shutdown``.
    """
    log.emit(
        LogLevel.info,
        "",
        event="session-end",
        protocol=info.get("protocol", "-"),
        account=_account(info.get("account")),
        token_id=info.get("token_id") or "-",
        client=info.get("client", "-"),
        bytes_up=up,
        bytes_down=down,
        duration=round(duration, 6),
        closed_by=closedBy,
    )


def change(operation: str, target: str, actor: str) -> None:
    """
    A change made through the API or the admin command.

    :param operation: e.g. ``account.create``, ``token.revoke``.
    :param target: the id of what changed (a token's id, never the token).
    :param actor: the acting token's id, or ``cli`` for the admin command.
    """
    log.emit(LogLevel.info, "", event="change", operation=operation, target=target, actor=actor)


def accountState(account: str, old: str | None, new: str, reason: str) -> None:
    """An account's state changed (``old`` is ``-`` when not known)."""
    log.emit(
        LogLevel.info,
        "",
        event="account-state",
        account=account,
        old_state=old or "-",
        new_state=new,
        reason=reason,
    )


def accountChanged(account: str, old: str | None, new: str, reason: str) -> None:
    """
    ``account-state``, once, when an existing account's state changed (a
    new account, ``old`` None, has no change of state to report).

    :param reason: ``operator`` (set through the API or the admin command),
        ``reauthorized`` (a new grant: ``reauth-required`` back to ``ok``),
        ``replaced`` (the account was created anew over the old one).
    """
    if old is not None and old != new:
        accountState(account, old, new, reason)


def accountAuthorized(account: str, email: str, app: str, flow: str) -> None:
    """
    The mailbox's owner granted access through onboarding.

    :param flow: ``consent`` (the browser redirect to ``/oauth2/callback``)
        or ``device`` (the device grant, from the admin command).
    """
    log.emit(
        LogLevel.info,
        "",
        event="account-authorized",
        account=account,
        email=email,
        app=app,
        flow=flow,
    )


def apiLogin(result: str, reason: str, address: str, endpoint: str) -> None:
    """
    A request to the HTTP API or ``/metrics`` refused for its Bearer token
    (accepted ones are not logged: a scrape every 15 s is not news).

    :param result: ``refused``.
    :param reason: the token check's reason code (``unknown-token``,
        ``expired``, ``scope``, ``address``) or ``penalty`` (429).
    :param endpoint: ``api`` or ``metrics``.
    """
    log.emit(
        LogLevel.info,
        "",
        event="api-login",
        result=result,
        reason=reason,
        client=address,
        endpoint=endpoint,
    )


def connectionLimit(account: str, protocol: str, waited: float) -> None:
    """
    A login refused because its account was at its connection cap
    (``NO [LIMIT]`` / ``421 4.7.0``), after waiting ``waited`` seconds.
    """
    log.emit(
        LogLevel.info,
        "",
        event="connection-limit",
        account=account,
        protocol=protocol,
        waited=round(waited, 3),
    )


def webhookDelivery(
    eventId: str, kind: str, receiver: str, result: str, attempts: int, detail: str
) -> None:
    """
    A webhook event's delivery to one receiver ended.

    :param receiver: scheme, host and port only (a URL's path may hold a key).
    :param result: ``delivered``, ``given-up`` (a 4xx), ``expired`` (retried
        for too long) or ``dropped`` (the queue was full).
    :param detail: the last HTTP status or error class.
    """
    log.emit(
        LogLevel.info if result == "delivered" else LogLevel.warn,
        "webhook {type} {event_id} to {receiver}: {result} after {attempts} attempt(s) ({detail})",
        event="webhook-delivery",
        event_id=eventId,
        type=kind,
        receiver=receiver,
        result=result,
        attempts=attempts,
        detail=detail,
    )


def commandRefused(info: dict[str, Any], command: str) -> None:
    """
    A restricted token's session sent a command the proxy refused (its
    restrictions forbid it) and the provider never saw.

    :param info: protocol, account, token_id and client of the session.
    :param command: the command's name (``STORE``, ``UID EXPUNGE``), never
        its arguments, which may hold mailbox names or message text.
    """
    log.emit(
        LogLevel.info,
        "",
        event="command-refused",
        account=_account(info.get("account")),
        token_id=info.get("token_id") or "-",
        client=info.get("client", "-"),
        command=command,
    )


def drain(phase: str, sessions: int, cut: int, duration: float) -> None:
    """
    The proxy stopping: ``phase`` ``start`` (``sessions`` to end) or ``end``
    (``sessions`` that ended at a clean point, ``cut`` those cut when the
    drain timeout came; ``duration`` in seconds).
    """
    log.emit(
        LogLevel.info,
        "",
        event="drain",
        phase=phase,
        sessions=sessions,
        cut=cut,
        duration=round(duration, 6),
    )


def throttled(account: str, protocol: str, reason: str, at: float, until: float) -> None:
    """A provider throttled an account's login; its logins back off until ``until``."""
    log.emit(
        LogLevel.info,
        "",
        event="throttled",
        account=_account(account),
        protocol=protocol,
        reason=reason,
        at=round(at, 3),
        until=round(until, 3),
    )
