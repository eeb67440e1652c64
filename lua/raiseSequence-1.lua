#!lua
--[[
  Keep a partition's id sequence above an id PostgreSQL has seen (rebuild
  after Redis lost data: a cancelled or refunded booking is not restored, but
  its id must never be issued again).

  Input:
    KEYS[1] id sequence of the partition  hy:{p}:seq
    ARGV[1] the sequence number to stay above (a non-negative integer)
  Output: 1 raised, 0 already above.
]]
local n = ARGV[1]
if not n or not string.match(n, '^%d+$') or #n > 18 then
  return redis.error_reply('ERR haoyuan: sequence must be a non-negative integer')
end
local cur = redis.call('GET', KEYS[1])
if cur and #cur >= #n and (#cur > #n or cur >= n) then return 0 end
redis.call('SET', KEYS[1], n)
return 1
