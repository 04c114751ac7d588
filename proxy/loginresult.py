"""
How a refused login is logged and which refusal the client gets: the same
for the IMAP and the SMTP front doors, each then answering in its own
protocol (``imapResponse()`` or ``smtpResponse()``).
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger

from . import auditlog
from .errors import AccessDenied, ProxyError, Unavailable
from .model import validAccountId
from .store import StoreUnavailable


def refusal(
    failure: Any, log: Logger, what: str, account: str, address: str
) -> AccessDenied | ProxyError | None:
    """
    Log a failed login as an operator needs it, and say how to refuse it.

    :param what: how the log names the login (``"login"``, ``"smtp login"``).
    :param account: the account, as it may be logged (``loggableAccount``).
    :return: the error whose fixed response the client gets, or None for
        a bug (logged by :func:`logBug`): the caller answers its own
        fixed "internal error".
    """
    error = failure.value
    if isinstance(error, (AccessDenied, ProxyError)):
        if isinstance(error, ProxyError):
            log.warn(
                "{what} of {account} from {address} failed upstream: {reason}",
                what=what,
                account=account,
                address=address,
                reason=error.reason,
            )
        return error
    if isinstance(error, UnauthorizedLogin):
        return AccessDenied("unknown-token")
    if isinstance(error, StoreUnavailable):
        log.warn(
            "{what} of {account} from {address} failed: the store is unavailable",
            what=what,
            account=account,
            address=address,
        )
        return Unavailable()
    logBug(failure, log, what, account, address)
    return None


def logBug(failure: Any, log: Logger, what: str, account: str, address: str) -> None:
    """
    A bug, not an input: one line naming the error's type and where it
    came from, without a traceback (which might carry the token).
    """
    frames = getattr(failure, "frames", None) or [("", "?", 0)]
    _func, filename, line = frames[-1][:3]
    log.error(
        "{what} of {account} from {address} failed: unexpected {error} at {where}",
        what=what,
        account=account,
        address=address,
        error=failure.type.__name__,
        where=f"{filename.rsplit('/', 1)[-1]}:{line}",
    )


def outcome(failure: Any) -> tuple[str, str]:
    """
    A failed login as its ``login`` audit event says it: ``refused`` (the
    client's token, scope, address…) or ``failed`` (provider, store or a
    bug), and the fixed reason code, never the error's text.
    """
    error = failure.value
    if isinstance(error, AccessDenied):
        return "refused", error.reason
    if isinstance(error, UnauthorizedLogin):
        return "refused", "unknown-token"
    if isinstance(error, ProxyError):
        return "failed", error.reason
    if isinstance(error, StoreUnavailable):
        return "failed", "unavailable"
    return "failed", "internal"


def seconds(server: Any) -> float:
    """The time by the server's factory's clock (the reactor's by default)."""
    return float(clockOf(server)())


def clockOf(server: Any) -> Any:
    """
    ``seconds`` of the server's factory's clock (the reactor's by default),
    to call later: a bound method, smaller than a partial kept by every session.
    """
    clock: Any = getattr(getattr(server, "factory", None), "clock", None)
    return (clock or _reactor()).seconds


@functools.cache
def _reactor() -> Any:
    # Imported at the first use (the reactor is installed by then), once.
    from twisted.internet import reactor

    return reactor


def auditLogin(
    server: Any,
    protocol: str,
    result: str,
    reason: str,
    tokenId: str | None = None,
    early: bool = False,
) -> None:
    """
    The ``login`` audit event of a front door's login attempt, from what
    the server noted when it began (``_account``, ``_loginStarted``).

    :param early: refused before it began (no TLS, an unreadable name):
        no account, no duration.
    """
    now = seconds(server)
    started = getattr(server, "_loginStarted", None)
    if early or started is None:
        started = now
    account = None if early or not validAccountId(server._account) else server._account
    auditlog.login(protocol, result, reason, account, tokenId, server.address, now - started)
