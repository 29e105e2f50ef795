-- Re-delivers this consumer's own pending entries (at startup and after a reconnect, when
-- none of them is being handled here), in id order, a page at a time. Like a history read,
-- each delivery counts; unlike one, it reports the delivery count.
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] this consumer, ARGV[3] start ("-" or "(" .. last id), ARGV[4] count
-- Returns {last id scanned or false, {{id, delivery count, {field, value, ...}}, ...},
--          {id deleted from the stream while pending, ...}}
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
local out = {}
local deleted = {}
local last = false
for _, e in ipairs(p) do
  last = e[1]
  local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1])
  if #c == 1 and c[1] and c[1][2] then
    out[#out + 1] = {e[1], e[4] + 1, c[1][2]}
  else
    -- Trimmed or deleted while pending: nothing to handle. Redis 7 drops it from the
    -- pending list itself; make sure on any server.
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
    deleted[#deleted + 1] = e[1]
  end
end
return {last, out, deleted}
