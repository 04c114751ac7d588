"""
Where the login path is measured: thin wrappers, put together in
``proxy.tap``, around the pieces a login goes through (the portal, the token
checker, the access tokens, the upstream connector, the token endpoint
call). Each times its piece and passes its result or error on unchanged, so
the pieces themselves know nothing of metrics.

The protocol of a login (``imap``, ``smtp``) is known where the portal is
called; the access-token step, shared by both, learns it from a context
variable set around the realm's ``requestAvatar``: the realm's coroutine
runs in a copy of the context it was started in, every step of it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import AccessDenied, ProxyError
from .metrics import Metrics, providerOf
from .oauth import AccessTokens
from .realm import ISubmissionSession
from .store import StoreUnavailable

__all__ = [
    "MeteredAccessTokens",
    "MeteredChecker",
    "MeteredConnector",
    "MeteredPortal",
    "Metrics",
    "meterPortal",
    "meteredRefresh",
    "resultOf",
]

_protocol: contextvars.ContextVar[str] = contextvars.ContextVar(
    "imapproxy_login_protocol", default="imap"
)


def resultOf(error: BaseException | None) -> str:
    """A login's or refresh's result as a reason code: ``ok`` or the refusal's."""
    if error is None:
        return "ok"
    if isinstance(error, (AccessDenied, ProxyError)):
        return str(error.reason)
    if isinstance(error, StoreUnavailable):
        return "store-unavailable"
    if isinstance(error, UnauthorizedLogin):
        return "unknown-token"
    return "internal"


def _timed(
    clock: Any, work: Callable[[], Any], done: Callable[[BaseException | None, float], None]
) -> Deferred[Any]:
    """``work()`` as a Deferred; ``done(error or None, seconds)`` when it fires."""
    started = clock.seconds()

    def finished(result: Any) -> Any:
        error = result.value if isinstance(result, Failure) else None
        try:
            done(error, clock.seconds() - started)
        except Exception:
            pass  # a metric must never change a login's outcome
        return result

    d = maybeDeferred(work)
    d.addBoth(finished)
    return d


class MeteredPortal:
    """A ``Portal`` whose logins are counted by protocol and result, and timed."""

    def __init__(self, portal: Any, metrics: Metrics):
        self._portal = portal
        self._metrics = metrics

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        protocol = str(getattr(credentials, "protocol", "imap"))
        return _timed(
            self._metrics.clock,
            lambda: self._portal.login(credentials, mind, *interfaces),
            lambda e, s: self._loginDone(protocol, e, s),
        )

    def __getattr__(self, name: str) -> Any:
        # realm, checkers, listCredentialsInterfaces: the portal's own.
        return getattr(self._portal, name)

    def _loginDone(self, protocol: str, error: BaseException | None, seconds: float) -> None:
        if isinstance(error, StoreUnavailable):
            self._metrics.storeFailed("login")
        self._metrics.login(protocol, resultOf(error), seconds)


@implementer(IRealm)
class ProtocolRealm:
    """A realm whose avatars are made knowing their protocol (``_protocol``)."""

    def __init__(self, realm: Any):
        self._realm = realm

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        smtp = any(i is ISubmissionSession for i in interfaces)
        token = _protocol.set("smtp" if smtp else "imap")
        try:
            return self._realm.requestAvatar(avatarId, mind, *interfaces)
        finally:
            _protocol.reset(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._realm, name)


@implementer(ICredentialsChecker)
class MeteredChecker:
    """A credentials checker whose checks are timed, by protocol."""

    def __init__(self, checker: Any, metrics: Metrics):
        self._checker = checker
        self._metrics = metrics
        self.credentialInterfaces = checker.credentialInterfaces

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        protocol = str(getattr(credentials, "protocol", "imap"))
        histogram = self._metrics.child(self._metrics.tokenCheckSeconds, protocol)
        return _timed(
            self._metrics.clock,
            lambda: self._checker.requestAvatarId(credentials),
            lambda e, s: histogram.observe(s),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._checker, name)


class MeteredAccessTokens:
    """``AccessTokens`` whose ``get`` is timed, by the login's protocol."""

    def __init__(self, accessTokens: Any, metrics: Metrics):
        self._access = accessTokens
        self._metrics = metrics

    def get(self, account: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        histogram = self._metrics.child(self._metrics.accessTokenSeconds, _protocol.get())
        return _timed(
            self._metrics.clock,
            lambda: self._access.get(account, *args, **kwargs),
            lambda e, s: histogram.observe(s),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._access, name)


class MeteredConnector:
    """The realm's ``connect`` (IMAP) and ``connect.smtp``, timed by protocol."""

    def __init__(self, connect: Any, metrics: Metrics):
        self._connect = connect
        self._metrics = metrics

    def __call__(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self._time("imap", lambda: self._connect(*args, **kwargs))

    def smtp(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self._time("smtp", lambda: self._connect.smtp(*args, **kwargs))

    def _time(self, protocol: str, work: Callable[[], Any]) -> Deferred[Any]:
        histogram = self._metrics.child(self._metrics.upstreamSeconds, protocol)
        return _timed(self._metrics.clock, work, lambda e, s: histogram.observe(s))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connect, name)


def meteredRefresh(refresh: Callable[[Any], Deferred[Any]], metrics: Metrics) -> Any:
    """
    The token endpoint call (``ThreadedRefresher.refresh``), counted by
    provider (the account's preset, else ``generic``) and result, and timed.
    """

    def metered(account: Any) -> Deferred[Any]:
        provider = providerOf(getattr(account.oauth2, "tokenURL", None))
        return _timed(
            metrics.clock,
            lambda: refresh(account),
            lambda e, s: metrics.refreshed(provider, resultOf(e), s),
        )

    return metered


def meterPortal(portal: Any, metrics: Metrics) -> MeteredPortal:
    """``portal`` with its logins and its checkers' checks measured."""
    for iface, checker in list(portal.checkers.items()):
        portal.checkers[iface] = MeteredChecker(checker, metrics)
    portal.realm = ProtocolRealm(portal.realm)
    return MeteredPortal(portal, metrics)


def accessTokens(tokens: AccessTokens, metrics: Metrics) -> AccessTokens:
    """``tokens`` with ``get`` timed, typed as what the realm takes (it duck-types)."""
    return cast(AccessTokens, MeteredAccessTokens(tokens, metrics))


# Short names for where the service is put together (proxy.tap).
connector = MeteredConnector
refresh = meteredRefresh
portal = meterPortal
