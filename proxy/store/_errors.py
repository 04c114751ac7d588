"""
What every store refuses with, and the check of its secret key: one place, so
that the SQLite, Redis and in-memory stores (and their callers) agree.
"""

from __future__ import annotations

from twisted.logger import Logger

from ..encryption import SecretKeyError, Secrets

log = Logger()

# Encrypted under the store's key when the store is created; a key that cannot
# decrypt it is the wrong key, and the store refuses to open.
KEY_CHECK = "imapproxy key check"


class StoreError(Exception):
    """The store cannot be opened or used; the message is safe to show."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or does not answer in time: worth retrying."""


class StoreDataLost(StoreUnavailable):
    """
    The store answers but its data is gone: the marker written when it was
    created is missing or is another store's (a Redis restarted empty, a
    database replaced). Logins are refused as unavailable, not as wrong
    passwords, and ``/health`` says why.
    """


def keyMatches(secrets: Secrets, stored: str) -> bool:
    """Whether ``secrets`` decrypts the stored key check."""
    try:
        return secrets.decrypt(stored) == KEY_CHECK
    except SecretKeyError:
        return False


def wrongKey(where: str) -> StoreError:
    """The refusal of a store opened with a key that is not its own."""
    return StoreError(
        f"the secret key does not match the store {where}: "
        "refusing to start (give the key the store's secrets were last "
        "encrypted with: the newest one after 'imapproxy secrets rotate')"
    )


def markerProblem(expected: str | None, found: str | None, hint: str) -> str | None:
    """
    Compare the marker a store read when it opened with the one there now.

    :param hint: what most likely emptied this kind of store, for the reason.
    :return: None when they agree (or the store never opened), else the
        reason, safe to show.
    """
    if expected is None or found == expected:
        return None
    if not found:
        return f"data lost: marker missing ({hint})"
    return "data lost: marker changed (the store was created again since this process opened it)"


class MarkerWatch:
    """
    Holds the marker a store read when it opened, compares it with what the
    store holds now, and logs a loss once (and its end once).

    :param where: the store, for log lines (no credentials).
    :param hint: what most likely emptied this kind of store.
    """

    def __init__(self, where: str, hint: str):
        self.where = where
        self.hint = hint
        self.expected: str | None = None
        self.lost: str | None = None

    def check(self, found: str | None) -> None:
        """
        :raises StoreDataLost: the marker is missing or another store's.
        """
        problem = markerProblem(self.expected, found, self.hint)
        if problem is None:
            if self.lost is not None:
                self.lost = None
                log.info("the store {where} has its data again", where=self.where)
            return
        if self.lost != problem:
            self.lost = problem
            log.error(
                "the store {where} answers but has lost its data: {why}; logins are "
                "refused as unavailable until it is restored or this process restarts",
                where=self.where,
                why=problem,
            )
        raise StoreDataLost(problem)
