"""The Lua scripts that change the budget's keys (``redis_keys``) atomically, one per store operation."""

# KEYS: charged, day, month, build, intact
# ARGV: amount, charged ttl, day ttl, month ttl, build ttl, "1" to refuse without the intact mark
CHARGE_LUA = """
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[5]) == 0 then
  return -1
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('INCRBY', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('INCRBY', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
"""

# KEYS: ledger, topups, intact
# ARGV: member, score, ttl, trim below this score, "1" to refuse without the intact mark
TOPUP_LUA = """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return 'lost'
end
local state = redis.call('GET', KEYS[1])
if state then
  return state
end
redis.call('SET', KEYS[1], 'credited', 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 'new'
"""

# KEYS: rebuild token, intact   ARGV: the intact mark's value
FINISH_LUA = """
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# A build runs while its current run (``run``, 0 for the first) has not ended (``ended`` holds 1 +
# the last run that ended). Both only move forward, so an end or a continuation handled late,
# or twice, changes nothing it should not.

# KEYS: running, ended, run   ARGV: build id
STARTED_LUA = """
local ended = tonumber(redis.call('GET', KEYS[2]) or '0')
local run = tonumber(redis.call('GET', KEYS[3]) or '0')
if ended > run then
  return 0
end
return redis.call('SADD', KEYS[1], ARGV[1])
"""

# KEYS: generation, sleeping   ARGV: generation, build id, ttl   (once per generation)
RESUMED_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: running, ended, sleeping, run   ARGV: build id, ended ttl, the run that ended
ENDED_LUA = """
local k = tonumber(ARGV[3])
if k + 1 > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], tostring(k + 1), 'EX', ARGV[2])
end
if k < tonumber(redis.call('GET', KEYS[4]) or '0') then
  return 0
end
redis.call('SREM', KEYS[3], ARGV[1])
return redis.call('SREM', KEYS[1], ARGV[1])
"""

# KEYS: running, ended, run   ARGV: build id, ttl, the run that starts (its continuation)
CONTINUED_LUA = """
local k = tonumber(ARGV[3])
if k <= tonumber(redis.call('GET', KEYS[3]) or '0') then
  return 0
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') > k then
  return 0
end
return redis.call('SADD', KEYS[1], ARGV[1])
"""
