"""
The registry of live spliced sessions, and of the close requests (revoke
with disconnect, account deletion) that logins still under way must not slip
past.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from ..relay import Splice


class SessionRegistry:
    """
    The live spliced sessions, by account and by token id, and the close
    requests that logins still under way must not slip past: a login whose
    token was checked just before a revocation (here or, through the store's
    bus, on another instance) is refused when it completes, not spliced.
    """

    def __init__(self, spares: Any = None) -> None:
        """:param spares: ``WarmUpstreams``: a closed account's spare goes too."""
        self._splices: dict[Splice, Any] = {}
        self._spares = spares
        # Close requests as (number, account, token id), oldest first, kept
        # while a login that began before them is still under way.
        self._closes: deque[tuple[int, str | None, str | None]] = deque()
        self._requests = 0
        # Logins under way, by the number of close requests seen when each began.
        self._pending: Counter[int] = Counter()
        # Called with (session, splice) when a session ends (metrics).
        self.ended: Any = None

    def add(self, session: Any, splice: Splice) -> None:
        self._splices[splice] = session

    def discard(self, session: Any, splice: Splice) -> None:
        if self._splices.pop(splice, None) is not None and self.ended is not None:
            self.ended(session, splice)

    def __iter__(self) -> Any:
        """The live sessions, as ``(session, splice)`` pairs (a snapshot)."""
        return iter([(s, sp) for sp, s in self._splices.items()])

    def __len__(self) -> int:
        return len(self._splices)

    def loginStarted(self) -> int:
        """:return: a ticket for ``loginEnded``, taken before the token is checked."""
        self._pending[self._requests] += 1
        return self._requests

    def loginEnded(self, ticket: int, account: str | None, tokenId: str | None) -> bool:
        """
        :return: whether a close request matching the account or token came
            after ``ticket`` was taken: the login must then be refused.
        """
        self._pending[ticket] -= 1
        if not self._pending[ticket]:
            del self._pending[ticket]
        closed = any(
            n > ticket and _matches(account, tokenId, a, t) for n, a, t in reversed(self._closes)
        )
        self._prune()
        return closed

    def _prune(self) -> None:
        oldest = min(self._pending, default=self._requests)
        while self._closes and self._closes[0][0] <= oldest:
            self._closes.popleft()

    def close(self, account: str | None = None, tokenId: str | None = None) -> int:
        """Close the matching sessions (all, with neither); :return: how many."""
        if account is not None and self._spares is not None:
            self._spares.discard(account)
        if account is not None or tokenId is not None:
            self._requests += 1
            if self._pending:
                self._closes.append((self._requests, account, tokenId))
        matched = [
            sp
            for sp, s in self._splices.items()
            if _matches(s.account, s.tokenId, account, tokenId)
        ]
        for sp in matched:
            sp.close()
        return len(matched)


def _matches(
    account: str | None, tokenId: str | None, wantAccount: str | None, wantToken: str | None
) -> bool:
    return (wantAccount is None or account == wantAccount) and (
        wantToken is None or tokenId == wantToken
    )
