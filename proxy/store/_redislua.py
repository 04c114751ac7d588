"""
The Lua scripts of the Redis store (``proxy.store.redis``): each operation that
touches more than one key is one script, so it is atomic and takes one round
trip.
"""

from __future__ import annotations

# -- Lua scripts ----------------------------------------------------------------
# Keys are built from the prefix inside some scripts: fine for one Redis (and a
# prefix with a {hash tag} keeps them in one cluster slot).

# The key check, the data layout and the marker (the store's id and creation
# time) are written once, when the store is created; a Redis restarted empty
# has none, and a store opened on it afterwards writes another id.
_OPEN = """
redis.call('HSETNX', KEYS[1], 'key_check', ARGV[1])
redis.call('HSETNX', KEYS[1], 'schema', ARGV[2])
redis.call('HSETNX', KEYS[1], 'store_id', ARGV[3])
redis.call('HSETNX', KEYS[1], 'created', ARGV[4])
return redis.call('HMGET', KEYS[1], 'key_check', 'schema', 'store_id')
"""

# A token with the store's marker, in one round trip: a store that has lost
# its data refuses logins as unavailable, not as unknown tokens.
_GET_TOKEN = """
return {redis.call('HGET', KEYS[1], 'store_id') or '', redis.call('HGETALL', KEYS[2])}
"""

# Set fields (and drop others) of a hash that exists; never creates one.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + 2 * n)) end
if #ARGV > 1 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 2 + 2 * n)) end
return 1
"""

# The same for an account's state, answering the state it had (false: none).
_SET_STATE = """
local old = redis.call('HGET', KEYS[1], 'state')
if not old then return false end
local n = tonumber(ARGV[1])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + 2 * n)) end
if #ARGV > 1 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 2 + 2 * n)) end
return old
"""

_PUT_ACCOUNT = """
local p, id = ARGV[1], ARGV[2]
local old = redis.call('HMGET', KEYS[1], 'created', 'oauth2_app')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'created', old[1] or ARGV[3], unpack(ARGV, 4))
local app = redis.call('HGET', KEYS[1], 'oauth2_app')
if old[2] and old[2] ~= app then redis.call('SREM', p .. 'app-accounts:' .. old[2], id) end
if app then redis.call('SADD', p .. 'app-accounts:' .. app, id) end
redis.call('SADD', KEYS[2], id)
return 1
"""

# Pairs of (account hash, its app's hash or {}): one id, or every account.
_GET_ACCOUNTS = """
local p = ARGV[1]
local ids = {ARGV[3]}
if ARGV[2] == 'all' then ids = redis.call('SMEMBERS', p .. 'accounts') end
local out = {}
for _, id in ipairs(ids) do
  local a = redis.call('HGETALL', p .. 'account:' .. id)
  if #a > 0 then
    local app = redis.call('HGET', p .. 'account:' .. id, 'oauth2_app')
    out[#out + 1] = a
    out[#out + 1] = app and redis.call('HGETALL', p .. 'app:' .. app) or {}
  end
end
return out
"""

_REMOVE_ACCOUNT = """
local p, id = ARGV[1], ARGV[2]
local zkey = p .. 'tokens:account:' .. id
for _, t in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  redis.call('DEL', p .. 'token:' .. t)
  redis.call('ZREM', p .. 'tokens:all', t)
end
redis.call('DEL', zkey)
local app = redis.call('HGET', KEYS[1], 'oauth2_app')
if app then redis.call('SREM', p .. 'app-accounts:' .. app, id) end
redis.call('SREM', KEYS[2], id)
return redis.call('DEL', KEYS[1])
"""

_PUT_APP = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_LIST_APPS = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local a = redis.call('HGETALL', ARGV[1] .. 'app:' .. id)
  if #a > 0 then out[#out + 1] = a end
end
return out
"""

_REMOVE_APP = """
local used = redis.call('SCARD', KEYS[3])
if used > 0 then return -used end
redis.call('SREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

_ADD_PENDING = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

_TAKE_PENDING = """
local h = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return h
"""

_ADD_TOKEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[3] then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
return 1
"""

_LIST_TOKENS = """
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. 'token:' .. id)
  if #h == 0 then redis.call('ZREM', KEYS[1], id) else out[#out + 1] = h end
end
return out
"""

_REMOVE_TOKEN = """
local account = redis.call('HGET', KEYS[1], 'account')
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if account then redis.call('ZREM', ARGV[1] .. 'tokens:account:' .. account, ARGV[2]) end
return n
"""

# Every encrypted value, as (key, field, ciphertext) triples.
_COLLECT_FUNCTION = """
local function collect(p)
  local out = {}
  local function add(key, field)
    local v = redis.call('HGET', key, field)
    if v then out[#out + 1] = key; out[#out + 1] = field; out[#out + 1] = v end
  end
  add(p .. 'meta', 'key_check')
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'accounts')) do
    local k = p .. 'account:' .. id
    add(k, 'client_secret_enc'); add(k, 'refresh_token_enc'); add(k, 'access_token_enc')
  end
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'apps')) do
    add(p .. 'app:' .. id, 'client_secret_enc')
  end
  for _, s in ipairs(redis.call('ZRANGE', p .. 'pendings', 0, -1)) do
    add(p .. 'pending:' .. s, 'verifier_enc')
  end
  return out
end
"""

_COLLECT = _COLLECT_FUNCTION + "return collect(ARGV[1])\n"

# Compare-and-set of every encrypted value: ARGV[1] the prefix, then
# (key, field, old, new) quadruples. Applies all only if the ciphertexts are
# exactly those that were read (none changed, none added); else -1.
_ROTATE = (
    _COLLECT_FUNCTION
    + """
local current = collect(ARGV[1])
if #current / 3 ~= (#ARGV - 1) / 4 then return -1 end
local seen = {}
for i = 1, #current, 3 do seen[current[i] .. '\\0' .. current[i + 1]] = current[i + 2] end
for i = 2, #ARGV, 4 do
  if seen[ARGV[i] .. '\\0' .. ARGV[i + 1]] ~= ARGV[i + 2] then return -1 end
end
for i = 2, #ARGV, 4 do redis.call('HSET', ARGV[i], ARGV[i + 1], ARGV[i + 3]) end
return (#ARGV - 1) / 4
"""
)
