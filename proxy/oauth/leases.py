"""
Refresh leases: one OAuth2 refresh per account at a time across proxy
instances that share a store. An instance holds an account's lease while it
refreshes, and renews it while a request is still out (a late answer may
carry a rotated refresh token that must be saved before anyone else uses the
grant). The lease expires by itself when its holder dies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from ..errors import Unavailable

# One namespace for the layer: the log lines operators watch say [proxy.oauth#…].
log = Logger(namespace="proxy.oauth")

T = TypeVar("T")


@attrs.define
class _Lease:
    value: str
    renewer: LoopingCall
    users: int = 1


class RefreshLeases:
    """
    :param lock: ``acquire(accountId, ttl) -> Deferred[lease | None]``,
        ``renew(accountId, lease, ttl) -> Deferred[bool]``,
        ``release(accountId, lease) -> Deferred``: the store's lock.
    :param clock: an ``IReactorTime``.
    :param ttl: seconds a lease lives unless renewed; what a crashed holder
        costs the other instances at most.
    """

    # Waits between attempts to take a lease another instance holds.
    POLL = (0.05, 0.1, 0.2, 0.25)

    def __init__(self, lock: Any, clock: Any, ttl: float = 5.0):
        self._lock = lock
        self._clock = clock
        self._ttl = ttl
        self._held: dict[str, _Lease] = {}

    def join(self, accountId: str) -> bool:
        """Use the lease this instance holds, if it holds one; :return: whether it does."""
        lease = self._held.get(accountId)
        if lease is None:
            return False
        lease.users += 1
        return True

    def leave(self, accountId: str) -> None:
        """Stop using the lease; the last user releases it."""
        lease = self._held.get(accountId)
        if lease is None:
            return
        lease.users -= 1
        if lease.users > 0:
            return
        del self._held[accountId]
        if lease.renewer.running:
            lease.renewer.stop()
        d = self._lock.release(accountId, lease.value)
        d.addErrback(
            lambda f: log.warn(
                "releasing the refresh lease of {account} failed ({why}); it expires by itself",
                account=accountId,
                why=f.getErrorMessage(),
            )
        )

    async def take(
        self, accountId: str, deadline: float, elsewhere: Callable[[], Awaitable[T | None]]
    ) -> T | None:
        """
        Take the account's lease, waiting while another instance holds it.

        :param deadline: when to give up (``clock.seconds()`` time).
        :param elsewhere: asked between attempts; what it finds (a token the
            holder refreshed) ends the wait.
        :return: None once the lease is held (the caller then ``leave``s it),
            or what ``elsewhere`` found.
        :raises Unavailable: past the deadline, or when the store fails.
        """
        attempt = 0
        while True:
            try:
                value = await self._lock.acquire(accountId, self._ttl)
            except Exception as e:
                log.warn(
                    "taking the refresh lease of {account} failed: {why}",
                    account=accountId,
                    why=str(e)[:200],
                )
                raise Unavailable("store-unavailable") from None
            if value is not None:
                if accountId in self._held:
                    # Taken meanwhile by another fetch here that shares it.
                    self._held[accountId].users += 1
                    self._lock.release(accountId, value).addErrback(lambda _: None)
                else:
                    self._hold(accountId, value)
                return None
            delay = self.POLL[min(attempt, len(self.POLL) - 1)]
            attempt += 1
            if self._clock.seconds() + delay >= deadline:
                log.warn(
                    "another instance is refreshing the token of {account}; gave up waiting for it",
                    account=accountId,
                )
                raise Unavailable("oauth2-timeout")
            await deferLater(self._clock, delay)
            if self.join(accountId):
                return None
            found = await elsewhere()
            if found is not None:
                return found

    def _hold(self, accountId: str, value: str) -> None:
        renewer = LoopingCall(self._renew, accountId, value)
        renewer.clock = self._clock
        self._held[accountId] = _Lease(value, renewer)
        renewer.start(self._ttl / 3, now=False).addErrback(
            lambda f: log.failure("renewing a refresh lease failed", f)
        )

    def _renew(self, accountId: str, value: str) -> Any:
        def renewed(ours: bool) -> None:
            if not ours:
                log.warn(
                    "the refresh lease of {account} expired while held (the store "
                    "was slow or restarted)",
                    account=accountId,
                )

        d = self._lock.renew(accountId, value, self._ttl)

        def failed(f: Any) -> None:
            # The store is having trouble; the lease lives on until its TTL.
            log.info(
                "renewing the refresh lease of {account} failed: {why}",
                account=accountId,
                why=f.getErrorMessage()[:200],
            )

        return d.addCallbacks(renewed, failed)
