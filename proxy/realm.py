"""
The realm of ``twisted.cred`` for the proxy: an account id that passed the
token check becomes a logged-in connection to the account's provider, the
avatar: an IMAP one (``IUpstreamSession``) or an SMTP submission one
(``ISubmissionSession``), as the front door asks. Both take the same way:
the account's state, an access token, the login, a cached token the
provider refuses refreshed once and tried again, and what the operator must
fix recorded in the account's state reason. ``proxy.cred`` re-exports it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .errors import (
    AccessDenied,
    AuthenticationFailed,
    CertificateRejected,
    GrantInvalid,
    NoSMTPServer,
    ProviderThrottled,
    SMTPAuthDisabled,
    UpstreamRejectedToken,
)
from .model import Account, Restrictions
from .oauth import AccessTokens
from .store import IAccountStore
from .upstream import SMTPUpstreamProtocol, UpstreamConnector, UpstreamProtocol, ehloName
from .upstream.slots import withSlot
from .upstream.spares import stampToken

# The same namespace as before the realm left cred.py: operators match it.
log = Logger(namespace="proxy.cred")


class IUpstreamSession(Interface):
    """The IMAP avatar: a logged-in upstream connection, ready to be spliced."""

    protocol = Attribute("The logged-in ``UpstreamProtocol``.")
    capabilities = Attribute("The provider's capabilities after login (a tuple of bytes).")


class ISubmissionSession(Interface):
    """
    The SMTP avatar: a logged-in connection to the account's SMTP submission
    server, paused, ready to be spliced (``proxy.relay.Splice``). The
    ``mind`` of ``portal.login`` is the client's EHLO name (str) or None.
    """

    protocol = Attribute(
        "The logged-in ``SMTPUpstreamProtocol``: ``transport``, ``takeOver``, ``bytesReceived``."
    )
    account = Attribute("The account id (str).")
    tokenId = Attribute("The id of the token the client logged in with (str).")
    server = Attribute("``host:port`` of the account's SMTP server (str).")
    extensions = Attribute(
        "The provider's EHLO keywords with their parameters, as offered over TLS "
        'before AUTH (list of bytes, e.g. ``b"SIZE 35882577"``).'
    )

    def logout() -> None:
        """End a session that was never spliced."""


@implementer(IUpstreamSession)
@attrs.define
class UpstreamSession:
    protocol: UpstreamProtocol
    account: str
    tokenId: str
    # The token's IMAP restrictions; None: unrestricted (the byte splice).
    restrictions: Restrictions | None = None

    @property
    def capabilities(self) -> tuple[bytes, ...]:
        return self.protocol.capabilities

    def logout(self) -> None:
        # Only called for a session never spliced (its client left during the
        # login): the connection is paused and has nothing to flush, so cut it.
        if self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


@implementer(ISubmissionSession)
@attrs.define
class SubmissionSession:
    protocol: SMTPUpstreamProtocol
    account: str
    tokenId: str
    server: str

    @property
    def extensions(self) -> list[bytes]:
        return self.protocol.extensions

    def logout(self) -> None:
        # As for IMAP: never spliced, paused, nothing to flush.
        if self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


def isCertificateReason(stateReason: str | None) -> bool:
    """Whether an account's state reason records a refused certificate."""
    if not stateReason:
        return False
    return stateReason.split(":", 1)[0] in CertificateRejected.REASONS


def isSMTPAuthReason(stateReason: str | None) -> bool:
    """Whether an account's state reason records SMTP AUTH turned off."""
    return bool(stateReason) and stateReason.split(":", 1)[0] == SMTPAuthDisabled.reason  # type: ignore[union-attr]


@implementer(IRealm)
class UpstreamRealm:
    """
    :param connect: ``(upstream, user, accessToken) -> Deferred[UpstreamProtocol]``,
        the IMAP login (``UpstreamConnector``).
    :param clock: ``IReactorTime``, for the time recorded with a refusal
        (default: the global reactor).
    :param connectSMTP: ``(upstream, user, accessToken, ehloName) ->
        Deferred[SMTPUpstreamProtocol]``; default: ``connect.smtp``.
    :ivar warm: ``WarmUpstreams`` or None: spare logged-in IMAP connections
        for accounts that log in often.
    :ivar slots: ``SlotKeeper`` or None: each account's connection cap.
    """

    warm: Any = None
    slots: Any = None
    #: ``proxy.throttle.Throttles`` or None: the back-off of throttled accounts.
    throttles: Any = None

    def __init__(
        self,
        accounts: IAccountStore,
        accessTokens: AccessTokens,
        connect: Any,
        clock: Any = None,
        connectSMTP: Any = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self._accounts = accounts
        self._access = accessTokens
        self._connect = connect
        self._connectSMTP = (
            connectSMTP if connectSMTP is not None else getattr(connect, "smtp", None)
        )
        self._clock = clock

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        account, tid, *more = avatarId  # (account, token id[, restrictions])
        for iface in interfaces:
            if iface is IUpstreamSession:
                imap = ensureDeferred(self._login(account, tid, more[0] if more else None))
                return imap.addCallback(lambda s: (IUpstreamSession, s, s.logout))
            if iface is ISubmissionSession and self._connectSMTP is not None:
                smtp = ensureDeferred(self._loginSMTP(account, tid, ehloName(mind)))
                return smtp.addCallback(lambda s: (ISubmissionSession, s, s.logout))
        raise NotImplementedError("only IUpstreamSession and ISubmissionSession avatars")

    async def _account(self, accountId: str, smtp: bool = False) -> Account:
        """The account, when its state lets it log in (``smtp``: to send)."""
        account = await self._accounts.getAccount(accountId)
        protocol = "SMTP " if smtp else ""
        if account is None:
            log.info(
                "{p}login refused for {account}: no such account", p=protocol, account=accountId
            )
            raise AccessDenied("username")
        if account.state == "disabled":
            log.info(
                "{p}login refused for {account}: account disabled", p=protocol, account=accountId
            )
            raise AccessDenied("account-disabled")
        if smtp and account.smtp is None:
            log.info("SMTP login refused for {account}: no SMTP server set", account=accountId)
            raise NoSMTPServer()
        if account.state == "reauth-required":
            # Fail fast: the grant is known dead; asking the provider again
            # would only add load and latency until someone re-authorizes.
            if self.warm is not None and not smtp:
                self.warm.discard(accountId)
            raise GrantInvalid()
        return account

    async def _login(
        self, accountId: str, tid: str, restrictions: Restrictions | None = None
    ) -> UpstreamSession:
        account = await self._account(accountId)
        proto = self.warm.take(account) if self.warm is not None else None
        if proto is None:
            try:
                proto = await self._upstream(account)
            except CertificateRejected as e:
                await self._certificateRefused(account, e)
                raise
        else:
            log.info("login of {account} takes a spare provider connection", account=accountId)
        await self._clearReason(account, isCertificateReason)
        if self.warm is not None:
            self.warm.loggedIn(account)
        return UpstreamSession(proto, accountId, tid, restrictions)

    async def _loginSMTP(self, accountId: str, tid: str, ehlo: str) -> SubmissionSession:
        account = await self._account(accountId, smtp=True)
        smtp = account.smtp
        connectSMTP = self._connectSMTP
        assert smtp is not None and connectSMTP is not None

        def connect(accessToken: str) -> Awaitable[SMTPUpstreamProtocol]:
            return connectSMTP(smtp, account.email, accessToken, ehlo)  # type: ignore[no-any-return]

        try:
            proto = await withSlot(
                self.slots,
                account,
                "smtp",
                smtp,
                lambda: self._withAccessToken(account, connect, "smtp"),
            )
        except CertificateRejected as e:
            await self._certificateRefused(account, e)
            raise
        except SMTPAuthDisabled:
            await self._smtpAuthDisabled(account)
            raise
        await self._clearReason(account, lambda r: isCertificateReason(r) or isSMTPAuthReason(r))
        return SubmissionSession(proto, accountId, tid, f"{smtp.host}:{smtp.port}")

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
        await self._setReason(account, f"{error.reason}: {error.detail} ({self._now()})")

    async def _smtpAuthDisabled(self, account: Account) -> None:
        """
        The provider (Microsoft 365) has SMTP AUTH turned off for the
        mailbox: tell the operator the exact fix, in the log and in the
        account's state reason, until an SMTP login succeeds.
        """
        fix = f"Set-CASMailbox -Identity {account.email} -SmtpClientAuthenticationDisabled $false"
        log.warn(
            "SMTP login of {account} refused: the provider has SMTP AUTH disabled for "
            "{mailbox}; fix: {fix}",
            account=account.id,
            mailbox=account.email,
            fix=fix,
        )
        reason = f"{SMTPAuthDisabled.reason}: SMTP AUTH is disabled for this mailbox; fix: {fix}"
        await self._setReason(account, f"{reason} ({self._now()})")

    def _now(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock.seconds()))

    async def _clearReason(self, account: Account, stale: Callable[[str | None], bool]) -> None:
        """After a login: clear a recorded refusal the login shows no longer holds."""
        if stale(account.stateReason):
            await self._setReason(account, None, stale)

    async def _setReason(
        self,
        account: Account,
        reason: str | None,
        stale: Callable[[str | None], bool] = isCertificateReason,
    ) -> None:
        """
        Set the account's state reason, its state unchanged. The account is
        read again first: an operator (or ``invalid_grant``) may have changed
        the state during the login, and that must not be undone; a reason is
        only cleared (``reason`` None) while it is ``stale``.
        """
        try:
            current = await self._accounts.getAccount(account.id)
            if current is None or current.state != account.state:
                return
            if reason is None and not stale(current.stateReason):
                return
            await self._accounts.setAccountState(account.id, current.state, reason)
        except Exception:
            log.failure("recording the state of {account} failed", account=account.id)

    def connectFor(self, account: Account) -> Deferred[UpstreamProtocol | None]:
        """
        A logged-in upstream connection for ``account`` (for spares); None
        when the account is at its connection cap (a spare never waits).
        """
        return ensureDeferred(self._upstream(account, spare=True))

    async def _upstream(self, account: Account, spare: bool = False) -> UpstreamProtocol:
        def connect(accessToken: str) -> Awaitable[UpstreamProtocol]:
            return self._connect(account.upstream, account.email, accessToken)  # type: ignore[no-any-return]

        return await withSlot(  # type: ignore[no-any-return]
            self.slots,
            account,
            "imap",
            account.upstream,
            lambda: self._withAccessToken(account, connect),
            wait=not spare,
        )

    async def _withAccessToken(
        self, account: Account, connect: Callable[[str], Awaitable[Any]], protocol: str = "imap"
    ) -> Any:
        """``_tokenLogin``, or the back-off's answer while the provider throttles the account."""
        if self.throttles is None:
            return await self._tokenLogin(account, connect)
        await self.throttles.check(account.id, protocol)
        try:
            return await self._tokenLogin(account, connect)
        except ProviderThrottled as e:
            await self.throttles.record(account.id, protocol, e)
            raise

    async def _tokenLogin(self, account: Account, connect: Callable[[str], Awaitable[Any]]) -> Any:
        """
        ``connect`` with the account's access token; when the provider
        refuses a cached one, once more with a fresh one.

        :raises AuthenticationFailed: the provider refused a fresh token.
        """
        accountId = account.id
        token = await self._access.get(account)
        try:
            return stampToken(await connect(token.value), token.expires)
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
                return stampToken(await connect(token.value), token.expires)
            except UpstreamRejectedToken:
                log.warn("provider refused a fresh access token for {account}", account=accountId)
                raise AuthenticationFailed() from None


def upstreamConnector(reactor: Any, timeout: float) -> UpstreamConnector:
    """
    The realm's ``connect`` (and ``connect.smtp``), bound to a reactor, a
    time bound, one address cache and one TLS cache.
    """
    return UpstreamConnector(reactor, timeout)
