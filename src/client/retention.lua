-- Trims a stream per its retention, but never below the oldest entry that any group on it
-- (streamworker's or not) has not acknowledged or has not yet been delivered. The bound is
-- computed and applied in this one script, so no group can move in between.
--
-- Nothing else runs in Redis while a script does, so the groups' bound comes first and the
-- length bound reads at most ARGV[4] entries, those below that bound first: a stream far
-- over its length is trimmed in many short calls (the caller repeats while a call trims a
-- full step), never in one that copies the whole excess.
-- KEYS[1] stream
-- ARGV[1] max length (0 = none), ARGV[2] max age ms (0 = none), ARGV[3] now (unix ms),
-- ARGV[4] at most this many entries read for the length bound in one call
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

-- What the groups still need: their oldest pending entry, and everything after their
-- last delivered id. `bound` is the lowest need (nil: no group).
local bound = nil
local needs = {}
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
  needs[#needs + 1] = {name, need}
  if bound == nil or less(need, bound) then bound = need end
end

-- What retention wants gone: every entry with an id below `want`.
local want = nil
local max_len, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
if max_age > 0 then
  want = {tonumber(ARGV[3]) - max_age, 0}
end
if max_len > 0 then
  local excess = redis.call('XLEN', KEYS[1]) - max_len
  if excess > 0 then
    local n = math.min(excess, tonumber(ARGV[4]))
    -- Only entries below the groups' bound can go, so those are read first.
    local stop = '+'
    if bound ~= nil then stop = '(' .. text(bound) end
    local r = redis.call('XRANGE', KEYS[1], '-', stop, 'COUNT', n)
    local last = r[#r]
    if #r < n and bound ~= nil then
      -- The bound stopped the read: retention wants more gone than the groups allow. How
      -- much more is read from the bound on, within the same budget, only to tell which
      -- groups hold it back (a group beyond the budget is named once the ones before it
      -- move on).
      local beyond = redis.call('XRANGE', KEYS[1], text(bound), '+', 'COUNT', n - #r)
      if #beyond > 0 then last = beyond[#beyond] end
    end
    r = nil
    if last then
      local id = parse(last[1])
      id = {id[1], id[2] + 1}
      if want == nil or less(want, id) then want = id end
    end
  end
end
if want == nil then return {0, {}} end

local blocking = {}
for _, n in ipairs(needs) do
  if less(n[2], want) then blocking[#blocking + 1] = n[1] end
end
if bound ~= nil and less(bound, want) then want = bound end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', '=', text(want))
return {trimmed, blocking}
