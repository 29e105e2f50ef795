-- The atomic end of replaying a dead letter too large for replay.lua (see
-- `client/large.rs`): queued in a MULTI right after the plain XADD of the replay to the
-- origin stream, so the replay's entry is that stream's last. The replay stands only if
-- this call deletes the dead letter; when another replay deleted it first, the copy just
-- added is taken back. A refused XADD (the origin key is not a stream) keeps the dead
-- letter.
-- KEYS[1] dead-letter stream, KEYS[2] origin stream
-- ARGV[1] dead letter id
-- Returns 1 (replayed) or 0 (the dead letter was gone; nothing written).
local t = redis.call('TYPE', KEYS[2]).ok
if t ~= 'stream' then
  return redis.error_reply('WRONGTYPE the replay to ' .. KEYS[2] ..
    ' was refused: the key holds a ' .. t .. ', not a stream; the dead letter is kept')
end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  return 1
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last == 1 then
  redis.call('XDEL', KEYS[2], last[1][1])
end
return 0
