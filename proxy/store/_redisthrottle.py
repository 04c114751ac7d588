"""
Throttled accounts in the Redis store, shared by every instance: one string
key per account and protocol, ``PREFIXthrottle:<protocol>:<account>`` =
``"reason at until"``, with a TTL that ends it ``keep`` seconds after
``until``. A login on any instance then backs off as the one that met the
throttling does (see ``proxy.throttle``). A record is replaced only by one
whose back-off ends no sooner (one script, so two instances cannot race).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ._throttles import IThrottleStore, Key, Record

# KEYS[1] the record; ARGV: value, until, TTL in ms. Keeps a record whose
# back-off ends later than this one's (a concurrent login's shorter one).
_SET = """
local old = redis.call('GET', KEYS[1])
if old then
  local oldUntil = tonumber(string.match(old, ' (%S+)$'))
  if oldUntil and oldUntil > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""


@implementer(IThrottleStore)
class RedisThrottles:
    """``IThrottleStore`` for the Redis store (a mix-in: ``_call``, ``_key``)."""

    _call: Any
    _eval: Any
    _key: Any

    def setThrottle(
        self, accountId: str, protocol: str, reason: str, at: float, until: float, keep: float
    ) -> Deferred[None]:
        ms = max(1, math.ceil((until - at + keep) * 1000))
        value = f"{reason} {at!r} {until!r}"
        key = self._key("throttle", protocol, accountId)
        d = self._eval(_SET, [key], [value, repr(until), str(ms)])
        return d.addCallback(lambda _: None)  # type: ignore[no-any-return]

    def getThrottles(self, keys: Sequence[Key], now: float) -> Deferred[list[Record | None]]:
        names = [self._key("throttle", protocol, accountId) for accountId, protocol in keys]
        if not names:
            return succeed([])
        d = self._call("mget", names)
        return d.addCallback(lambda values: [_parse(v) for v in values])  # type: ignore[no-any-return]


def _parse(value: Any) -> Record | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    parts = value.split(" ")
    try:
        return (parts[0], float(parts[1]), float(parts[2]))
    except (IndexError, ValueError):
        return None
