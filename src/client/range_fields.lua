-- XRANGE that answers each entry's id and a few named fields only: `dlq replay --error`
-- and `--dry-run` need a dead letter's `dlq_error` and origin, and a page of dead letters
-- may hold megabytes of other fields they would otherwise download.
-- KEYS[1] stream; ARGV[1] start, ARGV[2] end, ARGV[3] count, ARGV[4..] field names
-- Returns {{id, value or false, …}, …}, values in the order of the names; a name that
-- occurs more than once answers its last value (a dead letter's own dlq_ fields come last).
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
local out = {}
for i, e in ipairs(r) do
  local fields = e[2]
  local found = {}
  for j = 1, #fields, 2 do
    found[fields[j]] = fields[j + 1]
  end
  local row = {e[1]}
  for n = 4, #ARGV do
    row[#row + 1] = found[ARGV[n]] or false
  end
  out[i] = row
end
return out
