-- Trims a stream per its retention, but never below the oldest entry that any group on it
-- (streamworker's or not) has not acknowledged or has not yet been delivered. The bound is
-- computed and applied in this one script, so no group can move in between.
-- KEYS[1] stream
-- ARGV[1] max length (0 = none), ARGV[2] max age ms (0 = none), ARGV[3] now (unix ms),
-- ARGV[4] at most this many entries looked at for the length bound in one call
-- Returns {entries trimmed, {group holding trimming back, ...}}
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  if not dash then return {tonumber(id), 0} end
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
local function text(id)
  return string.format('%.0f-%.0f', id[1], id[2])
end

if redis.call('EXISTS', KEYS[1]) == 0 then return {0, {}} end

-- What retention wants gone: every entry with an id below `want`.
local want = nil
local max_len, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
if max_age > 0 then
  want = {tonumber(ARGV[3]) - max_age, 0}
end
if max_len > 0 then
  local excess = redis.call('XLEN', KEYS[1]) - max_len
  if excess > 0 then
    excess = math.min(excess, tonumber(ARGV[4]))
    local r = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess + 1)
    local keep = r[#r]
    if keep then
      local id = parse(keep[1])
      if #r <= excess then id = {id[1], id[2] + 1} end
      if want == nil or less(want, id) then want = id end
    end
  end
end
if want == nil then return {0, {}} end

-- What the groups still need: their oldest pending entry, and everything after their
-- last delivered id.
local bound = want
local blocking = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local l = parse(last)
  local need = {l[1], l[2] + 1}
  local summary = redis.call('XPENDING', KEYS[1], name)
  if summary[1] > 0 then
    local oldest = parse(summary[2])
    if less(oldest, need) then need = oldest end
  end
  if less(need, want) then
    blocking[#blocking + 1] = name
    if less(need, bound) then bound = need end
  end
end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', '=', text(bound))
return {trimmed, blocking}
