"""
Login penalties shared by the instances of one Redis store: a hash per
source address (failures ``n``, time of the last ``t``) whose expiry is reset
at each failure, so an address that stays quiet is forgotten by Redis itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..penalties import IPenaltyBackend

# One round trip, atomic: instances failing the same address at once both count.
_FAIL = """
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 't', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n
"""


@implementer(IPenaltyBackend)
class RedisPenalties:
    """
    :param store: the ``RedisStore`` (its connection and key prefix).
    """

    def __init__(self, store: Any):
        self._store = store

    def _key(self, key: str) -> str:
        return str(self._store._key("penalty", key))

    def get(self, key: str) -> Deferred[tuple[int, float] | None]:
        d = self._store._call("hmget", self._key(key), ["n", "t"])
        return d.addCallback(_parse)

    def fail(self, key: str, now: float, forget: float) -> Deferred[int]:
        ms = str(max(1, int(forget * 1000)))
        d = self._store._eval(_FAIL, [self._key(key)], [repr(now), ms])
        return d.addCallback(int)

    def clear(self, key: str) -> Deferred[None]:
        d = self._store._call("delete", self._key(key))
        return d.addCallback(lambda _: None)


def _parse(reply: Any) -> tuple[int, float] | None:
    if not isinstance(reply, list) or len(reply) != 2 or None in reply:
        return None
    try:
        return int(reply[0]), float(reply[1])
    except (TypeError, ValueError):
        return None
