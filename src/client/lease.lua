-- Takes or renews the lease on a consumer name. Never takes it from another live holder.
-- KEYS[1] lease key; ARGV[1] this process's token, ARGV[2] ttl ms
-- Returns {1, ttl} when held by us, {0, remaining ttl ms} when another process holds it.
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, tonumber(ARGV[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
