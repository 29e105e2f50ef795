-- Replays one dead letter: re-adds its original fields (every field but the dlq_ ones, in
-- order) to the origin stream with dlq_replay_of and dlq_replay_group, and deletes the dead
-- letter, in one script. Safe to interrupt and to repeat: a dead letter is either still
-- there and not yet replayed, or replayed and gone.
-- KEYS[1] dead-letter stream, KEYS[2] origin stream
-- ARGV[1] dead letter id, ARGV[2] group the replay is meant for, ARGV[3] the most values
-- one XADD may take here
-- Returns the new entry's id, false when the dead letter is gone (already replayed), or
-- the number of values the XADD would take when that is more than one call can be passed
-- (Lua's C stack holds ~8,000): the caller then replays it with replay_large.lua.
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #r == 0 then return false end
local fields = r[1][2]
local out = {}
local origin_id, replay_of
for i = 1, #fields, 2 do
  local k, v = fields[i], fields[i + 1]
  if k == 'dlq_origin_id' then origin_id = v
  elseif k == 'dlq_replay_of' then replay_of = v
  elseif string.sub(k, 1, 4) ~= 'dlq_' then
    out[#out + 1] = k
    out[#out + 1] = v
  end
end
-- A dead letter of a replay keeps pointing at the very first original.
out[#out + 1] = 'dlq_replay_of'
out[#out + 1] = replay_of or origin_id or ARGV[1]
out[#out + 1] = 'dlq_replay_group'
out[#out + 1] = ARGV[2]
if #out > tonumber(ARGV[3]) then
  return #out
end
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
