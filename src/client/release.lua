-- Hands entries this consumer owns to `target` with a chosen idle time and delivery count,
-- without touching entries another consumer has taken meanwhile.
-- The idle time and count are decided in the process (`consumer::fate`, one pure function);
-- this script decides nothing. It exists because the ownership check and the XCLAIM must be
-- one atomic step (between a separate XPENDING and XCLAIM another replica could claim the
-- entry, and we would take it back from under its handler). A kept count is sent as -1 and
-- left to Redis (XCLAIM without RETRYCOUNT), the one place it is current.
--   after a retryable failure: target = the group's backoff consumer,
--     idle = claim_idle - backoff, count kept   -> any replica reclaims it `backoff` later
--   at shutdown, for entries fetched but never started: target = this consumer,
--     idle = claim_idle, count - 1              -> reclaimed at the next claim_interval,
--                                                  the delivery that never ran given back
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] this consumer, ARGV[3] target consumer,
-- then triples: id, idle ms, delivery count to set (-1 keeps it)
-- Returns {number of entries handed over, ids of entries deleted or trimmed from the
-- stream meanwhile}: XCLAIM drops those from the pending list and replies with nothing,
-- so they are settled here and the caller counts them as deleted.
local moved = 0
local deleted = {}
for i = 4, #ARGV, 3 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    local r
    if ARGV[i + 2] == '-1' then
      r = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, id, 'IDLE', ARGV[i + 1], 'JUSTID')
    else
      r = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, id, 'IDLE', ARGV[i + 1],
        'RETRYCOUNT', ARGV[i + 2], 'JUSTID')
    end
    if #r == 1 then
      moved = moved + 1
    else
      deleted[#deleted + 1] = id
    end
  end
end
return {moved, deleted}
