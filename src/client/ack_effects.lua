-- Acknowledges entries and applies each one's effects in the same atomic step, only when
-- the entry is still pending. An entry's effects therefore exist exactly when it is
-- acknowledged: a redelivery can never apply them twice.
-- The effects run before the XACK: a script is not rolled back when a command fails, so a
-- failing effect (WRONGTYPE: the target key of a forward is not a stream) must stop the
-- script with its entry still pending, to be sent again, rather than leave it acknowledged
-- without its effects. Entries before it in the batch are done; those after are untouched.
-- KEYS[1] stream
-- ARGV[1] group, then per entry: id, number of effects, then per effect:
--   command, argument count, arguments
-- Returns {number acknowledged, {id not pending any more (effects skipped), ...}}
local i = 2
local acked = 0
local skipped = {}
while i <= #ARGV do
  local id = ARGV[i]
  local effects = tonumber(ARGV[i + 1])
  i = i + 2
  -- XPENDING fails with NOGROUP when the group is gone: not pending, as XACK would say.
  local found = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local ok = type(found) == 'table' and found.err == nil and #found == 1
  for _ = 1, effects do
    local argc = tonumber(ARGV[i + 1])
    if ok then
      redis.call(ARGV[i], unpack(ARGV, i + 2, i + 1 + argc))
    end
    i = i + 2 + argc
  end
  if ok then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    acked = acked + 1
  else
    skipped[#skipped + 1] = id
  end
end
return {acked, skipped}
