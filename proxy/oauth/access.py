"""
``AccessTokens``: what the realm asks for a provider access token. A façade
over the pieces that each do one job: the cache (``cache``), one refresh per
account at a time (``singleflight``), retries within a deadline
(``retry``), rotated refresh tokens (``rotation``) and the token endpoint
call itself (``refresher``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import CertificateRejected, GrantInvalid, ProxyError, Unavailable
from ..model import Account
from .cache import AccessToken, Entry, TokenCache
from .refresher import Grant
from .retry import RetryingRefresh, RetryPolicy
from .rotation import RotatedRefreshTokens
from .singleflight import SingleFlight, flightKey

# One namespace for the layer: the log lines operators watch say [proxy.oauth#…].
log = Logger(namespace="proxy.oauth")


class AccessTokens:
    """
    :param refresh: ``Account -> Deferred[Grant]``, one request to the token
        endpoint (``ThreadedRefresher.refresh``).
    :param saveRefreshToken: ``(accountId, refreshToken) -> Deferred``; called
        when the provider rotates the refresh token, before the new access
        token is used.
    :param clock: an ``IReactorTime`` (``seconds()``, ``callLater``).
    :param cache: the ``TokenCache`` (default: in memory only, 300 s margin).
    :param policy: the ``RetryPolicy`` (deadline and backoff).
    :param markReauth: ``(accountId, reason) -> Deferred``; called once when
        the provider answers ``invalid_grant``, to set the account's state.
    :param flight: the ``SingleFlight`` (default: this process only; give it
        the ``RefreshLeases`` when instances share the store).
    """

    UNKNOWN_LIFETIME = TokenCache.UNKNOWN_LIFETIME
    MIN_LIFETIME = TokenCache.MIN_LIFETIME
    MAX_LIFETIME = TokenCache.MAX_LIFETIME

    def __init__(
        self,
        refresh: Callable[[Account], Deferred[Grant]],
        saveRefreshToken: Callable[[str, str], Deferred[Any]],
        clock: Any,
        cache: TokenCache | None = None,
        policy: RetryPolicy = RetryPolicy(),
        markReauth: Callable[[str, str], Deferred[Any]] | None = None,
        flight: SingleFlight | None = None,
    ):
        self._clock = clock
        self._cache = cache if cache is not None else TokenCache(clock)
        self._rotation = RotatedRefreshTokens(saveRefreshToken)
        self._flight = flight if flight is not None else SingleFlight()
        self._markReauth = markReauth
        self._retry = RetryingRefresh(refresh, clock, self, self._flight.keep, policy)
        # Accounts whose last refresh failed for want of the token endpoint,
        # and the logins waiting for an early refresh, told when one does.
        self._troubled: set[str] = set()
        self._trouble: dict[str, list[Deferred[None]]] = {}
        # Each account's latest save under way (``_save``): the next waits for it.
        self._saving: dict[str, Deferred[None]] = {}

    def forget(self, accountId: str) -> None:
        self._cache.forget(accountId)
        self._troubled.discard(accountId)

    def get(
        self, account: Account, force: bool = False, stale: str | None = None
    ) -> Deferred[AccessToken]:
        """
        A usable access token for ``account``.

        :param force: ignore the cache.
        :param stale: the token the provider just refused: refresh, unless the
            cache already holds a newer one (another login refreshed meanwhile),
            so a burst of refusals of one token costs one refresh.
        """
        self._cache.follow(account)
        cached = self._cache.usable(account.id)
        if stale is not None and (cached is None or cached.value == stale):
            force = True
        if cached is not None and not force:
            return succeed(cached)
        key = flightKey(account)
        joined = self._flight.busy(key)
        if joined:
            self._retry.nudge(account.id)
        d = self._flight.run(key, lambda: self._fetch(account, force, stale))
        if joined and stale is not None:
            # The fetch under way may only be re-reading the saved token
            # that was just refused: then refresh after it.
            return ensureDeferred(self._afterFlight(d, account, stale))
        if not force:
            # Maybe an early refresh: a token still valid (in memory, or the
            # store's copy the fetch reads) must not fail this login when
            # the token endpoint is in trouble.
            troubled = joined or account.id in self._troubled
            wait = 0.0 if troubled else self._retry.policy.earlyWait
            trouble: Deferred[None] = Deferred()
            self._trouble.setdefault(account.id, []).append(trouble)
            out = early(d, lambda: self._cache.valid(account.id), self._clock, wait, trouble)
            return out.addBoth(self._settled, account.id, trouble)
        return d

    def _settled(self, result: Any, accountId: str, trouble: Deferred[None]) -> Any:
        waiting = self._trouble.get(accountId, [])
        if trouble in waiting:
            waiting.remove(trouble)
            if not waiting:
                del self._trouble[accountId]
        return result

    async def _afterFlight(
        self, flight: Deferred[AccessToken], account: Account, stale: str
    ) -> AccessToken:
        token = await flight
        if token.value == stale:
            return await self.get(account, stale=stale)
        return token

    async def _fetch(self, account: Account, force: bool, stale: str | None) -> AccessToken:
        if not force:
            saved = await self._cache.saved(account.id)
            if saved is not None:
                return saved
        started = self._clock.seconds()
        deadline = started + self._retry.policy.deadline
        return await self._flight.held(
            account,
            deadline,
            lambda: self._cache.saved(account.id, unless=stale, polling=True),
            lambda held: self._retry.run(held, started, deadline),
        )

    # -- Outcomes: what the retries report ---------------------------------

    def prepare(self, account: Account) -> Account:
        return self._rotation.apply(account)

    def cached(self, accountId: str) -> AccessToken | None:
        return self._cache.usable(accountId)

    async def refused(self, account: Account, error: ProxyError) -> None:
        if isinstance(error, Unavailable) and not isinstance(error, CertificateRejected):
            # Trouble at the token endpoint: a token still valid stays usable,
            # and logins waiting for this refresh use it now.
            self._troubled.add(account.id)
            for waiting in self._trouble.pop(account.id, []):
                waiting.callback(None)
        else:
            self._cache.forget(account.id)
        if isinstance(error, GrantInvalid):
            self._rotation.drop(account.id)
            await self._reauthRequired(account.id, error, account.state)

    async def accept(
        self, account: Account, grant: Grant, started: float, stored: str | None
    ) -> AccessToken:
        """
        Keep a new access token (and a rotated refresh token).

        :param stored: the refresh token in the store when this refresh was
            asked for (``account`` may carry an unsaved rotated one instead).
        """
        self._troubled.discard(account.id)
        entry = self._cache.entry(grant.accessToken, started, grant.expiresIn)
        current = self._cache.current(account)
        if current:
            # Cached before anything is awaited: a login waiting for this
            # refresh must find it, not start another with the same grant.
            self._cache.keep(account.id, entry)
            if grant.refreshToken is not None:
                base = stored if stored is not None else account.oauth2.refreshToken
                self._rotation.rotated(account, base, grant.refreshToken)
        await self._rotation.save(account.id)
        if current:
            ensureDeferred(self._save(account.id, entry))
        log.info(
            "new provider access token for {account}, valid {lifetime:.0f}s",
            account=account.id,
            lifetime=entry[2],
        )
        return AccessToken(grant.accessToken, entry[1], fresh=True)

    async def _save(self, accountId: str, entry: Entry) -> None:
        """
        Save a new token for other instances and the next start while the
        login goes on. The refresh lease is kept until it is saved, and the
        saves of one account go one after another: an older token never
        lands after a newer one.
        """
        release = self._flight.keep(accountId)
        before = self._saving.get(accountId)
        done: Deferred[None] = Deferred()
        self._saving[accountId] = done
        try:
            if before is not None:
                await before
            await self._cache.persist(accountId, entry)  # logs its own failure
        finally:
            release()
            if self._saving.get(accountId) is done:
                del self._saving[accountId]
            done.callback(None)

    async def _reauthRequired(self, accountId: str, error: GrantInvalid, old: str = "-") -> None:
        reason = "invalid_grant" + (f": {error.detail}" if error.detail else "")
        # Also the account-state audit event (its fields after the text's).
        log.warn(
            "account {account} needs re-authorization: the provider answered {answer}",
            account=accountId,
            answer=reason,
            event="account-state",
            old_state=old,
            new_state="reauth-required",
            reason="invalid-grant",
        )
        if self._markReauth is not None:
            try:
                await self._markReauth(accountId, reason)
            except Exception:
                log.failure("recording the state of {account} failed", account=accountId)


def early(
    refresh: Deferred[AccessToken],
    valid: Callable[[], AccessToken | None],
    clock: Any,
    wait: float,
    trouble: Deferred[None] | None = None,
) -> Deferred[AccessToken]:
    """
    What ``refresh`` brings, unless it fails or takes more than ``wait``
    seconds (or ``trouble`` fires: an attempt failed) while ``valid()`` has a
    token still valid: then that one, and the refresh goes on (and is
    retried) in the background. Only a dead grant
    fails the login at once: the provider said the owner must consent again.
    """
    out: Deferred[AccessToken] = Deferred()

    def settle(result: Any) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        failed = isinstance(result, Failure)
        if out.called:
            if failed and not isinstance(result.value, ProxyError):
                log.failure("an early token refresh failed", result)
            return
        inHand = valid() if failed and not isinstance(result.value, GrantInvalid) else None
        if inHand is not None:
            log.info(
                "refreshing an access token failed ({reason}); the one still valid is used",
                reason=getattr(result.value, "reason", "error"),
            )
            out.callback(inHand)
        elif failed:
            out.errback(result)
        else:
            out.callback(result)

    def waited() -> None:
        inHand = valid()
        if inHand is not None and not out.called:
            out.callback(inHand)

    timer = clock.callLater(wait, waited) if wait > 0 else None
    refresh.addBoth(settle)
    if trouble is not None:
        trouble.addCallback(lambda _: waited())
    if timer is None and not out.called:
        waited()
    return out
