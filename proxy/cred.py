"""
``twisted.cred`` for the proxy: the checker decides whether a client's token
lets it in; the realm (``proxy.realm``, re-exported here) turns the account
id it yields into a logged-in upstream connection, IMAP or SMTP (the avatar).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import Attribute, implementer

from . import auditlog
from .errors import AccessDenied
from .model import Restrictions, Token, validAccountId
from .penalties import LoginPenalties, PenaltyInForce, PenaltyStatus
from .realm import (
    ISubmissionSession,
    IUpstreamSession,
    SubmissionSession,
    UpstreamRealm,
    UpstreamSession,
    isCertificateReason,
    upstreamConnector,
)
from .store import ITokenStore
from .tokens import checkToken, looksLikeToken, tokenId

log = Logger()

IMAP_SCOPE = "imap-proxy"
SMTP_SCOPE = "smtp"
API_SCOPE = "api"

__all__ = [
    "API_SCOPE",
    "IMAP_SCOPE",
    "SMTP_SCOPE",
    "ISubmissionSession",
    "ITokenCredentials",
    "IUpstreamSession",
    "SubmissionSession",
    "TokenChecker",
    "TokenCredentials",
    "UpstreamRealm",
    "UpstreamSession",
    "isCertificateReason",
    "loggableAccount",
    "upstreamConnector",
]


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
    The one place a presented token is checked, for every front door (IMAP,
    SMTP with ``SMTP_SCOPE``, and the API through ``check``): scope, account, address and
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

    async def _avatarId(self, c: TokenCredentials) -> tuple[str, str, Restrictions | None]:
        record = await self.check(c)
        # The avatar id carries the token's id too, so a session can be found
        # (and closed) by the token it was opened with, and its restrictions,
        # which decide the relay (``proxy.policy`` when there are any).
        return (c.account if c.account is not None else "", record.id, record.restrictions)

    async def check(self, c: TokenCredentials) -> Token:
        """
        :return: the token's record when it may be used here.
        :raises AccessDenied: naming the first check that failed.
        :raises PenaltyInForce: with ``refuse``, past the failures allowed.
        """
        status = await self._penaltyStatus(c.address)
        if self._refuse and self._penalties is not None and self._penalties.refuses(status):
            auditlog.apiLogin("refused", "penalty", c.address, self._scope)
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
            if c.protocol == "api":
                # The API's (and /metrics') refusals; IMAP and SMTP have ``login``.
                auditlog.apiLogin("refused", e.reason, c.address, self._scope)
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
