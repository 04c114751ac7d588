"""
``twisted.cred`` for the proxy: the checker decides whether a client's token
lets it in; the realm turns the account id it yields into a logged-in
upstream connection (the avatar).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .errors import (
    AccessDenied,
    AuthenticationFailed,
    CertificateRejected,
    GrantInvalid,
    UpstreamRejectedToken,
)
from .model import Account, Token, validAccountId
from .oauth import AccessTokens
from .penalties import LoginPenalties, PenaltyInForce, PenaltyStatus
from .store import IAccountStore, ITokenStore
from .tokens import checkToken, looksLikeToken, tokenId
from .upstream import AddressCache, TLSOptionsCache, UpstreamProtocol, connectUpstream

log = Logger()

IMAP_SCOPE = "imap-proxy"
API_SCOPE = "api"


class ITokenCredentials(ICredentials):
    account = Attribute(
        "The account id the client names as its user name (str), or None where "
        "the token alone says (the API checks account access per route)."
    )
    token = Attribute("The token presented as the password (str).")
    address = Attribute("The client's IP address (str), for IP restrictions and penalties.")
    protocol = Attribute("What the client logs in to (imap, smtp, api), for the log.")


@implementer(ITokenCredentials)
@attrs.frozen
class TokenCredentials:
    account: str | None
    token: str = attrs.field(repr=False)
    address: str
    protocol: str = "imap"


class IUpstreamSession(Interface):
    """The avatar: a logged-in upstream connection, ready to be spliced."""

    protocol = Attribute("The logged-in ``UpstreamProtocol``.")
    capabilities = Attribute("The provider's capabilities after login (list of bytes).")


@implementer(IUpstreamSession)
@attrs.define
class UpstreamSession:
    protocol: UpstreamProtocol
    account: str
    tokenId: str

    @property
    def capabilities(self) -> list[bytes]:
        return self.protocol.capabilities

    def logout(self) -> None:
        # Only called for a session never spliced (its client left during the
        # login): the connection is paused and has nothing to flush, so cut it.
        if self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


def loggableAccount(name: str) -> str:
    """
    A user name as typed, fit for a log line: a client that pastes its token
    into the user field must not get it logged.
    """
    if validAccountId(name) and not looksLikeToken(name.lower()):
        return name
    return "(not an account id)"


def _refusedName(account: str | None) -> str:
    """The account as a refusal line shows it: an account id, else ``-`` (no spaces)."""
    if account is None or loggableAccount(account) != account:
        return "-"
    return account


@implementer(ICredentialsChecker)
class TokenChecker:
    """
    The one place a presented token is checked, for every front door (IMAP
    now, SMTP and the API through ``check``): scope, account, address and
    expiry (``proxy.tokens.checkToken``), then the login penalty of the
    client's address.

    A penalised address's attempt is answered only once its penalty has run
    out, success or failure alike: a valid login from there is slowed, never
    made impossible, and the penalty does not stop any other address. With
    ``refuse`` (the API), an address that failed ``refuseAfter`` times is
    refused unchecked while its penalty lasts (``PenaltyInForce``).

    :param tokens: the token store.
    :param clock: ``IReactorTime``, for expiry, last-use times and penalties.
    :param scope: the scope a token needs here.
    :param penalties: ``LoginPenalties``, or None for none.
    :param refuse: refuse (``PenaltyInForce``) rather than wait once an
        address is past ``refuseAfter`` failures; for the API, where a 429
        costs less than a request held open.
    """

    credentialInterfaces = (ITokenCredentials,)

    def __init__(
        self,
        tokens: ITokenStore,
        clock: Any,
        scope: str = IMAP_SCOPE,
        penalties: LoginPenalties | None = None,
        refuse: bool = False,
    ):
        self._tokens = tokens
        self._clock = clock
        self._scope = scope
        self._penalties = penalties
        self._refuse = refuse
        self._penaltyStoreDown = False

    def requestAvatarId(self, credentials: TokenCredentials) -> Deferred[Any]:
        return ensureDeferred(self._avatarId(credentials))

    async def _avatarId(self, c: TokenCredentials) -> tuple[str, str]:
        record = await self.check(c)
        # The avatar id carries the token's id too, so a session can be found
        # (and closed) by the token it was opened with.
        return (c.account if c.account is not None else "", record.id)

    async def check(self, c: TokenCredentials) -> Token:
        """
        :return: the token's record when it may be used here.
        :raises AccessDenied: naming the first check that failed.
        :raises PenaltyInForce: with ``refuse``, past the failures allowed.
        """
        status = await self._penaltyStatus(c.address)
        if self._refuse and self._penalties is not None and self._penalties.refuses(status):
            raise PenaltyInForce(status.retryAfter)
        if status.remaining > 0 and self._penalties is not None:
            await self._penalties.wait(status)
        tid = tokenId(c.token)
        record = await self._tokens.getToken(tid)
        now = self._clock.seconds()
        try:
            checkToken(
                record,
                c.token,
                account=c.account,
                scope=self._scope,
                address=c.address,
                now=now,
            )
        except AccessDenied as e:
            # One fixed form for every protocol: docs/fail2ban/imapproxy.conf
            # matches it. The account is an account id or "-", never a space,
            # so a client cannot forge the part after "from".
            log.info(
                "{protocol} login refused for {account} from {address}: {reason}",
                protocol=c.protocol,
                account=_refusedName(c.account),
                address=c.address,
                reason=e.reason,
            )
            await self._penalize(c.address)
            raise
        assert record is not None
        self._tokens.touchToken(tid, now, c.address).addErrback(
            lambda f: log.failure("recording token use failed", f)
        )
        if self._penalties is not None and status.failures:
            await self._penaltyCall(self._penalties.succeeded(c.address, status))
        return record

    async def _penaltyStatus(self, address: str) -> PenaltyStatus:
        if self._penalties is None:
            return PenaltyStatus()
        status = await self._penaltyCall(self._penalties.status(address))
        return status if status is not None else PenaltyStatus()

    async def _penalize(self, address: str) -> None:
        if self._penalties is not None:
            await self._penaltyCall(self._penalties.failed(address))

    async def _penaltyCall(self, work: Any) -> Any:
        """
        Penalties fail open: a store that cannot count them must not refuse
        logins that the token check admits. Said once per outage.
        """
        try:
            result = await work
        except Exception as e:
            if not self._penaltyStoreDown:
                self._penaltyStoreDown = True
                log.warn("login penalties unavailable: {error}", error=type(e).__name__)
            return None
        self._penaltyStoreDown = False
        return result


def isCertificateReason(stateReason: str | None) -> bool:
    """Whether an account's state reason records a refused certificate."""
    if not stateReason:
        return False
    return stateReason.split(":", 1)[0] in CertificateRejected.REASONS


@implementer(IRealm)
class UpstreamRealm:
    """
    :param connect: ``(upstream, user, accessToken) -> Deferred[UpstreamProtocol]``.
    :param clock: ``IReactorTime``, for the time recorded with a refused
        certificate (default: the global reactor).
    :ivar warm: ``WarmUpstreams`` or None: spare logged-in connections for
        accounts that log in often.
    """

    warm: Any = None

    def __init__(
        self, accounts: IAccountStore, accessTokens: AccessTokens, connect: Any, clock: Any = None
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self._accounts = accounts
        self._access = accessTokens
        self._connect = connect
        self._clock = clock

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        if IUpstreamSession not in interfaces:
            raise NotImplementedError("only IUpstreamSession avatars")
        account, tid = avatarId
        d = ensureDeferred(self._login(account, tid))
        return d.addCallback(lambda s: (IUpstreamSession, s, s.logout))

    async def _login(self, accountId: str, tid: str) -> UpstreamSession:
        account = await self._accounts.getAccount(accountId)
        if account is None:
            log.info("login refused for {account}: no such account", account=accountId)
            raise AccessDenied("username")
        if account.state == "disabled":
            log.info("login refused for {account}: account disabled", account=accountId)
            raise AccessDenied("account-disabled")
        if account.state == "reauth-required":
            # Fail fast: the grant is known dead; asking the provider again
            # would only add load and latency until someone re-authorizes.
            raise GrantInvalid()
        proto = self.warm.take(account) if self.warm is not None else None
        if proto is None:
            try:
                proto = await self._upstream(account)
            except CertificateRejected as e:
                await self._certificateRefused(account, e)
                raise
        else:
            log.info("login of {account} takes a spare provider connection", account=accountId)
        if isCertificateReason(account.stateReason):
            # The certificate is trusted again (a new CA file, a renewed
            # certificate): the recorded refusal no longer holds.
            await self._setReason(account, None)
        if self.warm is not None:
            self.warm.loggedIn(account)
        return UpstreamSession(proto, accountId, tid)

    async def _certificateRefused(self, account: Account, error: CertificateRejected) -> None:
        """
        Tell the operator which certificate was refused and why, in the log
        and in the account's state reason (``accounts show``, the API); the
        state itself stays: the account is fine, its provider's certificate
        is not.
        """
        log.warn(
            "login of {account} refused the provider's certificate: {reason}: {detail}",
            account=account.id,
            reason=error.reason,
            detail=error.detail,
        )
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock.seconds()))
        await self._setReason(account, f"{error.reason}: {error.detail} ({when})")

    async def _setReason(self, account: Account, reason: str | None) -> None:
        """
        Set the account's state reason, its state unchanged. The account is
        read again first: an operator (or ``invalid_grant``) may have changed
        the state during the login, and that must not be undone.
        """
        try:
            current = await self._accounts.getAccount(account.id)
            if current is None or current.state != account.state:
                return
            if reason is None and not isCertificateReason(current.stateReason):
                return
            await self._accounts.setAccountState(account.id, current.state, reason)
        except Exception:
            log.failure("recording the state of {account} failed", account=account.id)

    def connectFor(self, account: Account) -> Deferred[UpstreamProtocol]:
        """A logged-in upstream connection for ``account`` (for spares)."""
        return ensureDeferred(self._upstream(account))

    async def _upstream(self, account: Account) -> UpstreamProtocol:
        accountId = account.id
        token = await self._access.get(account)
        try:
            return await self._connect(account.upstream, account.email, token.value)  # type: ignore[no-any-return]
        except UpstreamRejectedToken:
            if token.fresh:
                log.warn("provider refused a fresh access token for {account}", account=accountId)
                raise AuthenticationFailed() from None
            log.info(
                "provider refused the cached access token for {account}; refreshing",
                account=accountId,
            )
            token = await self._access.get(account, stale=token.value)
            try:
                return await self._connect(account.upstream, account.email, token.value)  # type: ignore[no-any-return]
            except UpstreamRejectedToken:
                log.warn("provider refused a fresh access token for {account}", account=accountId)
                raise AuthenticationFailed() from None


def upstreamConnector(reactor: Any, timeout: float) -> Any:
    """The realm's ``connect``, bound to a reactor, a time bound and a TLS cache."""
    tlsCache = TLSOptionsCache(reactor)
    addresses = AddressCache(reactor)

    def connect(upstream: Any, user: str, accessToken: str) -> Deferred[UpstreamProtocol]:
        return ensureDeferred(
            connectUpstream(reactor, upstream, user, accessToken, timeout, tlsCache, addresses)
        )

    return connect
