-- XGROUP SETID, answering the position it replaced: `streamworker rewind` counts the
-- entries that will be delivered again from the group's last-delivered id, and a replica
-- reading between a separate XINFO GROUPS and the SETID would make that count wrong.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] the new last-delivered id
-- Returns the previous last-delivered id, or false when the group does not exist.
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if groups.err then
  -- No stream, no group; any other error (an ACL refusal) is the caller's to see.
  if string.find(groups.err, 'no such key', 1, true) then return false end
  return groups
end
for _, g in ipairs(groups) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] then
    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[2])
    return last
  end
end
return false
