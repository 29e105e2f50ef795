-- Acknowledges entries and applies each one's effects in the same atomic step, only when
-- its XACK took (the entry was still pending). An entry's effects therefore exist exactly
-- when it is acknowledged: a redelivery can never apply them twice.
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
  local ok = redis.call('XACK', KEYS[1], ARGV[1], id) == 1
  if ok then acked = acked + 1 else skipped[#skipped + 1] = id end
  for _ = 1, effects do
    local argc = tonumber(ARGV[i + 1])
    if ok then
      redis.call(ARGV[i], unpack(ARGV, i + 2, i + 1 + argc))
    end
    i = i + 2 + argc
  end
end
return {acked, skipped}
