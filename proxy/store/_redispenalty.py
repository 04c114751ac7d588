"""
Login penalties shared by the instances of one Redis store, bounded like the
in-memory backend: one hash (``PREFIXpenalties``, address -> ``failures
time``) and one sorted set (``PREFIXpenalties-seen``, address by the time of
its last failure). Each failure first forgets the addresses quiet for
``forget`` seconds, then, past ``maxAddresses``, the ones that failed longest
ago: a client spread over many IPv6 networks cannot grow the shared store
without bound (a key per address, kept ``forget`` seconds, could), nor push
accounts and tokens out of a Redis that evicts.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..penalties import MAX_ADDRESSES, IPenaltyBackend

# One round trip, atomic: instances failing the same address at once both
# count. Bounded work per call: at most _SWEEP entries dropped at a time.
_FAIL = """
local now, forget, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local quiet = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - forget, 'LIMIT', 0, 1000)
if #quiet > 0 then
  redis.call('HDEL', KEYS[1], unpack(quiet))
  redis.call('ZREM', KEYS[2], unpack(quiet))
end
local n = 1
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  n = (tonumber(string.match(old, '^(%d+) ')) or 0) + 1
end
redis.call('HSET', KEYS[1], ARGV[1], n .. ' ' .. ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local over = math.min(redis.call('ZCARD', KEYS[2]) - cap, 1000)
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  redis.call('HDEL', KEYS[1], unpack(oldest))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
local ms = math.max(1, math.floor(forget * 1000))
redis.call('PEXPIRE', KEYS[1], ms)
redis.call('PEXPIRE', KEYS[2], ms)
return n
"""

_CLEAR = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""


@implementer(IPenaltyBackend)
class RedisPenalties:
    """
    :param store: the ``RedisStore`` (its connection and key prefix).
    :param maxAddresses: addresses remembered at most, across instances.
    """

    def __init__(self, store: Any, maxAddresses: int = MAX_ADDRESSES):
        self._store = store
        self._max = maxAddresses
        self._keys = [str(store._key("penalties")), str(store._key("penalties-seen"))]

    def get(self, key: str) -> Deferred[tuple[int, float] | None]:
        # An entry quiet for longer than ``forget`` may still be read here
        # until the next failure sweeps it: its penalty has long run out.
        d = self._store._call("hget", self._keys[0], key)
        return d.addCallback(_parse)

    def fail(self, key: str, now: float, forget: float) -> Deferred[int]:
        d = self._store._eval(_FAIL, self._keys, [key, repr(now), repr(forget), str(self._max)])
        return d.addCallback(int)

    def clear(self, key: str) -> Deferred[None]:
        d = self._store._eval(_CLEAR, self._keys, [key])
        return d.addCallback(lambda _: None)

    def count(self, since: float) -> Deferred[int]:
        # The sorted set holds each address by the time of its last failure;
        # the quiet ones the next failure would sweep are not counted.
        d = self._store._call("zcount", self._keys[1], repr(since), "+inf")
        return d.addCallback(int)


def _parse(reply: Any) -> tuple[int, float] | None:
    if isinstance(reply, bytes):
        reply = reply.decode("ascii", "replace")
    if not isinstance(reply, str):
        return None
    try:
        failures, last = reply.split(" ", 1)
        return int(failures), float(last)
    except ValueError:
        return None
