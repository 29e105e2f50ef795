-- Reclaims entries idle longer than min-idle from any consumer of the group (XAUTOCLAIM,
-- cursor carried by the caller) and returns each with its delivery count, which
-- XAUTOCLAIM itself does not report.
-- The group's pause key is looked at first, so the loop learns of `streamworker pause` with
-- the reclaim it does anyway: a paused group claims nothing.
-- KEYS[1] stream, KEYS[2] the group's pause key
-- ARGV[1] group, ARGV[2] this consumer, ARGV[3] min idle ms, ARGV[4] cursor, ARGV[5] count
-- Returns {next cursor, {{id, delivery count, {field, value, ...}}, ...}, {deleted id, ...},
-- paused (0 or 1)}
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {ARGV[4], {}, {}, 1}
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  local count = 1
  if #p == 1 then count = p[1][4] end
  out[#out + 1] = {e[1], count, e[2]}
end
return {r[1], out, r[3] or {}, 0}
