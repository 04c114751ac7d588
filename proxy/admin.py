"""
The operations on accounts, OAuth2 apps and tokens, shared by the admin
command and the HTTP API: both are thin faces over these. Request bodies are
validated against the API's schemas (``proxy.validation``) and built into
records there; what needs the store or the caller (minting bounds, conflicts,
sessions to close) is decided here.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import attrs
from twisted.logger import Logger

from . import auditlog
from .model import Account, OAuth2App, Token
from .presets import APP_PRESETS, PRESETS
from .restrictions import imapRestrictions, inheritRestrictions
from .store import IStore, StoreError, StoreUnavailable
from .tokens import looksLikeToken, newToken, parseNetworks, parseScopes, tokenId, withinLimits
from .validation import (
    AdminError,
    InvalidInput,
    buildAccount,
    buildApp,
    fields,
    requireObject,
    validate,
)
from .views import accountView, appView, tokenView

__all__ = [
    "APP_PRESETS",
    "IMAP_FIELDS",
    "PRESETS",
    "SMTP_FIELDS",
    "Admin",
    "AdminError",
    "Conflict",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "accountView",
    "appView",
    "buildAccount",
    "buildApp",
    "buildToken",
    "inheritLimits",
    "parseExpiry",
    "tokenView",
]

log = Logger()


class NotFound(AdminError):
    status = 404


class Conflict(AdminError):
    status = 409


class Forbidden(AdminError):
    status = 403


# The imap and smtp settings an account (or a consent) may give: the API's schema's.
IMAP_FIELDS = fields("ImapSettings")
SMTP_FIELDS = fields("SmtpSettings")
# For callers that check an object's fields themselves.
_object = requireObject

TEN_YEARS = 10 * 365 * 86400


def inheritLimits(record: Token, minter: Token, data: dict[str, Any]) -> Token:
    """
    A token minted by another takes the minter's expiry and networks where
    the request leaves them out, so that asking for less is never refused
    (``withinLimits`` then refuses what asks for more).
    """
    if minter.expires is not None and data.get("expires") is None and data.get("expiresIn") is None:
        record = attrs.evolve(record, expires=minter.expires)
    if minter.addresses and not record.addresses:
        record = attrs.evolve(record, addresses=minter.addresses)
    return inheritRestrictions(record, minter, data)


def parseExpiry(data: dict[str, Any], now: float) -> float | None:
    """
    ``expires`` (ISO 8601 time) or ``expiresIn`` (seconds) to a time; the
    schema has checked their types, ranges and that not both are given.
    """
    if data.get("expiresIn") is not None:
        return now + int(data["expiresIn"])
    if data.get("expires") is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(data["expires"].replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput("expires must be an ISO 8601 time") from None
    if when.tzinfo is None:
        raise InvalidInput("expires must include a time zone (e.g. Z)")
    t = when.timestamp()
    if t <= now:
        raise InvalidInput("expires must be in the future")
    if t > now + TEN_YEARS:
        raise InvalidInput("expires must be within ten years")
    return t


def buildToken(data: Any, now: float) -> Token:
    """
    Validate a token request (the API's JSON shape) into a ``Token`` record
    without its id (filled in by ``Admin.issueToken``).
    """
    data = validate("TokenRequest", data, "token request")
    restrictions = data.get("restrictions") or {}
    try:
        networks = parseNetworks(restrictions.get("addresses") or [])
    except ValueError as e:
        raise InvalidInput(f"restrictions.addresses: {e}") from None
    return Token(
        id="",
        account=data.get("account"),
        scopes=parseScopes(data["scopes"]),  # known and not empty: the schema says so
        description=data["description"].strip(),
        addresses=networks,
        created=now,
        expires=parseExpiry(data, now),
        restrictions=imapRestrictions(restrictions, data["scopes"]),
    )


class Admin:
    """
    :param store: accounts and tokens.
    :param sessions: the live sessions of this process (``close(account=,
        tokenId=)``), or None where there are none (the admin command).
    :param clock: ``IReactorTime`` or anything with ``seconds()``.
    :param bus: with a shared store, what carries close requests to the
        other instances (``publish(account, tokenId)``); None otherwise.
    :param board: with a shared store, the ``SessionBoard`` where every
        instance publishes its live sessions; None otherwise.
    """

    def __init__(
        self,
        store: IStore,
        sessions: Any = None,
        clock: Any = None,
        bus: Any = None,
        board: Any = None,
    ):
        self.store = store
        self.sessions = sessions
        self.bus = bus
        self.board = board
        self._now = clock.seconds if clock is not None else time.time

    async def issueToken(self, data: Any, caller: Token | None = None) -> tuple[str, Token]:
        """
        :param caller: the token asking (over the API), which bounds what it
            may mint (``withinLimits``); None for the operator at the admin
            command, who has the store itself.
        :return: the token (shown once) and its stored record.

        Each change here logs a ``change`` audit event naming its actor: the
        API caller's token id, or ``cli`` (the default) for the admin command.
        """
        record = buildToken(data, self._now())
        if caller is not None:
            record = inheritLimits(record, caller, data)
            refused = withinLimits(caller, record)
            if refused is not None:
                raise Forbidden(refused)
        if record.account is not None and await self.store.getAccount(record.account) is None:
            raise NotFound(f"no account {record.account}")
        token, tid = newToken()
        record = attrs.evolve(record, id=tid)
        await self.store.addToken(record)
        auditlog.change("token.issue", tid, caller.id if caller is not None else "cli")
        return token, record

    async def listTokens(self, account: str | None = None) -> list[Token]:
        if account is not None and await self.store.getAccount(account) is None:
            raise NotFound(f"no account {account}")
        return list(await self.store.listTokens(account))

    async def findToken(self, tokenOrId: str) -> Token:
        """A token by its id or by the token itself."""
        value = tokenOrId.strip().lower()
        if not looksLikeToken(value):
            raise NotFound("no such token")
        record = await self.store.getToken(value)
        if record is None:
            record = await self.store.getToken(tokenId(value))
        if record is None:
            raise NotFound("no such token")
        return record

    async def revokeToken(
        self, tokenOrId: str, disconnect: bool = False, actor: str = "cli"
    ) -> int:
        """
        :param disconnect: also close the live sessions opened with it.
        :return: how many sessions were closed.
        """
        record = await self.findToken(tokenOrId)
        if disconnect:
            await self._announce(tokenId=record.id)
        await self.store.removeToken(record.id)
        auditlog.change("token.revoke", record.id, actor)
        if disconnect:
            return await self._close(tokenId=record.id)
        return 0

    async def _announce(self, account: str | None = None, tokenId: str | None = None) -> None:
        """
        Before a removal: tell the other instances sharing the store to close
        the matching sessions. Failing here fails the whole operation (nothing
        was removed yet), so a retry can still reach them.
        """
        if self.bus is not None:
            await self.bus.publish(account, tokenId)

    async def _close(self, account: str | None = None, tokenId: str | None = None) -> int:
        """
        After a removal: close the matching sessions here, and tell the other
        instances once more (a login they checked between the announcement
        and the removal is closed too); :return: how many were closed here.
        """
        closed = 0
        if self.sessions is not None:
            closed = int(self.sessions.close(account=account, tokenId=tokenId))
        if self.bus is not None:
            try:
                await self.bus.publish(account, tokenId)
            except Exception as e:
                log.error(
                    "asking the other instances to close sessions failed: {why}",
                    why=str(e)[:200],
                )
        return closed

    async def listSessions(
        self, account: str | None = None, token: str | None = None, protocol: str | None = None
    ) -> list[dict[str, Any]]:
        """
        The live sessions matching every filter given: this process's, and
        with a shared store those the other instances last published.

        :param token: a token id or the token itself.
        """
        if protocol is not None and protocol not in ("imap", "smtp"):
            raise InvalidInput("protocol must be imap or smtp")
        views = [s.view() for s in self.sessions.sessions()] if self.sessions is not None else []
        if self.board is not None:
            views = [{**v, "instance": self.board.instance} for v in views]
            views += await self.board.others()
        tokens = None if token is None else {token.strip().lower(), tokenId(token.strip().lower())}
        return [
            v
            for v in views
            if (account is None or v.get("account") == account)
            and (protocol is None or v.get("protocol") == protocol)
            and (tokens is None or v.get("tokenId") in tokens)
        ]

    async def endSession(self, sessionId: str, account: str | None = None) -> None:
        """
        End one live session (its client reads ``* BYE`` or ``421``): here,
        or through the bus on the instance that published it.

        :param account: the caller's account, for an account token: another
            account's session is as unknown as a missing one.
        """
        live = self.sessions.get(sessionId) if self.sessions is not None else None
        if live is not None and account in (None, live.account):
            self.sessions.end(sessionId)
        elif live is None and self.board is not None and self.bus is not None:
            views = [v for v in await self.board.others() if v.get("id") == sessionId]
            if not views or account not in (None, views[0].get("account")):
                raise NotFound("no such session")
            await self.bus.publish(session=sessionId)
        else:
            raise NotFound("no such session")
        log.info("session {id} ended by the operator", id=sessionId)

    async def getAccount(self, accountId: str) -> Account:
        account = await self.store.getAccount(accountId)
        if account is None:
            raise NotFound(f"no account {accountId}")
        return account  # type: ignore[no-any-return]

    async def listAccounts(self) -> list[Account]:
        return list(await self.store.listAccounts())

    async def _appFor(self, data: dict[str, Any]) -> OAuth2App | None:
        """The shared app a (validated) account body names, if any."""
        app = data.get("oauth2", {}).get("app")
        return None if app is None else await self.getApp(app)

    async def getApp(self, appId: str) -> OAuth2App:
        app = await self.store.getApp(appId)
        if app is None:
            raise NotFound(f"no OAuth2 app {appId}")
        return app  # type: ignore[no-any-return]

    async def listApps(self) -> list[OAuth2App]:
        return list(await self.store.listApps())

    async def createApp(self, data: Any, replace: bool = False, actor: str = "cli") -> OAuth2App:
        app = buildApp(data)
        existing = await self.store.getApp(app.id)
        if existing is not None and not replace:
            raise Conflict(f"OAuth2 app {app.id} exists")
        if existing is not None:
            app = attrs.evolve(app, created=existing.created)
        await self.store.putApp(app)
        auditlog.change("app.replace" if existing else "app.create", app.id, actor)
        return await self.getApp(app.id)

    async def removeApp(self, appId: str, actor: str = "cli") -> None:
        await self.getApp(appId)
        try:
            await self.store.removeApp(appId)
        except StoreUnavailable:
            raise
        except StoreError as e:
            raise Conflict(f"OAuth2 app {appId} is in use: {e}") from None
        auditlog.change("app.delete", appId, actor)

    async def createAccount(self, data: Any, replace: bool = False, actor: str = "cli") -> Account:
        data = validate("AccountFields", data, "account")
        account = buildAccount(data, app=await self._appFor(data))
        existing = await self.store.getAccount(account.id)
        if existing is not None and not replace:
            raise Conflict(f"account {account.id} exists")
        if existing is not None:
            account = attrs.evolve(account, created=existing.created)
        await self.store.putAccount(account)
        auditlog.change("account.replace" if existing else "account.create", account.id, actor)
        auditlog.accountChanged(account.id, existing and existing.state, account.state, "replaced")
        return await self.getAccount(account.id)

    async def updateAccount(self, accountId: str, data: Any, actor: str = "cli") -> Account:
        data = validate("AccountUpdate", data, "account")
        existing = await self.getAccount(accountId)
        oauth = data.get("oauth2")
        keys = set(oauth) if oauth is not None else set()
        leaving = (
            existing.oauth2.app is not None
            and oauth is not None
            and oauth.get("app") is None
            and bool({"clientId", "tokenUrl", "scopes", "app"} & keys)
        )
        if leaving and not {"clientSecret", "refreshToken"} <= keys:
            # Leaving a shared app must not carry its secret, nor the grant
            # it issued, to a client (and token URL) of the caller's choosing.
            raise InvalidInput(
                "oauth2.clientSecret and oauth2.refreshToken are required when leaving an app"
            )
        app = await self._appFor(data)
        if app is None and existing.oauth2.app is not None and "clientId" not in keys:
            app = await self.getApp(existing.oauth2.app)
        account = buildAccount(data, existing, accountId, app=app)
        await self.store.putAccount(account)
        auditlog.change("account.update", accountId, actor)
        why = "operator" if "state" in data else "reauthorized"  # a new grant, or a state set
        auditlog.accountChanged(accountId, existing.state, account.state, why)
        return await self.getAccount(accountId)

    async def removeAccount(self, accountId: str, actor: str = "cli") -> int:
        """Remove the account and its tokens; :return: sessions closed."""
        if await self.store.getAccount(accountId) is None:
            raise NotFound(f"no account {accountId}")
        await self._announce(account=accountId)
        if not await self.store.removeAccount(accountId):
            raise NotFound(f"no account {accountId}")
        auditlog.change("account.delete", accountId, actor)
        return await self._close(account=accountId)
