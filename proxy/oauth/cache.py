"""
The cache of provider access tokens: in memory until shortly before they
expire, bound to where they are used (an account that now points elsewhere
loses its token), and backed by the store's copy (saved encrypted by this or
another instance) so that a restart or a second instance need not refresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..model import Account

# One namespace for the layer: the log lines operators watch say [proxy.oauth#…].
log = Logger(namespace="proxy.oauth")

#: (access token, expiry time, lifetime) as kept in memory and in the store.
Entry = tuple[str, float, float]


@attrs.frozen
class AccessToken:
    """
    :ivar fresh: True when it was fetched for this request, so a refusal by
        the provider is final rather than a stale cache entry.
    """

    value: str = attrs.field(repr=False)
    expires: float | None
    fresh: bool


def fingerprint(account: Account) -> tuple:
    """What an access token is bound to: the mailbox, where it is used, who issued it."""
    u, g = account.upstream, account.oauth2
    return (account.email, u.host, u.port, u.tls, g.tokenURL, g.clientId, g.app)


def needsRefresh(expires: float | None, now: float, margin: float) -> bool:
    """
    Whether a cached token should be replaced: within ``margin`` seconds of its
    expiry (an unknown expiry is trusted for an hour from when it was fetched,
    which the caller folds into ``expires``).
    """
    return expires is None or now >= expires - margin


class TokenCache:
    """
    :param clock: an ``IReactorTime``.
    :param margin: replace a token this many seconds before it expires (half
        its lifetime at most, so a short-lived token is still reused).
    :param load: ``accountId -> Deferred[Entry | None]``: the token saved in
        the store, or None when there is no store copy.
    :param persist: ``(accountId, token, expires, lifetime) -> Deferred``.
    """

    UNKNOWN_LIFETIME = 3600.0
    MIN_LIFETIME = 60.0
    MAX_LIFETIME = 86400.0
    # Seconds of life a token must have left to be sent at all: a login
    # takes a few seconds, and a session is not cut when the token expires.
    VALID_SLACK = 5.0

    def __init__(
        self,
        clock: Any,
        margin: float = 300.0,
        load: Callable[[str], Deferred[Any]] | None = None,
        persist: Callable[[str, str, float, float], Deferred[Any]] | None = None,
    ):
        self._clock = clock
        self._margin = margin
        self._load = load
        self._persist = persist
        self._entries: dict[str, Entry] = {}
        self._fingerprints: dict[str, tuple] = {}

    def follow(self, account: Account) -> None:
        """
        Note where ``account`` points now: if that changed (mailbox, server,
        client), its old token must not be sent there, so it is dropped.
        """
        fp = fingerprint(account)
        if self._fingerprints.get(account.id) != fp:
            self._entries.pop(account.id, None)
            self._fingerprints[account.id] = fp

    def current(self, account: Account) -> bool:
        """Whether ``account`` still points where the cache last saw it point."""
        return self._fingerprints.get(account.id) in (None, fingerprint(account))

    def usable(self, accountId: str) -> AccessToken | None:
        """The cached token of ``accountId`` if still good for a login."""
        return self._usable(self._entries.get(accountId))

    def valid(self, accountId: str) -> AccessToken | None:
        """
        The cached token of ``accountId`` while it has not expired, even if
        due for its early refresh: what a login uses when that refresh fails.
        """
        entry = self._entries.get(accountId)
        if entry is None or entry[1] - self.VALID_SLACK <= self._clock.seconds():
            return None
        return AccessToken(entry[0], entry[1], fresh=False)

    def forget(self, accountId: str) -> None:
        self._entries.pop(accountId, None)

    def entry(self, value: str, started: float, expiresIn: float | None) -> Entry:
        """
        The cache entry for a token fetched by a request sent at ``started``:
        a provider's silly lifetime (0, negative, years) is not believed.
        """
        lifetime = expiresIn if expiresIn is not None else self.UNKNOWN_LIFETIME
        lifetime = min(max(lifetime, self.MIN_LIFETIME), self.MAX_LIFETIME)
        return (value, started + lifetime, lifetime)

    def keep(self, accountId: str, entry: Entry) -> None:
        self._entries[accountId] = entry

    async def saved(
        self, accountId: str, unless: str | None = None, polling: bool = False
    ) -> AccessToken | None:
        """
        A usable token from the store (cached here once found), other than
        ``unless`` (the one the provider just refused).

        :param polling: called again and again while another instance
            refreshes: a store failure is then a warning, not a traceback.
        """
        if self._load is None:
            return None
        try:
            entry = await self._load(accountId)
        except Exception:
            if polling:
                log.warn("reading the saved access token of {account} failed", account=accountId)
            else:
                log.failure("reading the saved access token of {account} failed", account=accountId)
            return None
        usable = self._usable(entry)
        if usable is None or usable.value == unless:
            if entry is not None and entry[0] != unless and accountId not in self._entries:
                # Due for its refresh but maybe still valid: kept for ``valid``.
                self._entries[accountId] = entry
            return None
        self._entries[accountId] = entry
        return usable

    async def persist(self, accountId: str, entry: Entry) -> None:
        """Save ``entry`` in the store for other instances and the next start."""
        if self._persist is None:
            return
        try:
            await self._persist(accountId, *entry)
        except Exception:
            log.failure("saving the access token of {account} failed", account=accountId)

    def _usable(self, entry: Entry | None) -> AccessToken | None:
        if entry is None:
            return None
        value, expires, lifetime = entry
        margin = min(self._margin, lifetime / 2)
        if needsRefresh(expires, self._clock.seconds(), margin):
            return None
        return AccessToken(value, expires, fresh=False)
