"""
How a refused login is logged and which refusal the client gets: the same
for the IMAP and the SMTP front doors, each then answering in its own
protocol (``imapResponse()`` or ``smtpResponse()``).
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger

from .errors import AccessDenied, ProxyError, Unavailable
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
