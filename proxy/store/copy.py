"""
``imapproxy store copy FROM TO``: move a deployment from one store to another
(SQLite to Redis when a second instance joins, or back). Provider secrets are
read with the source's key and written with the target's; tokens keep their
hashes, so every token issued before still works; saved provider access tokens
come along, so no account needs a refresh on its first login after the move.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from ..admin import AdminError
from ._interfaces import IStore


@attrs.define
class CopyReport:
    apps: int = 0
    accounts: int = 0
    tokens: int = 0
    accessTokens: int = 0
    expiredTokens: int = 0

    def describe(self) -> str:
        text = (
            f"copied {self.apps} OAuth2 apps, {self.accounts} accounts, {self.tokens} tokens "
            f"and {self.accessTokens} saved access tokens"
        )
        if self.expiredTokens:
            text += f"; left out {self.expiredTokens} expired tokens"
        return text


async def copyStore(
    source: IStore, target: IStore, overwrite: bool = False, now: Callable[[], float] = time.time
) -> CopyReport:
    """
    Copy every OAuth2 app, account (with its state and grant), token and
    saved access token from ``source`` to ``target``. Consents in progress
    (ten minutes long) are not copied.

    :param overwrite: copy into a store that already holds something,
        replacing records with the same ids; refused otherwise.
    :raises AdminError: the target is not empty and ``overwrite`` is false.
    """
    if not overwrite:
        held = [
            f"{len(found)} {what}"
            for what, found in (
                ("OAuth2 apps", await target.listApps()),
                ("accounts", await target.listAccounts()),
                ("tokens", await target.listTokens(None)),
            )
            if found
        ]
        if held:
            raise AdminError(
                f"the target store is not empty ({', '.join(held)}): "
                "give --overwrite to copy into it anyway"
            )
    report = CopyReport()
    # Apps first: an account of a shared app refers to it.
    for app in await source.listApps():
        await target.putApp(app)
        report.apps += 1
    for account in await source.listAccounts():
        await target.putAccount(account)
        report.accounts += 1
        saved = await source.getAccessToken(account.id)
        if saved is not None:
            await target.saveAccessToken(account.id, *saved)
            report.accessTokens += 1
    cutoff = now() + 1.0
    for token in await source.listTokens(None):
        if token.expires is not None and token.expires <= cutoff:
            report.expiredTokens += 1
            continue
        if overwrite:
            await target.removeToken(token.id)
        await target.addToken(token)
        report.tokens += 1
    return report
