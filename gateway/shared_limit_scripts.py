"""The Redis scripts behind gateway.shared_limits: each one decision made atomically on the store.

Time is the store's own (`TIME`, in ms), so replicas whose clocks disagree fill one bucket at one
rate. A script touches only the keys it is given, all of one tenant (they share the hash tag
`{tenant}`). Per tenant:

- `run`: hash replica -> "count:version", the sequences that replica runs for the tenant. A
  replica always writes its whole count, stamped with a version it increases on every change,
  and a write older than the one stored is dropped: writes that arrive out of order (they go
  over several connections), late (a timed-out call the store ran anyway) or again (the
  renewal) cannot leave a wrong count behind, and a hash the store lost is whole again after
  the replica's next write;
- `alive`: hash replica -> deadline (ms) by which that replica must write again, else its count
  is a crashed replica's and the next admission drops it;
- `requests`, `tokens`: token buckets {level, at}; a missing key is a full bucket, and a bucket
  expires when it would be full again, so an idle tenant leaves nothing behind.
"""

from __future__ import annotations

# Shared by the scripts: the store's clock in ms, a replica's stored count and version.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function stored_count(run, replica)
  local value = redis.call('HGET', run, replica)
  if not value then return 0, -1 end
  local count, version = string.match(value, '^(%d+):(%d+)$')
  return tonumber(count), tonumber(version)
end
"""

# KEYS: run, alive, requests, tokens.
# ARGV: replica, alive_ms, keep_ms, count (this replica's sequences, this request's included),
#       version, max_concurrent (-1: none), requests capacity, requests per ms (0: none),
#       tokens capacity, tokens per ms (0: none), cost in tokens.
# Returns {0, 0} admitted, else {limit, wait_ms}: 1 max_concurrent, 2 requests, 3 tokens. A refusal
# changes nothing but dropping a dead replica's count.
ADMIT = (
    _COMMON
    + """
local replica, alive_ms, keep_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local count, version, max_concurrent = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local requests_capacity, requests_rate = tonumber(ARGV[7]), tonumber(ARGV[8])
local tokens_capacity, tokens_rate = tonumber(ARGV[9]), tonumber(ARGV[10])
local cost = tonumber(ARGV[11])

local mine, mine_version = stored_count(KEYS[1], replica)
local newer = version > mine_version
-- A newer stored count was taken after this request was counted: it holds this request too.
if newer then mine = count end

if max_concurrent >= 0 then
  local running = mine
  local counts = redis.call('HGETALL', KEYS[1])
  for i = 1, #counts, 2 do
    local other = counts[i]
    if other ~= replica then
      local deadline = tonumber(redis.call('HGET', KEYS[2], other) or '0')
      if deadline < now then
        redis.call('HDEL', KEYS[1], other)
        redis.call('HDEL', KEYS[2], other)
      else
        running = running + tonumber(string.match(counts[i + 1], '^(%d+)'))
      end
    end
  end
  if running > max_concurrent then return {1, 1000} end
end

local function level(key, capacity, rate)
  local stored = redis.call('HMGET', key, 'level', 'at')
  if not stored[1] then return capacity end
  local since = math.max(0, now - tonumber(stored[2]))
  return math.min(capacity, tonumber(stored[1]) + since * rate)
end

local function store(key, value, capacity, rate)
  redis.call('HSET', key, 'level', string.format('%.17g', value), 'at', now)
  -- A number argument reaches Redis printed by Lua, and a slow bucket's refill time (a burst
  -- of 2**53 a day: 7.8e+23 ms) is printed in a form PEXPIRE refuses. 1e12 ms is 31 years.
  redis.call('PEXPIRE', key, math.min(math.ceil((capacity - value) / rate) + 1000, 1e12))
end

local requests_level, tokens_level
if requests_rate > 0 then
  requests_level = level(KEYS[3], requests_capacity, requests_rate)
  if requests_level < 1 then
    return {2, math.ceil((1 - requests_level) / requests_rate)}
  end
end
if tokens_rate > 0 then
  tokens_level = level(KEYS[4], tokens_capacity, tokens_rate)
  if tokens_level < cost then
    return {3, math.ceil((cost - tokens_level) / tokens_rate)}
  end
end

if requests_rate > 0 then store(KEYS[3], requests_level - 1, requests_capacity, requests_rate) end
if tokens_rate > 0 then store(KEYS[4], tokens_level - cost, tokens_capacity, tokens_rate) end
if newer then redis.call('HSET', KEYS[1], replica, ARGV[4] .. ':' .. ARGV[5]) end
redis.call('HSET', KEYS[2], replica, now + alive_ms)
redis.call('PEXPIRE', KEYS[1], keep_ms)
redis.call('PEXPIRE', KEYS[2], keep_ms)
return {0, 0}
"""
)

# KEYS: run, alive, tokens.
# ARGV: replica, alive_ms, keep_ms, count, version, refund (tokens back to the bucket).
# A replica's count (after a release, and every renewal) and its deadline; unused tokens go back
# to a bucket that still exists (a missing one is full). The refund is added as it is: the next
# admission caps the level at the capacity of the policy it applies, and a bucket is never
# deleted here (a deleted one would read full under any policy, also a larger one).
REPORT = (
    _COMMON
    + """
local replica, alive_ms, keep_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local version, refund = tonumber(ARGV[5]), tonumber(ARGV[6])
local _, mine_version = stored_count(KEYS[1], replica)
if version >= mine_version then
  redis.call('HSET', KEYS[1], replica, ARGV[4] .. ':' .. ARGV[5])
end
redis.call('HSET', KEYS[2], replica, now + alive_ms)
redis.call('PEXPIRE', KEYS[1], keep_ms)
redis.call('PEXPIRE', KEYS[2], keep_ms)
if refund > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'level', ARGV[6])
end
return 0
"""
)
