"""
Warm upstream connections: for an account that logs in often (a mail client
that reconnects, a script run every few minutes), keep one spare connection
to its provider, already logged in, and hand it to the account's next login.
That login then costs the client's TLS handshake and the token check only,
not a second TLS handshake and an XOAUTH2 round trip in series.

A spare is only ever handed to a login whose token check passed for that
account, and only while the account still points where the spare was made
(mailbox, server, OAuth2 client): a changed, disabled, re-authorizing or
deleted account never gets one. A spare never outlives the access token it
logged in with (``tokenExpires``, stamped by the realm): the provider may
end such a session, and it would be a session of a grant since revoked.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from ..model import Account
from ..oauth import fingerprint

log = Logger(namespace="proxy.upstream")

# Seconds of the access token's life a spare gives up, so that it is never
# handed out with its token about to expire.
TOKEN_SLACK = 30.0


def stampToken(protocol: Any, expires: float | None) -> Any:
    """Note on a logged-in connection when its access token expires."""
    try:
        protocol.tokenExpires = expires
    except AttributeError:
        pass
    return protocol


def spareLife(keep: float, tokenExpires: float | None, now: float) -> float:
    """Seconds a new spare may wait: ``keep``, and never past its token's expiry."""
    if tokenExpires is None:
        return keep
    return min(keep, tokenExpires - TOKEN_SLACK - now)


@attrs.define
class _Spare:
    protocol: Any
    fingerprint: tuple
    expiry: Any


class WarmUpstreams:
    """
    :param connect: ``Account -> Deferred[UpstreamProtocol]``: a logged-in
        connection (access token included).
    :param clock: ``IReactorTime``.
    :param keep: seconds a spare waits for a login; also the window in
        which an account must log in ``often`` times to get one. 0: never.
    :param often: logins within ``keep`` that make an account worth a spare.
    :param maxSpares: spares kept at most in all (the least recently made go
        first): each is a connection to a provider.
    """

    def __init__(
        self,
        connect: Callable[[Account], Deferred[Any]],
        clock: Any,
        keep: float = 300.0,
        often: int = 2,
        maxSpares: int = 500,
    ):
        self._connect = connect
        self._clock = clock
        self.keep = keep
        self.often = often
        self.maxSpares = maxSpares
        self._spares: OrderedDict[str, _Spare] = OrderedDict()
        self._warming: set[str] = set()
        # Spares to be connected in the reactor's next turn (``loggedIn``).
        self._starting: dict[str, Any] = {}
        # Accounts whose spare under way must be thrown away when it comes.
        self._unwanted: set[str] = set()
        self._logins: dict[str, deque[float]] = {}
        self._stopped = False
        # Spares handed to a login, and logged out unused (for metrics).
        self.handedOut = 0
        self.discarded = 0

    def __len__(self) -> int:
        return len(self._spares)

    def accounts(self) -> list[str]:
        """The accounts a spare waits for (connection caps: ``SlotKeeper.checkSpares``)."""
        return list(self._spares)

    def take(self, account: Account) -> Any:
        """The account's spare, logged in and claimed, or None."""
        spare = self._spares.pop(account.id, None)
        if spare is None:
            return None
        if spare.expiry.active():
            spare.expiry.cancel()
        if spare.fingerprint != fingerprint(account) or account.state != "ok":
            spare.protocol.discard()
            return None
        if not spare.protocol.claim():
            return None
        self.handedOut += 1
        return spare.protocol

    def loggedIn(self, account: Account) -> None:
        """
        A login of ``account`` succeeded: make it a spare for its next login
        if it logs in often (and has none).
        """
        if self.keep <= 0 or self._stopped:
            return
        now = self._clock.seconds()
        times = self._logins.setdefault(account.id, deque(maxlen=self.often))
        times.append(now)
        self._forgetOld(now)
        if len(times) < self.often or now - times[0] > self.keep:
            return
        if account.id in self._spares or account.id in self._warming:
            return
        # Warming from now on (a discard marks it unwanted), but connected in
        # the reactor's next turn: after the login that called this is answered.
        self._warming.add(account.id)
        self._starting[account.id] = self._clock.callLater(0, self._start, account)

    def _start(self, account: Account) -> None:
        del self._starting[account.id]
        if self._stopped or account.id in self._unwanted:
            self._warming.discard(account.id)
            self._unwanted.discard(account.id)
            return
        ensureDeferred(self._warm(account)).addErrback(
            lambda f: log.failure("making a spare connection failed", f)
        )

    def _forgetOld(self, now: float) -> None:
        # Bounded memory: accounts not seen within the window are dropped.
        if len(self._logins) > 4 * self.maxSpares + 1000:
            for key in [k for k, t in self._logins.items() if now - t[-1] > self.keep]:
                del self._logins[key]

    async def _warm(self, account: Account) -> None:
        try:
            protocol = await self._connect(account)
        except Exception as e:
            log.info(
                "no spare connection for {account}: {why}",
                account=account.id,
                why=getattr(e, "reason", None) or type(e).__name__,
            )
            return
        finally:
            self._warming.discard(account.id)
        if protocol is None:
            return  # the account is at its connection cap: no spare
        unwanted = account.id in self._unwanted
        self._unwanted.discard(account.id)
        if self._stopped or unwanted or account.id in self._spares:
            protocol.discard()
            return
        life = spareLife(self.keep, getattr(protocol, "tokenExpires", None), self._clock.seconds())
        if life <= 0:
            # Its token is about to expire: not worth keeping.
            protocol.discard()
            return
        while len(self._spares) >= self.maxSpares:
            _, oldest = self._spares.popitem(last=False)
            self._drop(oldest)
        spare = _Spare(
            protocol,
            fingerprint(account),
            self._clock.callLater(life, self.discard, account.id),
        )
        self._spares[account.id] = spare
        protocol.keepAsSpare(lambda: self._lost(account.id, protocol))
        log.info(
            "a spare provider connection waits for the next login of {account}",
            account=account.id,
        )

    def _lost(self, accountId: str, protocol: Any) -> None:
        spare = self._spares.get(accountId)
        if spare is not None and spare.protocol is protocol:
            del self._spares[accountId]
            if spare.expiry.active():
                spare.expiry.cancel()

    def _drop(self, spare: _Spare) -> None:
        self.discarded += 1
        if spare.expiry.active():
            spare.expiry.cancel()
        spare.protocol.discard()

    def discard(self, accountId: str) -> None:
        """Log out the account's spare (expired, or the account changed or went)."""
        if accountId in self._warming:
            self._unwanted.add(accountId)
        spare = self._spares.pop(accountId, None)
        if spare is not None:
            self._drop(spare)

    def stop(self) -> None:
        """Log out every spare and make no more."""
        self._stopped = True
        for call in self._starting.values():
            call.cancel()
        self._starting.clear()
        while self._spares:
            _, spare = self._spares.popitem()
            self._drop(spare)
