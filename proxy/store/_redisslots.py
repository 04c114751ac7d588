"""
Connection slots shared by the instances of one Redis store
(``proxy.upstream.slots``): one sorted set per account and protocol
(``PREFIXslots:ACCOUNT/PROTOCOL``), a member per held slot
(``INSTANCE:N``) scored by the time it expires. The holding instance's
heartbeat pushes that time on; a member past it is swept by the next
acquire, so the slots of an instance killed without a word come back
within ``expiry`` seconds. Each acquire is one atomic script: instances
taking the last slot at once cannot both get it. A login waiting at the
cap sets ``PREFIXslots-want:ACCOUNT/PROTOCOL`` for its wait, so that the
instance holding a spare of that account gives it up.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from ._interfaces import ISlotCounter

# Seconds a slot lives without its instance's heartbeat; the heartbeat
# (HEARTBEAT) renews well within it, so a slow round or two lose nothing.
EXPIRY = 30.0
HEARTBEAT = 10.0

# Sweep the expired, then take a slot if fewer than the cap are held.
_ACQUIRE = """
local now, cap, ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], now + ms / 1000, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ms)
return 1
"""

# Renew the slots still held (XX: a slot swept meanwhile is not revived,
# which could go past the cap).
_REFRESH = """
local at, ms = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', at, ARGV[2 + i])
  redis.call('PEXPIRE', key, ms)
end
return 0
"""

_COUNT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]))
return redis.call('ZCARD', KEYS[1])
"""


@implementer(ISlotCounter)
class RedisSlots:
    """
    :param store: the ``RedisStore`` (its connection and key prefix).
    :param expiry: seconds a slot lives without a heartbeat.
    """

    shared = True
    # Seconds between the holding instance's renewals (``SlotKeeper.heartbeat``).
    heartbeat = HEARTBEAT

    def __init__(self, store: Any, expiry: float = EXPIRY):
        self._store = store
        self.expiry = expiry
        self._ms = str(max(1, int(expiry * 1000)))

    def _key(self, key: str) -> str:
        return str(self._store._key("slots", key))

    def tryAcquire(self, key: str, cap: int, holder: str, now: float) -> Deferred[bool]:
        d = self._store._eval(_ACQUIRE, [self._key(key)], [repr(now), str(cap), holder, self._ms])
        return d.addCallback(lambda n: int(n) == 1)

    def release(self, key: str, holder: str) -> Deferred[None]:
        d = self._store._call("zrem", self._key(key), holder)
        return d.addCallback(lambda _: None)

    def refresh(self, held: list[tuple[str, str]], now: float) -> Deferred[None]:
        keys = [self._key(k) for k, _ in held]
        args = [repr(now + self.expiry), self._ms, *(h for _, h in held)]
        return self._store._eval(_REFRESH, keys, args).addCallback(lambda _: None)

    def count(self, key: str, now: float) -> Deferred[int]:
        return self._store._eval(_COUNT, [self._key(key)], [repr(now)]).addCallback(int)

    def _wantKey(self, key: str) -> str:
        return str(self._store._key("slots-want", key))

    def want(self, key: str, seconds: float) -> Deferred[None]:
        ms = max(1, int(seconds * 1000))
        d = self._store._call("set", self._wantKey(key), "1", None, ms)
        return d.addCallback(lambda _: None)

    def wanted(self, keys: list[str]) -> Deferred[list[str]]:
        d = self._store._call("mget", [self._wantKey(k) for k in keys])
        return d.addCallback(lambda values: [k for k, v in zip(keys, values, strict=False) if v])
