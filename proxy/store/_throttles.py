"""
Where an account's provider throttling is remembered (``proxy.throttle``
decides what it means): per account and protocol, the reason code, when it
was seen and until when the proxy backs off, kept a while after that so the
API can show the last one. Kept apart from the account record: it changes
with logins, not with the operator, and is not worth a write to SQLite.

``LocalThrottles`` keeps it in this process (the memory and SQLite stores:
one instance, or instances that each see their own provider connections);
the Redis store's ``RedisThrottles`` shares it between instances, each
record a key with a TTL.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

#: (reason, at, until): what ``getThrottles`` answers for one key.
Record = tuple[str, float, float]
#: (account id, protocol).
Key = tuple[str, str]

# Records kept at most in one process; past it, those forgotten soonest go.
MAX_LOCAL = 10000


class IThrottleStore(Interface):
    """What a store keeps of throttled accounts."""

    def setThrottle(
        accountId: str, protocol: str, reason: str, at: float, until: float, keep: float
    ) -> Deferred[None]:
        """
        Remember a throttling until ``until + keep`` (``clock.seconds()``
        times), unless the record kept ends its back-off later.
        """

    def getThrottles(keys: Sequence[Key], now: float) -> Deferred[list[Record | None]]:
        """The record of each key still remembered at ``now``, in order."""


@implementer(IThrottleStore)
class LocalThrottles:
    """``IThrottleStore`` in this process's memory, bounded (a mix-in for stores)."""

    def _throttleRecords(self) -> dict[Key, tuple[str, float, float, float]]:
        records: dict[Key, tuple[str, float, float, float]] | None
        records = self.__dict__.get("_throttles")
        if records is None:
            records = self.__dict__["_throttles"] = {}
        return records

    def setThrottle(
        self, accountId: str, protocol: str, reason: str, at: float, until: float, keep: float
    ) -> Deferred[None]:
        records = self._throttleRecords()
        old = records.get((accountId, protocol))
        if old is not None and old[2] > until:
            # A concurrent login's shorter back-off: the provider's longer one still runs.
            return succeed(None)
        records[(accountId, protocol)] = (reason, at, until, until + keep)
        if len(records) > MAX_LOCAL:
            forgotten = sorted(records, key=lambda k: records[k][3])
            for key in forgotten[: len(records) - MAX_LOCAL]:
                del records[key]
        return succeed(None)

    def getThrottles(self, keys: Sequence[Key], now: float) -> Deferred[list[Record | None]]:
        records = self._throttleRecords()
        found: list[Record | None] = []
        for key in keys:
            record = records.get(key)
            if record is not None and record[3] <= now:
                del records[key]
                record = None
            found.append(None if record is None else record[:3])
        return succeed(found)
