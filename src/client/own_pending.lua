-- Re-delivers this consumer's own pending entries (at startup and after a reconnect, when
-- none of them is being handled here), in id order, a page at a time, with their delivery
-- counts. At startup ('count') the re-delivery counts, like a history read: a crash may
-- have cut a handler call short, and a poison entry that kills the process must still
-- reach max_deliveries. After a reconnect ('keep') it does not: these entries were
-- delivered by a read or claim whose reply was lost, so their handler never ran, and the
-- lost delivery already counted once.
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] this consumer, ARGV[3] start ("-" or "(" .. last id), ARGV[4] count,
-- ARGV[5] 'count' or 'keep'
-- Returns {last id scanned or false, {{id, delivery count, {field, value, ...}}, ...},
--          {id deleted from the stream while pending, ...}}
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
local out = {}
local deleted = {}
local last = false
for _, e in ipairs(p) do
  last = e[1]
  local c, count
  if ARGV[5] == 'keep' then
    c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1], 'RETRYCOUNT', e[4])
    count = e[4]
  else
    c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, e[1])
    count = e[4] + 1
  end
  if #c == 1 and c[1] and c[1][2] then
    out[#out + 1] = {e[1], count, c[1][2]}
  else
    -- Trimmed or deleted while pending: nothing to handle. Redis 7 drops it from the
    -- pending list itself; make sure on any server.
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
    deleted[#deleted + 1] = e[1]
  end
end
return {last, out, deleted}
