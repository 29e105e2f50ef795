-- The atomic end of a settlement too large for one script (see `client/large.rs`).
-- A script cannot pass more than ~8,000 values to one command (Lua's C stack,
-- LUAI_MAXCSTACK), so the XADD of an entry with more fields than that is sent as a plain
-- command inside a MULTI, and this script, queued right after it in the same MULTI,
-- decides whether it stands. EXEC runs them back to back, so nothing else happens in
-- between and whatever those XADDs added is the last entry of their streams:
-- - the entry is still pending (for ARGV[3], or for anyone when ARGV[3] is empty): apply
--   its other effects, XACK it, return 1;
-- - it is not (another consumer took it over or settled it first, the group is gone):
--   delete what the XADDs added, return 0 (or, for a dead letter, the NOGROUP error).
-- A WATCH could not guard this: XCLAIM, XAUTOCLAIM and XACK do not invalidate a WATCH on
-- the stream (checked on Redis 7.0), while every producer's XADD does.
-- An XADD refused at run time (WRONGTYPE) left its key holding something that is not a
-- stream: then nothing is acknowledged, the XADDs that did run are taken back, and the
-- script fails naming the key. (OOM refuses the whole MULTI before any of it runs.)
-- KEYS[1] stream, KEYS[2..] the keys of the XADDs before this script, in order
-- ARGV[1] group, ARGV[2] id, ARGV[3] consumer or '', then the entry's other effects:
--   command, argument count, arguments (as in ack_effects.lua)
-- Returns 1 (acknowledged) or 0 (not pending any more; nothing written).
local function is_stream(key)
  return redis.call('TYPE', key).ok == 'stream'
end

local function undo()
  for k = #KEYS, 2, -1 do
    if is_stream(KEYS[k]) then
      local last = redis.call('XREVRANGE', KEYS[k], '+', '-', 'COUNT', 1)
      if #last == 1 then
        redis.call('XDEL', KEYS[k], last[1][1])
      end
    end
  end
end

for k = 2, #KEYS do
  if not is_stream(KEYS[k]) then
    undo()
    return redis.error_reply('WRONGTYPE the XADD to ' .. KEYS[k] ..
      ' was refused: the key holds a ' .. redis.call('TYPE', KEYS[k]).ok ..
      ', not a stream; the entry stays pending')
  end
end

local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if type(p) == 'table' and p.err ~= nil then
  undo()
  if ARGV[3] == '' then
    return 0
  end
  return p
end
if #p == 0 or (ARGV[3] ~= '' and p[1][2] ~= ARGV[3]) then
  undo()
  return 0
end

local i = 4
while i <= #ARGV do
  local argc = tonumber(ARGV[i + 1])
  local done = redis.pcall(ARGV[i], unpack(ARGV, i + 2, i + 1 + argc))
  if type(done) == 'table' and done.err ~= nil then
    undo()
    return done
  end
  i = i + 2 + argc
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
