-- Moves one entry to its dead-letter stream: XADD there, then XACK here, only if the entry
-- is still pending for this consumer. One script, so that no failure can leave an entry
-- acknowledged but not dead-lettered (MULTI would not roll back a failed XADD).
-- KEYS[1] stream, KEYS[2] dead-letter stream
-- ARGV[1] group, ARGV[2] this consumer, ARGV[3] id, then the dead letter's field/value pairs
-- Returns the dead letter's id, or false when the entry is no longer ours.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then
  return false
end
local dead = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return dead
