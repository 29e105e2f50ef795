-- Acknowledges entries and applies each one's effects in the same atomic step, only when
-- the entry is still pending. An entry's effects therefore exist exactly when it is
-- acknowledged: a redelivery can never apply them twice.
-- An effect Redis would refuse (WRONGTYPE: the target of a forward is not a stream) must
-- leave its entry pending and untouched, not acknowledged without its effects, and must
-- not hold back the other entries of the batch: each entry's target keys are checked for
-- their type before any of its effects runs, and an entry that fails the check (or whose
-- effect fails anyway) is reported as refused and not acknowledged. The caller retries it
-- a bounded number of times, then dead-letters it.
-- KEYS[1] stream
-- ARGV[1] group, then per entry: id, number of effects, then per effect:
--   command, argument count, arguments
-- Returns {number acknowledged, {id not pending any more (effects skipped), ...},
--          {refused id, why, refused id, why, ...}}; an error when the group is gone.
local needs = { HINCRBY = 'hash', HINCRBYFLOAT = 'hash', HSET = 'hash', XADD = 'stream' }
local types = {}
local function type_of(key)
  local t = types[key]
  if t == nil then
    t = redis.call('TYPE', key)['ok']
    types[key] = t
  end
  return t
end
local i = 2
local acked = 0
local skipped = {}
local refused = {}
while i <= #ARGV do
  local id = ARGV[i]
  local effects = tonumber(ARGV[i + 1])
  i = i + 2
  local found = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if type(found) == 'table' and found.err ~= nil then
    -- NOGROUP: the group (or the stream) is gone; the caller recreates it.
    return redis.error_reply(found.err)
  end
  local ok = #found == 1
  local why = nil
  if ok then
    local j = i
    for _ = 1, effects do
      local want = needs[ARGV[j]]
      if want then
        local key = ARGV[j + 2]
        local t = type_of(key)
        if t ~= 'none' and t ~= want then
          why = 'WRONGTYPE ' .. ARGV[j] .. ' needs a ' .. want .. ' at ' .. key .. ', which holds a ' .. t
          break
        end
      end
      j = j + 2 + tonumber(ARGV[j + 1])
    end
  end
  for _ = 1, effects do
    local argc = tonumber(ARGV[i + 1])
    if ok and why == nil then
      local r = redis.pcall(ARGV[i], unpack(ARGV, i + 2, i + 1 + argc))
      if type(r) == 'table' and r.err ~= nil then
        why = r.err
      elseif ARGV[i] ~= 'PUBLISH' then
        types[ARGV[i + 2]] = needs[ARGV[i]] or types[ARGV[i + 2]]
      end
    end
    i = i + 2 + argc
  end
  if not ok then
    skipped[#skipped + 1] = id
  elseif why ~= nil then
    refused[#refused + 1] = id
    refused[#refused + 1] = why
  else
    redis.call('XACK', KEYS[1], ARGV[1], id)
    acked = acked + 1
  end
end
return {acked, skipped, refused}
