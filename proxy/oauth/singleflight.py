"""
One refresh per account at a time: logins of one account that need a token
together share one fetch in this process, and instances that share a store
take the account's refresh lease (``RefreshLeases``) first, so the provider
sees one refresh per account across the cluster and a rotating grant is
never used twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from ..model import Account
from .cache import AccessToken, fingerprint
from .leases import RefreshLeases

T = TypeVar("T")

#: (account id, fingerprint): an account that now points elsewhere never
#: joins a fetch made for its old settings.
Key = tuple[str, tuple]


def flightKey(account: Account) -> Key:
    return (account.id, fingerprint(account))


class SingleFlight:
    """
    :param leases: ``RefreshLeases`` when instances share the store, else None.
    :param reload: ``accountId -> Deferred[Account | None]``: the account as
        stored, read once the lease is held (another instance may have rotated
        the refresh token meanwhile).
    """

    def __init__(
        self,
        leases: RefreshLeases | None = None,
        reload: Callable[[str], Deferred[Any]] | None = None,
    ):
        self._leases = leases
        self._reload = reload
        self._waiting: dict[Key, list[Deferred[Any]]] = {}

    def busy(self, key: Key) -> bool:
        """Whether a fetch for ``key`` is under way here (a new caller joins it)."""
        return key in self._waiting

    def run(self, key: Key, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """The result of the fetch under way for ``key``, or of ``start()``."""
        waiter: Deferred[T] = Deferred()
        if key in self._waiting:
            self._waiting[key].append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        ensureDeferred(start()).addBoth(self._done, key)
        return waiter

    def _done(self, result: Any, key: Key) -> None:
        for waiter in self._waiting.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def keep(self, accountId: str) -> Callable[[], None]:
        """
        Share the lease this instance holds for ``accountId`` (if any) until
        the returned callable is called: a request still out after its login
        gave up keeps the lease until its answer is saved.
        """
        leases = self._leases
        if leases is None or not leases.join(accountId):
            return lambda: None
        return lambda: leases.leave(accountId)

    async def held(
        self,
        account: Account,
        deadline: float,
        savedElsewhere: Callable[[], Awaitable[AccessToken | None]],
        refresh: Callable[[Account], Awaitable[AccessToken]],
    ) -> AccessToken:
        """
        ``refresh(account)`` while holding the account's lease, or the token
        another instance saved while it held the lease.

        :param deadline: when to stop waiting for the lease.
        :param savedElsewhere: the token saved in the store, if it is usable
            and not the one the provider just refused.
        """
        leases = self._leases
        if leases is None:
            return await refresh(account)
        if not leases.join(account.id):
            found = await leases.take(account.id, deadline, savedElsewhere)
            if found is not None:
                return found
            # Held now. The holder before may have saved a token, or rotated
            # the refresh token, just before letting go.
            try:
                found = await savedElsewhere()
                stored = await self._reload(account.id) if self._reload is not None else None
            except BaseException:
                leases.leave(account.id)
                raise
            if found is not None:
                leases.leave(account.id)
                return found
            if stored is not None and fingerprint(stored) == fingerprint(account):
                account = stored
        try:
            return await refresh(account)
        finally:
            leases.leave(account.id)
