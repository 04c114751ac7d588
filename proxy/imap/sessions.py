"""
The registry of live spliced sessions (each with an id an operator can list
and end), and of the close requests (revoke with disconnect, account
deletion) that logins still under way must not slip past.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, deque
from typing import Any

import attrs

from ..realm import ISubmissionSession
from ..relay import Splice
from ..restrictions import restrictionsView

BYE = b"* BYE Session ended by the operator"
SHUTDOWN_BYE = b"* BYE imapproxy is shutting down"
# Seconds between looks at the byte counters: ``lastActivity``'s precision.
SAMPLE_INTERVAL = 5.0


@attrs.define(eq=False)
class LiveSession:
    """
    What an operator sees of one spliced session. ``lastActivity`` costs the
    relay nothing: it is the last time the registry saw the session's byte
    counters move, checked whenever the sessions are listed (``sample``, also
    run every few seconds by the service), so it is exact to that interval.
    """

    id: str
    protocol: str
    account: str
    tokenId: str
    address: str
    upstream: str
    started: float
    splice: Splice
    lastActivity: float
    seen: int = 0
    # The token's IMAP restrictions as the API shows them; None: unrestricted.
    restrictions: dict[str, Any] | None = None

    @property
    def toProvider(self) -> int:
        return int(getattr(self.splice.client, "bytesReceived", 0))

    @property
    def toClient(self) -> int:
        return int(getattr(self.splice.upstream, "bytesReceived", 0))

    def view(self) -> dict[str, Any]:
        """The JSON form (the API's ``Session`` object)."""
        return {
            "id": self.id,
            "protocol": self.protocol,
            "account": self.account,
            "tokenId": self.tokenId,
            "address": self.address,
            "upstream": self.upstream,
            "started": _iso(self.started),
            "bytesToProvider": self.toProvider,
            "bytesToClient": self.toClient,
            "lastActivity": _iso(self.lastActivity),
            "restrictions": self.restrictions,
        }

    def lastLine(self) -> bytes:
        """What the client reads before the operator's close."""
        if self.protocol == "smtp":
            host = getattr(self.splice.client, "hostname", b"imapproxy")
            return b"421 4.7.0 " + host + b" Session ended by the operator"
        return BYE

    def shutdownLine(self) -> bytes:
        """What the client reads when the proxy stops (at a clean point)."""
        if self.protocol == "smtp":
            host = getattr(self.splice.client, "hostname", b"imapproxy")
            return b"421 4.3.2 " + host + b" Service shutting down"
        return SHUTDOWN_BYE


class SessionRegistry:
    """
    The live spliced sessions, by account and by token id, and the close
    requests that logins still under way must not slip past: a login whose
    token was checked just before a revocation (here or, through the store's
    bus, on another instance) is refused when it completes, not spliced.
    """

    def __init__(self, spares: Any = None, clock: Any = None) -> None:
        """
        :param spares: ``WarmUpstreams``: a closed account's spare goes too.
        :param clock: ``IReactorTime`` (``seconds()``), for the start and
            last-activity times; the wall clock by default.
        """
        self._splices: dict[Splice, Any] = {}
        self._live: dict[str, LiveSession] = {}
        self._ids: dict[Splice, str] = {}
        self._now = clock.seconds if clock is not None else time.time
        self._spares = spares
        # Close requests as (number, account, token id), oldest first, kept
        # while a login that began before them is still under way.
        self._closes: deque[tuple[int, str | None, str | None]] = deque()
        self._requests = 0
        # Logins under way, by the number of close requests seen when each began.
        self._pending: Counter[int] = Counter()
        # Called with (session, splice) when a session ends (metrics).
        self.ended: Any = None
        # Called with a command's name when a restricted session refuses one (metrics).
        self.refused: Any = None
        # While the proxy stops: called with each splice asked to end (drain).
        self.draining: Any = None

    def add(self, session: Any, splice: Splice) -> LiveSession:
        """
        A session spliced: its id is random, never derived from its token.
        The client address is the front door's (the one a PROXY header gave).
        """
        self._splices[splice] = session
        now = self._now()
        live = LiveSession(
            id=secrets.token_hex(12),
            protocol="smtp" if ISubmissionSession.providedBy(session) else "imap",
            account=str(session.account),
            tokenId=str(session.tokenId),
            address=str(getattr(splice.client, "address", "unknown")),
            upstream=_upstream(session, splice),
            started=now,
            splice=splice,
            lastActivity=now,
            restrictions=restrictionsView(getattr(session, "restrictions", None)),
        )
        self._live[live.id] = live
        self._ids[splice] = live.id
        if self.draining is not None:
            # A login that completed during a stop: it ends at once after its OK.
            self._drainOne(live)
        return live

    def drain(self, asked: Any) -> int:
        """
        Ask every session to end at its next clean point, with ``* BYE`` or
        ``421`` (``Splice.closeWhenIdle``), and every session spliced from
        now on as it starts. :param asked: called with each splice asked.
        :return: how many sessions there were.
        """
        self.draining = asked
        live = list(self._live.values())
        for one in live:
            self._drainOne(one)
        return len(live)

    def _drainOne(self, live: LiveSession) -> None:
        self.draining(live.splice)
        live.splice.closeWhenIdle(live.shutdownLine())

    def discard(self, session: Any, splice: Splice) -> None:
        self._live.pop(self._ids.pop(splice, ""), None)
        if self._splices.pop(splice, None) is not None and self.ended is not None:
            self.ended(session, splice)

    def sample(self) -> None:
        """Note which sessions moved bytes since the last look (``lastActivity``)."""
        now = self._now()
        for live in self._live.values():
            total = live.toProvider + live.toClient
            if total != live.seen:
                live.seen = total
                live.lastActivity = now

    def sessions(
        self, account: str | None = None, tokenId: str | None = None, protocol: str | None = None
    ) -> list[LiveSession]:
        """The live sessions matching every filter given, oldest first."""
        self.sample()
        return [
            s
            for s in self._live.values()
            if _matches(s.account, s.tokenId, account, tokenId)
            and (protocol is None or s.protocol == protocol)
        ]

    def get(self, sessionId: str) -> LiveSession | None:
        return self._live.get(sessionId)

    def end(self, sessionId: str) -> bool:
        """
        End one session: its client reads ``* BYE`` (IMAP) or ``421``
        (SMTP), then the connection closes. :return: whether it was here.
        """
        live = self._live.get(sessionId)
        if live is None:
            return False
        live.splice.closeWith(live.lastLine())
        return True

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
        # With neither: every session, which only a shutdown asks for.
        by = "shutdown" if account is None and tokenId is None else "operator"
        for sp in matched:
            sp.close(by)
        return len(matched)


def _matches(
    account: str | None, tokenId: str | None, wantAccount: str | None, wantToken: str | None
) -> bool:
    return (wantAccount is None or account == wantAccount) and (
        wantToken is None or tokenId == wantToken
    )


def _upstream(session: Any, splice: Splice) -> str:
    """``host:port`` of the provider: the SMTP server as configured, else the peer."""
    server = getattr(session, "server", None)
    if isinstance(server, str) and server:
        return server
    try:
        peer = splice.upstream.transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "unknown"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def liveRound(sessions: SessionRegistry, board: Any = None) -> None:
    """
    Every ``SAMPLE_INTERVAL``: note which sessions moved bytes and, with a
    shared store, publish this instance's sessions (``SessionBoard``) for
    the other instances' lists; a failed publication is logged, not raised.
    """
    sessions.sample()
    if board is not None:
        board.publish([s.view() for s in sessions.sessions()])
