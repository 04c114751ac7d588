"""
Login penalties, in the manner of Dovecot's auth penalty: every refused
login from a source address makes the next attempts from it wait, 2 s after
the first failure, doubling with each further one up to 15 s; a success
clears it, and it is forgotten after a quiet period.

An attempt arriving while a penalty is in force is answered only when it has
run out (``LoginPenalties.status`` says how long that is), whatever its
outcome: a valid login from a penalised address is slowed, never refused,
and one from any other address is not touched. The API, where holding a
request open costs more than saying no, answers ``429`` with ``Retry-After``
instead once an address has failed ``refuseAfter`` times
(``PenaltyInForce``).

What is remembered per address (failures, time of the last) lives behind
``IPenaltyBackend``: in memory for one instance, in Redis
(``proxy.store.RedisPenalties``) for instances that share a store.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from zope.interface import Interface, implementer

from .tokens import clientAddress

# Dovecot's AUTH_PENALTY_INIT_SECS and AUTH_PENALTY_MAX_SECS.
INITIAL = 2.0
MAXIMUM = 15.0
FORGET = 600.0
REFUSE_AFTER = 5
# Addresses remembered at most by the in-memory backend.
MAX_ADDRESSES = 100_000


class PenaltyInForce(Exception):
    """
    A login refused unchecked because its address is penalised (the API's 429).

    :ivar retryAfter: whole seconds until the penalty runs out.
    """

    def __init__(self, retryAfter: int):
        super().__init__(f"too many failed logins, retry after {retryAfter} s")
        self.retryAfter = retryAfter


@attrs.frozen
class PenaltyPolicy:
    """
    :ivar initial: seconds of penalty after the first failure.
    :ivar maximum: the cap of the doubling; 0 turns penalties off.
    :ivar forget: seconds without a failure after which an address is clean.
    :ivar refuseAfter: failures from an address after which the API refuses
        (429) rather than waits while the penalty is in force.
    """

    initial: float = INITIAL
    maximum: float = MAXIMUM
    forget: float = FORGET
    refuseAfter: int = REFUSE_AFTER

    def penalty(self, failures: int) -> float:
        """Seconds an address that failed ``failures`` times waits after its last failure."""
        if failures <= 0 or self.maximum <= 0:
            return 0.0
        # Capped before doubling: 2 ** failures would overflow a float.
        doublings = min(failures - 1, 32)
        return float(min(self.initial * 2**doublings, self.maximum))


@attrs.frozen
class PenaltyStatus:
    """An address's standing: failures counted and seconds of penalty left."""

    failures: int = 0
    remaining: float = 0.0

    @property
    def retryAfter(self) -> int:
        return max(1, math.ceil(self.remaining))


class IPenaltyBackend(Interface):
    """Failures per address; every method returns a Deferred."""

    def get(key: str) -> Deferred[tuple[int, float] | None]:
        """:return: ``(failures, time of the last one)``, or None when clean."""

    def fail(key: str, now: float, forget: float) -> Deferred[int]:
        """
        Count one more failure at ``now``, remembered ``forget`` seconds.

        :return: the failures counted now.
        """

    def clear(key: str) -> Deferred[None]:
        """Forget the address (a login from it succeeded)."""

    def count(since: float) -> Deferred[int]:
        """Addresses remembered with a failure at ``since`` or later (for metrics)."""


@implementer(IPenaltyBackend)
class MemoryPenalties:
    """
    The backend of a single instance. Bounded: past ``maxAddresses`` the
    address that failed longest ago is dropped first.

    :param clock: ``IReactorTime``, to forget quiet addresses.
    """

    def __init__(self, clock: Any, maxAddresses: int = MAX_ADDRESSES):
        self._clock = clock
        self._max = maxAddresses
        # key -> (failures, last failure, forget at); oldest failure first.
        self._entries: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Deferred[tuple[int, float] | None]:
        entry = self._entries.get(key)
        if entry is None:
            return succeed(None)
        if entry[2] <= self._clock.seconds():
            del self._entries[key]
            return succeed(None)
        return succeed((entry[0], entry[1]))

    def fail(self, key: str, now: float, forget: float) -> Deferred[int]:
        old = self._entries.pop(key, None)
        failures = 1 if old is None or old[2] <= now else old[0] + 1
        self._entries[key] = (failures, now, now + forget)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return succeed(failures)

    def clear(self, key: str) -> Deferred[None]:
        self._entries.pop(key, None)
        return succeed(None)

    def count(self, since: float) -> Deferred[int]:
        return succeed(sum(1 for entry in self._entries.values() if entry[1] >= since))


def penaltyKey(address: str) -> str:
    """
    What penalties are counted by: the IP address (an IPv4-mapped IPv6
    address as the IPv4 address it carries), an IPv6 client by its /64,
    which one host usually holds whole; anything else as it is.
    """
    ip = clientAddress(address)
    if ip is None:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class LoginPenalties:
    """
    :param backend: an ``IPenaltyBackend``.
    :param clock: ``IReactorTime``: the time of failures and the waits.
    """

    def __init__(self, backend: IPenaltyBackend, clock: Any, policy: PenaltyPolicy | None = None):
        self.backend = backend
        self.policy = policy or PenaltyPolicy()
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self.policy.maximum > 0

    async def status(self, address: str) -> PenaltyStatus:
        if not self.enabled:
            return PenaltyStatus()
        found = await self.backend.get(penaltyKey(address))
        if found is None:
            return PenaltyStatus()
        failures, last = found
        penalty = self.policy.penalty(failures)
        # Never longer than the penalty: a failure time ahead of this clock
        # (another instance's, on a shared store) must not hold logins longer.
        remaining = min(max(0.0, last + penalty - self._clock.seconds()), penalty)
        return PenaltyStatus(failures, remaining)

    def wait(self, status: PenaltyStatus) -> Deferred[None]:
        """Fires when the penalty of ``status`` has run out."""
        if status.remaining <= 0:
            return succeed(None)
        return deferLater(self._clock, status.remaining, lambda: None)

    def refuses(self, status: PenaltyStatus) -> bool:
        """Whether the API refuses (429) rather than waits."""
        return status.remaining > 0 and status.failures >= self.policy.refuseAfter

    async def failed(self, address: str) -> int:
        """Count a refused login; :return: the address's failures now."""
        if not self.enabled:
            return 0
        return await self.backend.fail(
            penaltyKey(address), self._clock.seconds(), self.policy.forget
        )

    def remembered(self) -> Deferred[int]:
        """
        How many addresses have a failure not yet forgotten: this process's,
        or every instance's on a shared (Redis) store. For the metrics.
        """
        return self.backend.count(self._clock.seconds() - self.policy.forget)

    async def succeeded(self, address: str, status: PenaltyStatus) -> None:
        """A valid login clears its address's penalty (when it had one)."""
        if status.failures:
            await self.backend.clear(penaltyKey(address))
