"""
Refreshes retried with backoff within a deadline. Each request to the token
endpoint is waited for until the deadline; one that answers later is not
thrown away, because the provider has already acted on it (a rotated refresh
token above all): its answer is kept, and no second request is sent with the
same refresh token while it is out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from automat import MethodicalMachine
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import CertificateRejected, GrantInvalid, ProxyError, Unavailable
from ..model import Account
from .cache import AccessToken
from .refresher import Grant

# One namespace for the layer: the log lines operators watch say [proxy.oauth#…].
log = Logger(namespace="proxy.oauth")


@attrs.frozen
class RetryPolicy:
    """
    :ivar deadline: seconds a refresh may take in all, retries included; past
        it the login gets ``NO [UNAVAILABLE]``.
    :ivar backoff: delays between attempts after transient failures (the
        last one repeats). A login that joins a refresh waiting out a delay
        cuts it short once the first delay has passed: the endpoint may be
        back, and a recovered endpoint must not keep logins waiting.
    :ivar earlyWait: seconds a login waits for the early refresh of an
        access token that is still valid, before it logs in with that one.
    :ivar resendAfter: seconds after which a request still out (a hung
        token endpoint) no longer stops a new one with the same refresh
        token, for a grant whose last answer kept its refresh token.
    """

    deadline: float = 15.0
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    earlyWait: float = 1.0
    resendAfter: float = 2.0


class Outcomes(Protocol):
    """What becomes of a refresh's answer (``AccessTokens`` implements it)."""

    def prepare(self, account: Account) -> Account:
        """The account to refresh with (a rotated refresh token not yet saved)."""

    def cached(self, accountId: str) -> AccessToken | None:
        """The usable cached token (after waiting for a request still out)."""

    async def accept(
        self, account: Account, grant: Grant, started: float, stored: str | None
    ) -> AccessToken:
        """Keep a new grant, also one that came after its deadline."""

    async def refused(self, account: Account, error: ProxyError) -> None:
        """A refresh failed with ``error``."""


class _Request:
    """
    One request to the token endpoint and the login waiting for it: the
    login gets the answer, or ``oauth2-timeout`` at its deadline; an answer
    after that goes to ``late``.
    """

    _machine = MethodicalMachine()

    #: the ``IDelayedCall`` that fires ``expire`` at the deadline.
    timer: Any = None

    def __init__(
        self, waiter: Deferred[Grant], late: Callable[[Any], Any], release: Callable[[], None]
    ):
        self._waiter = waiter
        self._late = late
        self._release = release

    @_machine.state(initial=True)
    def waiting(self) -> None:
        "The login waits for the answer."

    @_machine.state()
    def abandoned(self) -> None:
        "The login gave up at its deadline; the request is still out."

    @_machine.state()
    def answered(self) -> None:
        "The token endpoint answered."

    @_machine.input()
    def answer(self, result: Any) -> None:
        "The token endpoint answered (a Grant or a Failure)."

    @_machine.input()
    def expire(self) -> None:
        "The deadline passed."

    @_machine.output()
    def _deliver(self, result: Any) -> None:
        if self.timer.active():
            self.timer.cancel()
        if isinstance(result, Failure):
            self._waiter.errback(result)
        else:
            self._waiter.callback(result)
        self._release()

    @_machine.output()
    def _giveUp(self) -> None:
        self._waiter.errback(Unavailable("oauth2-timeout"))

    @_machine.output()
    def _keepLate(self, result: Any) -> None:
        kept = self._late(result)
        if kept is None:
            self._release()
            return
        d = ensureDeferred(kept)
        d.addErrback(lambda f: log.failure("keeping a late OAuth2 answer failed", f))
        d.addBoth(lambda _: self._release())

    waiting.upon(answer, enter=answered, outputs=[_deliver])
    waiting.upon(expire, enter=abandoned, outputs=[_giveUp])
    abandoned.upon(answer, enter=answered, outputs=[_keepLate])


class RetryingRefresh:
    """
    :param refresh: ``Account -> Deferred[Grant]``, one request.
    :param clock: an ``IReactorTime``.
    :param outcomes: where answers go.
    :param keep: ``accountId -> release``: hold what guards the account's
        refresh (the lease) while a request is out.
    """

    def __init__(
        self,
        refresh: Callable[[Account], Deferred[Grant]],
        clock: Any,
        outcomes: Outcomes,
        keep: Callable[[str], Callable[[], None]],
        policy: RetryPolicy,
    ):
        self._refresh = refresh
        self._clock = clock
        self._outcomes = outcomes
        self._keep = keep
        self.policy = policy
        # Refresh requests still out (possibly past their deadline), by
        # account, with when they were sent.
        self._running: dict[str, Deferred[Grant]] = {}
        self._sent: dict[str, float] = {}
        # Accounts whose token endpoint last answered without rotating the
        # refresh token (seen here): only theirs may be sent twice.
        self._steady: set[str] = set()
        # Delays between attempts under way, by account: (wake, when it began).
        self._sleeping: dict[str, tuple[Deferred[None], float]] = {}

    async def run(self, stored: Account, started: float, deadline: float) -> AccessToken:
        """
        A new access token for ``stored`` (the account as stored), asked for
        at ``started``, by ``deadline`` (``clock.seconds()`` times).
        """
        attempt = 0
        while True:
            account = self._outcomes.prepare(stored)
            running = self._running.get(account.id)
            if running is not None and not self._mayResend(account.id):
                # A refresh that outlived an earlier deadline is still out
                # with this refresh token: never send the same one twice (a
                # provider that rotates may take reuse for theft).
                await self._within(running, deadline - self._clock.seconds())
                usable = self._outcomes.cached(account.id)
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
            except (GrantInvalid, CertificateRejected) as e:
                # Final: asking again would get the same answer.
                await self._outcomes.refused(account, e)
                raise
            except Unavailable as e:
                await self._outcomes.refused(account, e)
                delay = self.policy.backoff[min(attempt, len(self.policy.backoff) - 1)]
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
                await self._sleep(account.id, delay)
            except ProxyError as e:
                log.warn(
                    "OAuth2 refresh for account {account} refused: {reason}",
                    account=account.id,
                    reason=e.reason,
                )
                await self._outcomes.refused(account, e)
                raise
            except Exception:
                log.failure("OAuth2 refresh for account {account} failed", account=account.id)
                raise Unavailable("oauth2-internal") from None
        return await self._outcomes.accept(account, grant, started, stored.oauth2.refreshToken)

    def _bounded(self, account: Account, seconds: float, stored: str | None) -> Deferred[Grant]:
        """One request, waited for at most ``seconds``; a later answer is kept."""
        out: Deferred[Grant] = Deferred()
        started = self._clock.seconds()

        def late(result: Any) -> Any:
            if not isinstance(result, Failure):
                return self._outcomes.accept(account, result, started, stored)
            if isinstance(result.value, GrantInvalid):
                ensureDeferred(self._outcomes.refused(account, result.value))
            else:
                log.info(
                    "a late OAuth2 refresh for {account} failed too: {error}",
                    account=account.id,
                    error=getattr(result.value, "reason", "error"),
                )
            return None

        # The lease outlives the wait: it is kept while the request is out
        # and while a late answer is saved.
        release = self._keep(account.id)
        request = _Request(out, late, release)
        request.timer = self._clock.callLater(max(seconds, 0.0), request.expire)
        d = self._refresh(account)
        self._running[account.id] = d
        self._sent[account.id] = started

        def answered(result: Any) -> None:
            if self._running.get(account.id) is d:
                del self._running[account.id]
                del self._sent[account.id]
            if not isinstance(result, Failure):
                if result.refreshToken is None:
                    self._steady.add(account.id)
                else:
                    self._steady.discard(account.id)
            request.answer(result)

        d.addBoth(answered)
        return out

    def _mayResend(self, accountId: str) -> bool:
        """
        Whether a new request may go out while one is still out: the grant's
        last answer here kept its refresh token (so sending it again is what
        every refresh does), and the request out is hung (``resendAfter``).
        A grant that rotates, or one not seen yet, waits for the answer.
        """
        sent = self._sent.get(accountId)
        return (
            accountId in self._steady
            and sent is not None
            and self._clock.seconds() - sent >= self.policy.resendAfter
        )

    def _sleep(self, accountId: str, seconds: float) -> Deferred[None]:
        """The delay between two attempts, which ``nudge`` may cut short."""
        wake: Deferred[None] = Deferred()
        timer = self._clock.callLater(seconds, wake.callback, None)
        self._sleeping[accountId] = (wake, self._clock.seconds())

        def woken(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if self._sleeping.get(accountId, (None,))[0] is wake:
                del self._sleeping[accountId]
            return result

        return wake.addBoth(woken)

    def nudge(self, accountId: str) -> None:
        """
        A login now waits for the account's refresh: if it is waiting out a
        delay that has run at least the first one, try again now.
        """
        sleeping = self._sleeping.get(accountId)
        if sleeping is None:
            return
        wake, began = sleeping
        if self._clock.seconds() - began >= self.policy.backoff[0] and not wake.called:
            wake.callback(None)

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
