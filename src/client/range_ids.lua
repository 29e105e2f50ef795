-- XRANGE that answers ids only: an operator command paging through dead letters needs
-- their ids, and a page of them may hold megabytes of fields it would otherwise download.
-- KEYS[1] stream; ARGV[1] start, ARGV[2] end, ARGV[3] count
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local ids = {}
for i, e in ipairs(r) do
  ids[i] = e[1]
end
return ids
