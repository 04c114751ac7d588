"""
Rotated refresh tokens: a provider that rotates hands out a new refresh token
with each access token and may treat the reuse of the old one as theft. The
new one is saved before the access token is used; when the save fails it is
kept in memory and used instead of the stored one until a save succeeds, so a
store hiccup loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..model import Account
from .cache import fingerprint

# One namespace for the layer: the log lines operators watch say [proxy.oauth#…].
log = Logger(namespace="proxy.oauth")


@attrs.frozen
class _Unsaved:
    base: str | None  # the stored refresh token it was rotated from
    rotated: str = attrs.field(repr=False)
    fingerprint: tuple


class RotatedRefreshTokens:
    """
    :param save: ``(accountId, refreshToken) -> Deferred``: store the new
        refresh token (encrypted).
    """

    def __init__(self, save: Callable[[str, str], Deferred[Any]]):
        self._save = save
        self._unsaved: dict[str, _Unsaved] = {}

    def apply(self, account: Account) -> Account:
        """
        ``account`` with a rotated refresh token that could not be saved yet,
        if it still applies: the stored grant is the one it was rotated from
        and the account still points where it did.
        """
        entry = self._unsaved.get(account.id)
        if entry is None:
            return account
        if entry.base != account.oauth2.refreshToken or entry.fingerprint != fingerprint(account):
            # Re-authorized or moved since: the rotated token is stale.
            del self._unsaved[account.id]
            return account
        return attrs.evolve(
            account, oauth2=attrs.evolve(account.oauth2, refreshToken=entry.rotated)
        )

    def drop(self, accountId: str) -> None:
        """Forget an unsaved rotation (the grant is dead)."""
        self._unsaved.pop(accountId, None)

    def rotated(self, account: Account, base: str | None, new: str) -> None:
        """The provider answered a refresh made with ``base`` with ``new``."""
        self._unsaved[account.id] = _Unsaved(base, new, fingerprint(account))
        log.info("provider rotated the refresh token of {account}", account=account.id)

    async def save(self, accountId: str) -> None:
        """Save the account's unsaved rotated refresh token, if it has one."""
        entry = self._unsaved.get(accountId)
        if entry is None:
            return
        try:
            await self._save(accountId, entry.rotated)
        except Exception:
            log.failure(
                "saving the rotated refresh token of {account} failed; "
                "keeping it in memory and retrying on the next refresh",
                account=accountId,
            )
        else:
            if self._unsaved.get(accountId) is entry:
                del self._unsaved[accountId]
