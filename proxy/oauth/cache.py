"""
Provider access tokens: fetched with the account's refresh grant through
requests-oauthlib (in a bounded thread pool, never on the reactor thread),
cached until shortly before they expire, one refresh in flight per account.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..errors import AuthenticationFailed, GrantInvalid, ProxyError, Unavailable
from ..model import Account
from .leases import RefreshLeases

log = Logger()


@attrs.frozen
class Grant:
    """What a token endpoint answered. Secrets never reach a repr."""

    accessToken: str = attrs.field(repr=False)
    expiresIn: float | None
    refreshToken: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class AccessToken:
    """
    :ivar fresh: True when it was fetched for this request, so a refusal by
        the provider is final rather than a stale cache entry.
    """

    value: str = attrs.field(repr=False)
    expires: float | None
    fresh: bool


class _ServerError(Exception):
    """The token endpoint answered 5xx or 429."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def refreshBlocking(account: Account, timeout: float) -> Grant:
    """
    The ``refresh_token`` grant against the account's token URL. Blocking:
    call only from a worker thread.

    :raises ProxyError: ``GrantInvalid`` on ``invalid_grant``,
        ``AuthenticationFailed`` when the provider refuses the client,
        ``Unavailable`` for anything transient.
    """
    import requests
    from oauthlib.oauth2 import OAuth2Error
    from oauthlib.oauth2.rfc6749.errors import (
        InsecureTransportError,
        InvalidClientError,
        InvalidGrantError,
        UnauthorizedClientError,
    )
    from requests_oauthlib import OAuth2Session

    grant = account.oauth2
    session = OAuth2Session(client_id=grant.clientId)

    def checkStatus(response):
        if response.status_code >= 500 or response.status_code == 429:
            raise _ServerError(response.status_code)
        return response

    session.register_compliance_hook("refresh_token_response", checkStatus)
    try:
        token = session.refresh_token(
            grant.tokenURL,
            refresh_token=grant.refreshToken,
            client_id=grant.clientId,
            client_secret=grant.clientSecret,
            timeout=timeout,
            # In the body: requests-oauthlib passes its own scope argument,
            # and a session scope would make a changed scope an error.
            body=urlencode({"scope": " ".join(grant.scopes)}) if grant.scopes else "",
        )
    except InvalidGrantError as e:
        raise GrantInvalid(detail=_printable(e.description)) from None
    except (InvalidClientError, UnauthorizedClientError):
        raise AuthenticationFailed(
            "oauth2-client", "The provider refused the proxy's OAuth2 client"
        ) from None
    except InsecureTransportError:
        raise Unavailable("oauth2-insecure-url") from None
    except _ServerError:
        raise Unavailable("oauth2-server-error") from None
    except OAuth2Error:
        raise Unavailable("oauth2-bad-response") from None
    except requests.RequestException:
        raise Unavailable("oauth2-unreachable") from None
    except ValueError:
        raise Unavailable("oauth2-bad-response") from None
    finally:
        session.close()
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise Unavailable("oauth2-bad-response")
    expiresIn = token.get("expires_in")
    try:
        expires = float(expiresIn) if expiresIn is not None else None
    except (TypeError, ValueError):
        expires = None
    rotated = token.get("refresh_token")
    if not isinstance(rotated, str) or rotated == grant.refreshToken:
        rotated = None
    return Grant(accessToken=access, expiresIn=expires, refreshToken=rotated)


def _printable(text: Any, limit: int = 200) -> str:
    """A provider's error text, safe for a log line and an API answer."""
    if not isinstance(text, str):
        return ""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


class ThreadedRefresher:
    """
    Runs ``refreshBlocking`` in its own bounded thread pool.

    :param timeout: seconds for each HTTP request to the token endpoint.
    """

    def __init__(self, reactor: Any, threads: int = 4, timeout: float = 10.0):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="imapproxy-oauth2")
        self._timeout = timeout
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._pool.stop()
            self._started = False

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Any other blocking OAuth2 call (code exchange), in the same bounded pool."""
        self.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def refresh(self, account: Account) -> Deferred[Grant]:
        self.start()
        return deferToThreadPool(self._reactor, self._pool, refreshBlocking, account, self._timeout)


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


class AccessTokens:
    """
    The cache of provider access tokens.

    :param refresh: ``Account -> Deferred[Grant]``.
    :param saveRefreshToken: ``(accountId, refreshToken) -> Deferred``; called
        when the provider rotates the refresh token, before the new access
        token is used.
    :param clock: an ``IReactorTime`` (``seconds()``, ``callLater``).
    :param margin: refresh this many seconds before expiry.
    :param markReauth: ``(accountId, reason) -> Deferred``; called once when
        the provider answers ``invalid_grant``, to set the account's state.
    :param deadline: seconds a refresh may take in all, retries included;
        past it the login gets ``NO [UNAVAILABLE]``.
    :param backoff: delays between attempts after transient failures.
    :param loadSaved: ``accountId -> Deferred[(token, expires, lifetime) | None]``:
        an access token saved by this or another instance (encrypted at rest).
    :param persist: ``(accountId, token, expires, lifetime) -> Deferred``.
    :param leases: ``RefreshLeases`` when instances share the store: a
        refresh then first takes the account's lease, and a login that waits
        for another instance's refresh uses the token it saves.
    :param reload: ``accountId -> Deferred[Account | None]``: the account as
        stored, read once the lease is held (another instance may have
        rotated the refresh token).
    """

    UNKNOWN_LIFETIME = 3600.0
    MIN_LIFETIME = 60.0
    MAX_LIFETIME = 86400.0

    def __init__(
        self,
        refresh: Callable[[Account], Deferred[Grant]],
        saveRefreshToken: Callable[[str, str], Deferred[Any]],
        clock: Any,
        margin: float = 300.0,
        markReauth: Callable[[str, str], Deferred[Any]] | None = None,
        deadline: float = 15.0,
        backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
        loadSaved: Callable[[str], Deferred[Any]] | None = None,
        persist: Callable[[str, str, float, float], Deferred[Any]] | None = None,
        leases: RefreshLeases | None = None,
        reload: Callable[[str], Deferred[Any]] | None = None,
    ):
        self._refresh = refresh
        self._save = saveRefreshToken
        self._clock = clock
        self._margin = margin
        self._markReauth = markReauth
        self._deadline = deadline
        self._backoff = backoff
        self._loadSaved = loadSaved
        self._persist = persist
        self._leases = leases
        self._reload = reload
        # account id -> (access token, expiry time, lifetime)
        self._cache: dict[str, tuple[str, float, float]] = {}
        # Rotated refresh tokens whose save failed: used instead of the
        # stored one until a save succeeds, so a store hiccup loses nothing.
        self._unsaved: dict[str, tuple[str, str, tuple]] = {}
        # Fetches under way, by (account id, fingerprint): an account that now
        # points elsewhere never joins a fetch made for its old settings.
        self._inflight: dict[tuple[str, tuple], list[Deferred[AccessToken]]] = {}
        # Refresh requests still out (possibly past their deadline), by account.
        self._running: dict[str, Deferred[Grant]] = {}
        self._fingerprints: dict[str, tuple] = {}

    def forget(self, accountId: str) -> None:
        self._cache.pop(accountId, None)

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
        if self._fingerprints.get(account.id) != fingerprint(account):
            # The account now points elsewhere (mailbox, server, client): its
            # old token must not be sent there.
            self._cache.pop(account.id, None)
            self._fingerprints[account.id] = fingerprint(account)
        cached = self._usable(self._cache.get(account.id))
        if stale is not None and (cached is None or cached.value == stale):
            force = True
        if cached is not None and not force:
            return succeed(cached)
        waiter: Deferred[AccessToken] = Deferred()
        key = (account.id, fingerprint(account))
        if key in self._inflight:
            self._inflight[key].append(waiter)
            if stale is not None:
                # The fetch under way may only be re-reading the saved token
                # that was just refused: then refresh after it.
                return ensureDeferred(self._afterInflight(waiter, account, stale))
            return waiter
        self._inflight[key] = [waiter]
        ensureDeferred(self._fetch(account, force, stale)).addBoth(self._done, key)
        return waiter

    def _withUnsaved(self, account: Account) -> Account:
        """
        The account with a rotated refresh token that could not be saved yet,
        if it still applies: the stored grant is the one it was rotated from
        and the account still points where it did.
        """
        entry = self._unsaved.get(account.id)
        if entry is None:
            return account
        base, rotated, fp = entry
        if base != account.oauth2.refreshToken or fp != fingerprint(account):
            # Re-authorized or moved since: the rotated token is stale.
            del self._unsaved[account.id]
            return account
        return attrs.evolve(account, oauth2=attrs.evolve(account.oauth2, refreshToken=rotated))

    async def _afterInflight(
        self, waiter: Deferred[AccessToken], account: Account, stale: str
    ) -> AccessToken:
        token = await waiter
        if token.value == stale:
            return await self.get(account, stale=stale)
        return token

    def _usable(self, entry: tuple[str, float, float] | None) -> AccessToken | None:
        """A cached ``(token, expires, lifetime)`` still good for a login, or None."""
        if entry is None:
            return None
        value, expires, lifetime = entry
        margin = min(self._margin, lifetime / 2)
        if needsRefresh(expires, self._clock.seconds(), margin):
            return None
        return AccessToken(value, expires, fresh=False)

    async def _fetch(
        self, account: Account, force: bool = False, stale: str | None = None
    ) -> AccessToken:
        if not force and self._loadSaved is not None:
            try:
                saved = await self._loadSaved(account.id)
            except Exception:
                log.failure(
                    "reading the saved access token of {account} failed", account=account.id
                )
                saved = None
            usable = self._usable(saved)
            if usable is not None:
                self._cache[account.id] = saved
                return usable
        started = self._clock.seconds()
        deadline = started + self._deadline
        leased = False
        if self._leases is not None:
            if not self._leases.join(account.id):
                found, account = await self._lease(account, deadline, stale)
                if found is not None:
                    return found
            leased = True
        try:
            return await self._refreshHeld(account, started, deadline)
        finally:
            if leased:
                assert self._leases is not None
                self._leases.leave(account.id)

    async def _lease(
        self, account: Account, deadline: float, stale: str | None
    ) -> tuple[AccessToken | None, Account]:
        """
        Take the account's refresh lease, or the token the instance holding
        it saves meanwhile.

        :return: (that token, account) or (None, the account as now stored)
            with the lease held.
        """
        assert self._leases is not None

        async def savedElsewhere() -> AccessToken | None:
            return await self._savedUnless(account.id, stale)

        found = await self._leases.take(account.id, deadline, savedElsewhere)
        if found is not None:
            return found, account
        try:
            found = await self._savedUnless(account.id, stale)
            fresh = await self._reload(account.id) if self._reload is not None else None
        except BaseException:
            self._leases.leave(account.id)
            raise
        if found is not None:
            self._leases.leave(account.id)
            return found, account
        if fresh is not None and fingerprint(fresh) == fingerprint(account):
            account = fresh
        return None, account

    async def _savedUnless(self, accountId: str, stale: str | None) -> AccessToken | None:
        """A usable saved token other than ``stale``, cached; or None."""
        if self._loadSaved is None:
            return None
        try:
            saved = await self._loadSaved(accountId)
        except Exception:
            log.warn("reading the saved access token of {account} failed", account=accountId)
            return None
        usable = self._usable(saved)
        if usable is None or usable.value == stale:
            return None
        self._cache[accountId] = saved
        return usable

    async def _refreshHeld(self, account: Account, started: float, deadline: float) -> AccessToken:
        stored = account
        attempt = 0
        while True:
            account = self._withUnsaved(stored)
            running = self._running.get(account.id)
            if running is not None:
                # A refresh that outlived an earlier deadline is still out
                # with this refresh token: never send the same one twice (a
                # provider that rotates may take reuse for theft).
                await self._within(running, deadline - self._clock.seconds())
                usable = self._usable(self._cache.get(account.id))
                if usable is not None:
                    return AccessToken(usable.value, usable.expires, fresh=True)
                if account.id in self._running:
                    raise Unavailable("oauth2-timeout")
                continue
            try:
                grant = await self._bounded(
                    account, deadline - self._clock.seconds(), stored.oauth2.refreshToken
                )
                break
            except GrantInvalid as e:
                self._cache.pop(account.id, None)
                self._unsaved.pop(account.id, None)
                await self._reauthRequired(account.id, e)
                raise
            except Unavailable as e:
                self._cache.pop(account.id, None)
                delay = self._backoff[min(attempt, len(self._backoff) - 1)]
                if self._clock.seconds() + delay >= deadline:
                    log.warn(
                        "OAuth2 refresh for {account} failed after {n} attempt(s): {reason}",
                        account=account.id,
                        n=attempt + 1,
                        reason=e.reason,
                    )
                    raise
                log.info(
                    "OAuth2 refresh for {account} failed ({reason}); retrying in {delay}s",
                    account=account.id,
                    reason=e.reason,
                    delay=delay,
                )
                attempt += 1
                await deferLater(self._clock, delay)
            except ProxyError as e:
                log.warn(
                    "OAuth2 refresh for account {account} refused: {reason}",
                    account=account.id,
                    reason=e.reason,
                )
                self._cache.pop(account.id, None)
                raise
            except Exception:
                log.failure("OAuth2 refresh for account {account} failed", account=account.id)
                raise Unavailable("oauth2-internal") from None
        return await self._accept(account, grant, started, stored.oauth2.refreshToken)

    def _bounded(
        self, account: Account, seconds: float, stored: str | None = None
    ) -> Deferred[Grant]:
        """
        One refresh, waited for at most ``seconds``. A request that answers
        after that is not thrown away: what it brings (a rotated refresh token
        above all) is kept, because the provider has already acted on it.
        """
        out: Deferred[Grant] = Deferred()
        started = self._clock.seconds()

        def expired() -> None:
            if not out.called:
                out.errback(Unavailable("oauth2-timeout"))

        timer = self._clock.callLater(max(seconds, 0.0), expired)
        request = self._refresh(account)
        self._running[account.id] = request
        # The lease outlives the wait: it is kept while the request is out and
        # while a late answer is saved.
        leased = self._leases is not None and self._leases.join(account.id)

        def leave(result: Any = None) -> Any:
            if leased:
                assert self._leases is not None
                self._leases.leave(account.id)
            return result

        def answered(result: Any) -> None:
            if self._running.get(account.id) is request:
                del self._running[account.id]
            if timer.active():
                timer.cancel()
            if not out.called:
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(result)
            elif not isinstance(result, Failure):
                late = ensureDeferred(self._accept(account, result, started, stored))
                late.addErrback(lambda f: log.failure("keeping a late OAuth2 answer failed", f))
                late.addBoth(leave)
                return
            elif isinstance(result.value, GrantInvalid):
                ensureDeferred(self._reauthRequired(account.id, result.value))
            else:
                log.info(
                    "a late OAuth2 refresh for {account} failed too: {error}",
                    account=account.id,
                    error=getattr(result.value, "reason", "error"),
                )
            leave()

        request.addBoth(answered)
        return out

    def _within(self, d: Deferred[Any], seconds: float) -> Deferred[None]:
        """Wait for ``d`` (without taking its result) at most ``seconds``."""
        out: Deferred[None] = Deferred()

        def expired() -> None:
            if not out.called:
                out.callback(None)

        timer = self._clock.callLater(max(seconds, 0.0), expired)

        def fired(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)
            return result

        d.addBoth(fired)
        return out

    async def _reauthRequired(self, accountId: str, error: GrantInvalid) -> None:
        reason = "invalid_grant" + (f": {error.detail}" if error.detail else "")
        log.warn(
            "account {account} needs re-authorization: the provider answered {reason}",
            account=accountId,
            reason=reason,
        )
        if self._markReauth is not None:
            try:
                await self._markReauth(accountId, reason)
            except Exception:
                log.failure("recording the state of {account} failed", account=accountId)

    async def _accept(
        self, account: Account, grant: Grant, started: float, stored: str | None = None
    ) -> AccessToken:
        """
        Keep a new access token (and a rotated refresh token).

        :param stored: the refresh token in the store when this refresh was
            asked for (``account`` may carry an unsaved rotated one instead).
        """
        lifetime = grant.expiresIn if grant.expiresIn is not None else self.UNKNOWN_LIFETIME
        # A provider's silly lifetime (0, negative, years) is not believed.
        lifetime = min(max(lifetime, self.MIN_LIFETIME), self.MAX_LIFETIME)
        expires = started + lifetime
        current = self._fingerprints.get(account.id) in (None, fingerprint(account))
        if current:
            # Cached before anything is awaited: a login waiting for this
            # refresh must find it, not start another with the same grant.
            self._cache[account.id] = (grant.accessToken, expires, lifetime)
        base = stored if stored is not None else account.oauth2.refreshToken
        if grant.refreshToken is not None and current:
            self._unsaved[account.id] = (base, grant.refreshToken, fingerprint(account))
            log.info("provider rotated the refresh token of {account}", account=account.id)
        entry = self._unsaved.get(account.id)
        if entry is not None:
            try:
                await self._save(account.id, entry[1])
            except Exception:
                log.failure(
                    "saving the rotated refresh token of {account} failed; "
                    "keeping it in memory and retrying on the next refresh",
                    account=account.id,
                )
            else:
                if self._unsaved.get(account.id) is entry:
                    del self._unsaved[account.id]
        if current and self._persist is not None:
            try:
                await self._persist(account.id, grant.accessToken, expires, lifetime)
            except Exception:
                log.failure("saving the access token of {account} failed", account=account.id)
        log.info(
            "new provider access token for {account}, valid {lifetime:.0f}s",
            account=account.id,
            lifetime=lifetime,
        )
        return AccessToken(grant.accessToken, expires, fresh=True)

    def _done(self, result: Any, key: tuple[str, tuple]) -> None:
        for waiter in self._inflight.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
