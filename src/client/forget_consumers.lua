-- Deletes the group's consumers left behind by replicas that are gone: nothing pending and
-- idle longer than the TTL. Checked and deleted in one script, so no entry can be delivered
-- to a consumer between the check and the delete (that entry would become unclaimable).
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] ttl ms, then names never to delete
-- Returns the names deleted.
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local deleted = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if pending == 0 and idle > tonumber(ARGV[2]) and not keep[name] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    deleted[#deleted + 1] = name
  end
end
return deleted
