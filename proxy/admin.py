"""
The operations on accounts and tokens, with their validation, shared by the
admin command and the HTTP API: both are thin faces over these.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from typing import Any

import attrs
from twisted.logger import Logger

from .model import TLS_MODES, Account, OAuth2App, OAuth2Grant, Token, Upstream, validAccountId
from .tokens import looksLikeToken, newToken, parseNetworks, parseScopes, tokenId

log = Logger()


class AdminError(Exception):
    """
    A refused operation. ``message`` is safe to show (it never holds a secret);
    ``status`` is the HTTP status the API answers with.
    """

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(AdminError):
    status = 400


class NotFound(AdminError):
    status = 404


class Conflict(AdminError):
    status = 409


class Forbidden(AdminError):
    status = 403


# Provider presets: what an account on a big provider needs besides its own
# address and grant. ``{tenant}`` is filled from the account's tenant
# (default ``common``).
PRESETS: dict[str, dict[str, Any]] = {
    "gmail": {
        "imap": {"host": "imap.gmail.com", "port": 993, "tls": "implicit"},
        "tokenUrl": "https://oauth2.googleapis.com/token",
        "scopes": ["https://mail.google.com/"],
    },
    "outlook": {
        "imap": {"host": "outlook.office365.com", "port": 993, "tls": "implicit"},
        "tokenUrl": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "scopes": ["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"],
    },
    "generic": {},
}

# What an OAuth2 app of each provider talks to. Google offers no device flow
# for Gmail's scope; Microsoft does.
APP_PRESETS: dict[str, dict[str, Any]] = {
    "gmail": {
        "authorizationUrl": "https://accounts.google.com/o/oauth2/v2/auth",
        "tokenUrl": "https://oauth2.googleapis.com/token",
        "deviceAuthorizationUrl": None,
        "scopes": ["https://mail.google.com/", "openid", "email"],
    },
    "outlook": {
        "authorizationUrl": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        "tokenUrl": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "deviceAuthorizationUrl": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        "scopes": [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "offline_access",
            "openid",
            "email",
        ],
    },
    "generic": {},
}

ACCOUNT_FIELDS = {"account", "email", "provider", "tenant", "imap", "oauth2", "state"}
IMAP_FIELDS = {"host", "port", "tls", "caFile"}
OAUTH2_FIELDS = {"tokenUrl", "clientId", "clientSecret", "refreshToken", "scopes", "app"}
APP_FIELDS = {
    "app",
    "provider",
    "tenant",
    "clientId",
    "clientSecret",
    "redirectUrl",
    "authorizationUrl",
    "tokenUrl",
    "deviceAuthorizationUrl",
    "scopes",
}
TOKEN_FIELDS = {"account", "scopes", "description", "restrictions", "expires", "expiresIn"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidInput(message)


def _object(value: Any, name: str, allowed: set[str]) -> dict[str, Any]:
    _check(isinstance(value, dict), f"{name} must be an object")
    unknown = sorted(set(value) - allowed)
    _check(not unknown, f"{name}: unknown field(s): {', '.join(unknown)}")
    return value


def _string(value: Any, name: str, maxlen: int = 2048, empty: bool = False) -> str:
    _check(isinstance(value, str), f"{name} must be a string")
    _check(empty or bool(value.strip()), f"{name} must not be empty")
    _check(len(value) <= maxlen, f"{name} is too long (at most {maxlen} characters)")
    _check(not any(ord(c) < 32 for c in value), f"{name} must not contain control characters")
    _check(not any(0xD800 <= ord(c) <= 0xDFFF for c in value), f"{name} is not valid Unicode")
    return value


def _hostname(value: Any, name: str) -> str:
    host = _string(value, name, 253)
    _check(" " not in host and "/" not in host, f"{name} is not a host name")
    return host


def _https(value: Any, name: str) -> str:
    url = _string(value, name)
    _check(url.startswith("https://") and len(url) > 8, f"{name} must be an https:// URL")
    return url


def buildAccount(
    data: Any,
    existing: Account | None = None,
    accountId: str | None = None,
    app: OAuth2App | None = None,
) -> Account:
    """
    Validate an account description (the API's JSON shape) and build the
    ``Account``. With ``existing``, fields left out keep their values (PUT
    replaces what it names; secrets are kept unless given).

    :raises InvalidInput: naming the first field that is wrong.
    """
    data = _object(data, "account", ACCOUNT_FIELDS)
    aid = accountId if accountId is not None else data.get("account")
    if accountId is not None and "account" in data:
        _check(data["account"] == accountId, "account in the body differs from the URL")
    aid = _string(aid, "account", 128)
    _check(
        validAccountId(aid),
        "account: letters, digits and . _ @ + - only, "
        "starting with a letter or digit, at most 128 characters",
    )
    provider = data.get("provider", app.provider if app is not None else "generic")
    _check(
        isinstance(provider, str) and provider in PRESETS,
        f"provider must be one of {', '.join(PRESETS)}",
    )
    preset = PRESETS[provider]
    tenant = _string(data.get("tenant", "common"), "tenant", 128)
    _check(tenant.replace("-", "").replace(".", "").isalnum(), "tenant is not a tenant id")

    imap = _object(data.get("imap", {}), "imap", IMAP_FIELDS)
    old = existing.upstream if existing else None
    # The preset fills what is missing on a new account, or replaces the
    # imap settings only when the provider is named again explicitly.
    presetImap = preset.get("imap", {}) if existing is None or "provider" in data else {}
    host = imap.get("host", presetImap.get("host", old.host if old else None))
    _check(host is not None, "imap.host is required")
    port = imap.get("port", presetImap.get("port", old.port if old else 993))
    _check(
        isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536,
        "imap.port must be an integer 1-65535",
    )
    tls = imap.get("tls", presetImap.get("tls", old.tls if old else "implicit"))
    _check(tls in TLS_MODES, f"imap.tls must be one of {', '.join(TLS_MODES)}")
    _check(
        tls != "plain" or host in ("localhost", "127.0.0.1", "::1"),
        "imap.tls plain (no TLS at all) is allowed only to a server on this machine",
    )
    caFile = imap.get("caFile", old.caFile if old else None)
    if caFile is not None:
        caFile = _string(caFile, "imap.caFile", 4096)
        _check(caFile.startswith("/"), "imap.caFile must be an absolute path")

    oauth = _object(data.get("oauth2", {}), "oauth2", OAUTH2_FIELDS)
    oldGrant = existing.oauth2 if existing else None
    if app is not None:
        clientFields = sorted(set(oauth) & {"tokenUrl", "clientId", "clientSecret", "scopes"})
        _check(
            not clientFields,
            f"oauth2: {', '.join(clientFields)} come from the app; give only app and refreshToken",
        )
    tokenUrl = oauth.get("tokenUrl")
    if tokenUrl is None and "tokenUrl" in preset:
        tokenUrl = preset["tokenUrl"].format(tenant=tenant)
    if tokenUrl is None and oldGrant is not None:
        tokenUrl = oldGrant.tokenURL
    _check(app is not None or tokenUrl is not None, "oauth2.tokenUrl is required")
    scopes = oauth.get("scopes", preset.get("scopes", list(oldGrant.scopes) if oldGrant else []))
    _check(
        isinstance(scopes, list) and all(isinstance(s, str) and s and " " not in s for s in scopes),
        "oauth2.scopes must be a list of scope strings",
    )

    def secret(name: str, old: str | None) -> str:
        if name in oauth:
            return _string(oauth[name], f"oauth2.{name}", 8192)
        _check(old is not None, f"oauth2.{name} is required")
        return old  # type: ignore[return-value]

    email = data.get("email", existing.email if existing else None)
    _check(email is not None, "email is required")
    email = _string(email, "email", 320)
    _check("@" in email and " " not in email, "email is not a mail address")
    state = data.get("state")
    if state is None:
        state = existing.state if existing else "ok"
        if state == "reauth-required" and "refreshToken" in oauth:
            # A new grant is what re-authorization means.
            state = "ok"
    else:
        _check(state in ("ok", "disabled"), "state must be ok or disabled")
    upstream = Upstream(host=_hostname(host, "imap.host"), port=port, tls=tls, caFile=caFile)
    if app is not None:
        keep = oldGrant.refreshToken if oldGrant is not None else None
        return Account(
            id=aid,
            email=email,
            upstream=upstream,
            oauth2=OAuth2Grant(
                tokenURL=app.tokenURL,
                clientId=app.clientId,
                clientSecret=app.clientSecret,
                refreshToken=secret("refreshToken", keep),
                scopes=app.scopes,
                app=app.id,
            ),
            state=state,
            stateReason=None
            if state != (existing.state if existing else None)
            else (existing.stateReason if existing else None),
            created=existing.created if existing else 0.0,
        )
    return Account(
        id=aid,
        email=email,
        upstream=upstream,
        oauth2=OAuth2Grant(
            tokenURL=_https(tokenUrl, "oauth2.tokenUrl"),
            clientId=_string(
                oauth.get("clientId", oldGrant.clientId if oldGrant else None),
                "oauth2.clientId",
                1024,
            ),
            clientSecret=secret("clientSecret", oldGrant.clientSecret if oldGrant else None),
            refreshToken=secret("refreshToken", oldGrant.refreshToken if oldGrant else None),
            scopes=tuple(scopes),
        ),
        state=state,
        stateReason=None
        if state != (existing.state if existing else None)
        else (existing.stateReason if existing else None),
        created=existing.created if existing else 0.0,
    )


def buildApp(data: Any, appId: str | None = None) -> OAuth2App:
    """Validate an OAuth2 app description (the API's JSON shape)."""
    data = _object(data, "app", APP_FIELDS)
    aid = _string(appId if appId is not None else data.get("app"), "app", 128)
    _check(validAccountId(aid), "app: letters, digits and . _ @ + - only")
    provider = data.get("provider", "generic")
    _check(
        isinstance(provider, str) and provider in APP_PRESETS,
        f"provider must be one of {', '.join(APP_PRESETS)}",
    )
    preset = APP_PRESETS[provider]
    tenant = _string(data.get("tenant", "common"), "tenant", 128)
    _check(tenant.replace("-", "").replace(".", "").isalnum(), "tenant is not a tenant id")

    def url(name: str, required: bool) -> str | None:
        value = data.get(name)
        if value is None and preset.get(name) is not None:
            # Only the preset's own URLs are templates; what a user gives is
            # taken as it is.
            value = preset[name].format(tenant=tenant)
        if value is None:
            _check(not required, f"{name} is required for a {provider} app")
            return None
        return _https(value, name)

    scopes = data.get("scopes", preset.get("scopes", []))
    _check(
        isinstance(scopes, list) and all(isinstance(x, str) and x and " " not in x for x in scopes),
        "scopes must be a list of scope strings",
    )
    redirect = data.get("redirectUrl")
    if redirect is not None:
        redirect = _string(redirect, "redirectUrl")
        _check(
            redirect.startswith(("https://", "http://localhost", "http://127.0.0.1")),
            "redirectUrl must be https:// (or http:// on localhost)",
        )
    return OAuth2App(
        id=aid,
        provider=provider,
        clientId=_string(data.get("clientId"), "clientId", 1024),
        clientSecret=_string(data.get("clientSecret"), "clientSecret", 8192),
        redirectURL=redirect,
        authorizationURL=url("authorizationUrl", False),
        tokenURL=url("tokenUrl", True),  # type: ignore[arg-type]
        deviceURL=url("deviceAuthorizationUrl", False),
        scopes=tuple(scopes),
        tenant=tenant,
    )


def narrowTo(record: Token, caller: Token) -> Token:
    """
    Minting tokens is what the ``api`` scope is for, so an API token may issue
    ``imap-proxy`` and ``smtp`` tokens freely (for its own account, or any
    account when it is a root token). What it may not do is hand out more
    management power than it has: ``*`` only from ``*``, and a token that
    carries ``api`` or ``*`` no later-expiring and no wider in addresses than
    the caller (inheriting the caller's limits when none are asked for).

    :raises Forbidden: naming what is wider.
    """
    if "*" in record.scopes and "*" not in caller.scopes:
        raise Forbidden("only a token with scope * can grant scope *")
    if not ({"api", "*"} & set(record.scopes)):
        return record
    if caller.expires is not None:
        if record.expires is None:
            record = attrs.evolve(record, expires=caller.expires)
        elif record.expires > caller.expires:
            raise Forbidden("this token cannot grant API access that outlives it")
    if caller.addresses:
        if not record.addresses:
            record = attrs.evolve(record, addresses=caller.addresses)
        else:
            outer = [ipaddress.ip_network(n) for n in caller.addresses]
            for n in record.addresses:
                net = ipaddress.ip_network(n)
                if not any(
                    net.version == o.version and net.subnet_of(o)  # type: ignore[arg-type]
                    for o in outer
                ):
                    raise Forbidden(f"this token cannot grant API access from {n}")
    return record


def parseExpiry(data: dict[str, Any], now: float) -> float | None:
    """``expires`` (ISO 8601 time) or ``expiresIn`` (seconds) to a time."""
    if "expires" in data and "expiresIn" in data:
        raise InvalidInput("give expires or expiresIn, not both")
    if data.get("expiresIn") is not None:
        v = data["expiresIn"]
        _check(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 10 * 365 * 86400,
            "expiresIn must be a positive whole number of seconds (at most ten years)",
        )
        return now + v
    if data.get("expires") is not None:
        v = _string(data["expires"], "expires", 64)
        try:
            when = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidInput("expires must be an ISO 8601 time") from None
        _check(when.tzinfo is not None, "expires must include a time zone (e.g. Z)")
        t = when.timestamp()
        _check(t > now, "expires must be in the future")
        _check(t <= now + 10 * 365 * 86400, "expires must be within ten years")
        return t
    return None


def buildToken(data: Any, now: float) -> Token:
    """
    Validate a token request (the API's JSON shape) into a ``Token`` record
    without its id (filled in by ``Admin.issueToken``).
    """
    data = _object(data, "token request", TOKEN_FIELDS)
    account = data.get("account")
    if account is not None:
        account = _string(account, "account", 128)
    scopes = data.get("scopes")
    _check(
        isinstance(scopes, list) and all(isinstance(s, str) for s in scopes),
        "scopes must be a list of strings",
    )
    try:
        scopes = parseScopes(scopes)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    _check(data.get("description") is not None, "description is required")
    description = _string(data.get("description"), "description", 1024)
    restrictions = _object(data.get("restrictions") or {}, "restrictions", {"addresses"})
    addresses = restrictions.get("addresses") or []
    _check(
        isinstance(addresses, list)
        and all(isinstance(a, str) for a in addresses)
        and len(addresses) <= 256,
        "restrictions.addresses must be a list of CIDR strings",
    )
    try:
        networks = parseNetworks(addresses)
    except ValueError as e:
        raise InvalidInput(f"restrictions.addresses: {e}") from None
    return Token(
        id="",
        account=account,
        scopes=scopes,
        description=description.strip(),
        addresses=networks,
        created=now,
        expires=parseExpiry(data, now),
    )


class Admin:
    """
    :param store: accounts and tokens.
    :param sessions: the live sessions of this process (``close(account=,
        tokenId=)``), or None where there are none (the admin command).
    :param clock: ``IReactorTime`` or anything with ``seconds()``.
    :param bus: with a shared store, what carries close requests to the
        other instances (``publish(account, tokenId)``); None otherwise.
    """

    def __init__(self, store: Any, sessions: Any = None, clock: Any = None, bus: Any = None):
        self.store = store
        self.sessions = sessions
        self.bus = bus
        self._now = clock.seconds if clock is not None else time.time

    async def issueToken(self, data: Any, caller: Token | None = None) -> tuple[str, Token]:
        """
        :param caller: the token asking (over the API); None for the operator
            at the admin command.
        :return: the token (shown once) and its stored record.
        """
        record = buildToken(data, self._now())
        if caller is not None:
            record = narrowTo(record, caller)
        if record.account is not None and await self.store.getAccount(record.account) is None:
            raise NotFound(f"no account {record.account}")
        token, tid = newToken()
        record = attrs.evolve(record, id=tid)
        await self.store.addToken(record)
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

    async def revokeToken(self, tokenOrId: str, disconnect: bool = False) -> int:
        """
        :param disconnect: also close the live sessions opened with it.
        :return: how many sessions were closed.
        """
        record = await self.findToken(tokenOrId)
        if disconnect:
            await self._announce(tokenId=record.id)
        await self.store.removeToken(record.id)
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

    async def getAccount(self, accountId: str) -> Account:
        account = await self.store.getAccount(accountId)
        if account is None:
            raise NotFound(f"no account {accountId}")
        return account  # type: ignore[no-any-return]

    async def listAccounts(self) -> list[Account]:
        return list(await self.store.listAccounts())

    async def _appFor(self, data: Any) -> OAuth2App | None:
        oauth = data.get("oauth2") if isinstance(data, dict) else None
        if isinstance(oauth, dict) and oauth.get("app") is not None:
            return await self.getApp(_string(oauth["app"], "oauth2.app", 128))
        return None

    async def getApp(self, appId: str) -> OAuth2App:
        app = await self.store.getApp(appId)
        if app is None:
            raise NotFound(f"no OAuth2 app {appId}")
        return app  # type: ignore[no-any-return]

    async def listApps(self) -> list[OAuth2App]:
        return list(await self.store.listApps())

    async def createApp(self, data: Any, replace: bool = False) -> OAuth2App:
        app = buildApp(data)
        existing = await self.store.getApp(app.id)
        if existing is not None and not replace:
            raise Conflict(f"OAuth2 app {app.id} exists")
        if existing is not None:
            app = attrs.evolve(app, created=existing.created)
        await self.store.putApp(app)
        return await self.getApp(app.id)

    async def removeApp(self, appId: str) -> None:
        from .store import StoreError, StoreUnavailable

        await self.getApp(appId)
        try:
            await self.store.removeApp(appId)
        except StoreUnavailable:
            raise
        except StoreError as e:
            raise Conflict(f"OAuth2 app {appId} is in use: {e}") from None

    async def createAccount(self, data: Any, replace: bool = False) -> Account:
        account = buildAccount(data, app=await self._appFor(data))
        existing = await self.store.getAccount(account.id)
        if existing is not None and not replace:
            raise Conflict(f"account {account.id} exists")
        if existing is not None:
            account = attrs.evolve(account, created=existing.created)
        await self.store.putAccount(account)
        return await self.getAccount(account.id)

    async def updateAccount(self, accountId: str, data: Any) -> Account:
        existing = await self.getAccount(accountId)
        oauth = data.get("oauth2") if isinstance(data, dict) else None
        keys = set(oauth) if isinstance(oauth, dict) else set()
        leaving = (
            existing.oauth2.app is not None
            and isinstance(oauth, dict)
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
        if (
            app is None
            and existing.oauth2.app is not None
            and not (
                isinstance(data, dict)
                and isinstance(data.get("oauth2"), dict)
                and "clientId" in data["oauth2"]
            )
        ):
            app = await self.getApp(existing.oauth2.app)
        account = buildAccount(data, existing, accountId, app=app)
        await self.store.putAccount(account)
        return await self.getAccount(accountId)

    async def removeAccount(self, accountId: str) -> int:
        """Remove the account and its tokens; :return: sessions closed."""
        if await self.store.getAccount(accountId) is None:
            raise NotFound(f"no account {accountId}")
        await self._announce(account=accountId)
        if not await self.store.removeAccount(accountId):
            raise NotFound(f"no account {accountId}")
        return await self._close(account=accountId)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def accountView(a: Account) -> dict[str, Any]:
    """An account as shown to operators and API clients: secrets only as set/unset."""
    return {
        "account": a.id,
        "email": a.email,
        "imap": {
            "host": a.upstream.host,
            "port": a.upstream.port,
            "tls": a.upstream.tls,
            "caFile": a.upstream.caFile,
        },
        "oauth2": {
            "app": a.oauth2.app,
            "tokenUrl": a.oauth2.tokenURL,
            "clientId": a.oauth2.clientId,
            "clientSecretSet": bool(a.oauth2.clientSecret),
            "refreshTokenSet": bool(a.oauth2.refreshToken),
            "scopes": list(a.oauth2.scopes),
        },
        "state": a.state,
        "stateReason": a.stateReason,
        "created": _iso(a.created),
        "updated": _iso(a.updated),
    }


def appView(a: OAuth2App) -> dict[str, Any]:
    """An OAuth2 app as shown: the client secret only as set/unset."""
    return {
        "app": a.id,
        "provider": a.provider,
        "tenant": a.tenant,
        "clientId": a.clientId,
        "clientSecretSet": bool(a.clientSecret),
        "redirectUrl": a.redirectURL,
        "authorizationUrl": a.authorizationURL,
        "tokenUrl": a.tokenURL,
        "deviceAuthorizationUrl": a.deviceURL,
        "scopes": list(a.scopes),
        "created": _iso(a.created),
        "updated": _iso(a.updated),
    }


def tokenView(t: Token) -> dict[str, Any]:
    """A token's record (never the token)."""
    return {
        "id": t.id,
        "account": t.account,
        "description": t.description,
        "scopes": list(t.scopes),
        "restrictions": {"addresses": list(t.addresses)} if t.addresses else {},
        "created": _iso(t.created),
        "expires": _iso(t.expires),
        "lastUse": {"time": _iso(t.lastUseTime), "address": t.lastUseAddress}
        if t.lastUseTime
        else None,
    }
