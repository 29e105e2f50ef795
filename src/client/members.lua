-- Records a replica of a partitioned group as alive (or gone) and lists the live ones.
-- Each member is scored by when its heartbeat expires, on the server's clock, so replicas
-- with skewed clocks still agree on who is alive.
-- KEYS[1] members sorted set; ARGV[1] consumer name, ARGV[2] heartbeat ttl ms,
-- ARGV[3] '1' to leave instead of beating
-- Returns the live members' names.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  -- The set disappears by itself once every replica is gone.
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
