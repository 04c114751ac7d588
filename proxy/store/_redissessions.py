"""
The live sessions of every instance sharing one Redis store (``SessionBoard``):
each instance publishes its own sessions every few seconds to a hash of its
own with a TTL, and an index of the instances still alive (a sorted set
scored by when each one's entry expires, in Redis's own clock, so the
instances' clocks need not agree). An instance that died stops being listed
when its entry expires. Ending another instance's session goes through the
``SessionBus`` (``publish(session=ID)``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ._interfaces import IRedisAccess

log = Logger()

# A published entry outlives this many rounds of publishing: one lost round
# (a slow Redis) does not drop an instance from the list.
TTL_ROUNDS = 3

_PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Reads the hashes of the instances alive now (standalone Redis: the hash
# keys are derived from the index, as the store's other scripts do not).
_LIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  for _, v in ipairs(redis.call('HVALS', ARGV[1] .. id)) do
    table.insert(out, v)
  end
end
return out
"""


class SessionBoard:
    """
    :param store: the ``RedisStore`` (its connections and key prefix).
    :param instance: this instance's id (the ``SessionBus``'s).
    :param interval: seconds between publications; an entry lives
        ``TTL_ROUNDS`` times that.
    """

    def __init__(self, store: IRedisAccess, instance: str, interval: float):
        self._store = store
        self.instance = instance
        self._ttl = int(interval * TTL_ROUNDS * 1000)
        self._index = str(store.key("sessions", "instances"))
        self._prefix = str(store.key("sessions", "live", ""))
        self._failing = False

    def publish(self, views: list[dict[str, Any]]) -> Deferred[Any]:
        """Replace this instance's published sessions; errors are logged, not raised."""
        args = [self.instance, str(self._ttl)]
        for view in views:
            args += [view["id"], json.dumps({**view, "instance": self.instance})]
        d = self._store.script(_PUBLISH, [self._prefix + self.instance, self._index], args)
        d.addCallbacks(self._published, self._failed)
        return d

    def _published(self, _: Any) -> None:
        if self._failing:
            self._failing = False
            log.info("publishing the live sessions works again")

    def _failed(self, failure: Any) -> None:
        # Once per outage, not every round.
        if not self._failing:
            self._failing = True
            log.warn("publishing the live sessions failed: {why}", why=str(failure.value)[:200])

    async def others(self) -> list[dict[str, Any]]:
        """The sessions the other live instances published, as they published them."""
        raw = await self._store.script(_LIST, [self._index], [self._prefix])
        found = []
        for value in raw or []:
            try:
                view = json.loads(value)
            except (ValueError, TypeError):
                continue
            if isinstance(view, dict) and view.get("instance") != self.instance:
                found.append(view)
        return found
