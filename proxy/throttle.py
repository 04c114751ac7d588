"""
Backing off from a provider that throttles an account. When a provider's
login answers with throttling (``proxy.upstream.throttling`` recognises it,
as ``ProviderThrottled``), the proxy logs it with the account, counts it,
records it in the store (shared by every instance on Redis) and, until the
back-off ends, answers that account's logins of the same protocol at once
with the same fixed text, without reaching the provider: a client that
retries in a loop, or twenty clients of one account, cost the provider
nothing more and the lock-out is not prolonged.

The back-off is the provider's suggested time when it gives one
(Microsoft's ``Suggested Backoff Time``), else a fixed one per kind
(Gmail's connection limit) or the configured default, always within
``[minimum, maximum]``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import attrs
from twisted.logger import Logger

from . import auditlog
from .errors import ProviderThrottled

log = Logger(namespace="proxy.throttle")

PROTOCOLS = ("imap", "smtp")


@attrs.frozen
class ThrottlePolicy:
    """
    :ivar default: seconds to back off when the provider suggests none.
    :ivar maximum: the longest back-off, whatever the provider suggests.
    :ivar minimum: the shortest (a suggested 0 ms is no back-off at all).
    :ivar keep: seconds the last throttling stays visible after it ended.
    """

    default: float = 60.0
    maximum: float = 900.0
    minimum: float = 1.0
    keep: float = 3600.0

    def backoff(self, suggested: float | None) -> float:
        seconds = self.default if suggested is None else suggested
        return min(max(seconds, self.minimum), self.maximum)


def throttlePolicy(options: Any) -> ThrottlePolicy:
    """The policy the settings (``throttle-backoff``, ``throttle-backoff-max``) ask for."""
    maximum = options["throttle-backoff-max"]
    return ThrottlePolicy(default=min(options["throttle-backoff"], maximum), maximum=maximum)


class Throttles:
    """
    :param store: an ``IThrottleStore`` (every store is one).
    :param clock: ``IReactorTime``.
    :param metrics: ``proxy.metrics.Metrics`` or None.
    """

    def __init__(
        self, store: Any, clock: Any, policy: ThrottlePolicy | None = None, metrics: Any = None
    ):
        self._store = store
        self._clock = clock
        self.policy = policy if policy is not None else ThrottlePolicy()
        self._metrics = metrics
        if metrics is not None:
            metrics.throttleMetrics()

    async def check(self, accountId: str, protocol: str) -> None:
        """
        :raises ProviderThrottled: the account is in a back-off for
            ``protocol``; the client is told how long is left. A store that
            cannot answer does not stop the login.
        """
        now = self._clock.seconds()
        try:
            (record,) = await self._store.getThrottles([(accountId, protocol)], now)
        except Exception as e:
            log.warn(
                "reading the throttling of {account} failed: {why}",
                account=accountId,
                why=type(e).__name__,
            )
            return
        if record is None or record[2] <= now:
            return
        reason, _, until = record
        if self._metrics is not None:
            self._metrics.throttleRefused(protocol, reason)
        log.info(
            "{protocol} login of {account} refused without asking the provider: it throttles "
            "the account ({reason}) for {left:.0f}s more",
            protocol=protocol.upper(),
            account=accountId,
            reason=reason,
            left=until - now,
        )
        raise ProviderThrottled(reason, retryAfter=math.ceil(until - now))

    async def record(self, accountId: str, protocol: str, error: ProviderThrottled) -> None:
        """
        The provider throttled a login: back off, and set ``error``'s
        ``retryAfter`` to what the client is told.
        """
        now = self._clock.seconds()
        seconds = self.policy.backoff(error.suggested)
        until = now + seconds
        error.retryAfter = math.ceil(seconds)
        log.warn(
            "the provider throttles {account} ({protocol}, {reason}); its logins back off "
            "for {seconds:.0f}s",
            account=accountId,
            protocol=protocol.upper(),
            reason=error.reason,
            seconds=seconds,
            suggested=error.suggested,
        )
        auditlog.throttled(accountId, protocol, error.reason, now, until)
        if self._metrics is not None:
            self._metrics.throttled(protocol, error.reason)
        try:
            await self._store.setThrottle(
                accountId, protocol, error.reason, now, until, self.policy.keep
            )
        except Exception as e:
            log.warn(
                "recording the throttling of {account} failed: {why}",
                account=accountId,
                why=type(e).__name__,
            )


async def throttledViews(
    store: Any, views: list[dict[str, Any]], now: float | None = None
) -> list[dict[str, Any]]:
    """
    Add ``throttled`` to account views (``admin.accountView``): the latest
    throttling of either protocol still remembered, or None. A store that
    cannot answer leaves it None rather than failing the listing.
    """
    now = time.time() if now is None else now
    keys = [(v["account"], p) for v in views for p in PROTOCOLS]
    try:
        records = await store.getThrottles(keys, now) if keys else []
    except Exception as e:
        log.warn("reading throttled accounts failed: {why}", why=type(e).__name__)
        records = [None] * len(keys)
    for i, view in enumerate(views):
        found = [(r, p) for r, p in zip(records[2 * i : 2 * i + 2], PROTOCOLS, strict=True) if r]
        latest = max(found, key=lambda rp: rp[0][1], default=None)
        view["throttled"] = (
            None
            if latest is None
            else {
                "reason": latest[0][0],
                "protocol": latest[1],
                "at": latest[0][1],
                "until": latest[0][2],
            }
        )
    return views


async def accountViews(admin: Any, accounts: list[Any]) -> list[dict[str, Any]]:
    """
    ``admin.accountView`` of each account (an ``Account``, or an id to read
    through ``admin.getAccount``) with its ``throttled``, for the API.
    """
    from .admin import accountView

    records = [a if not isinstance(a, str) else await admin.getAccount(a) for a in accounts]
    return await throttledViews(admin.store, [accountView(a) for a in records])
