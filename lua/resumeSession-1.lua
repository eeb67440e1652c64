#!lua
--[[
  Reopen a suspended (the doctor is back) or paused (暂停放号) session for
  booking.

  Input:
    KEYS[1] session hash  hy:{p}:s:<sid>
    ARGV[1] time offset ms (tests only)
  Output: JSON {o = OK, now} | {o = NOT_FOUND}
]]
-- @include codes
-- @include reply

local now = server_now(ARGV[1])
if rcall('EXISTS', KEYS[1]) == 0 then return reply({o = NOT_FOUND, now = now, what = 'session'}) end
rcall('HSET', KEYS[1], 'status', 'open')
rcall('HDEL', KEYS[1], 'suspend_reason', 'pause_reason')
return reply({o = OK, now = now})
