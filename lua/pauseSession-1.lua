#!lua
--[[
  Pause sales of a session (暂停放号): no new holds and no waitlist offers
  or joins until it is resumed (resumeSession-1); bookings and holds stand
  (a hold taken before the pause is still paid for and booked). Holds answer
  PAUSED, a "come back later" refusal. A suspended session (停诊) is not
  paused: its bookings are already gone. Idempotent.

  Input:
    KEYS[1] session hash  hy:{p}:s:<sid>
    ARGV[1] reason (short code, 1..64 bytes)
    ARGV[2] time offset ms (tests only)
  Output: JSON {o = OK, now} | {o = NOT_FOUND, what} | {o = INVALID_STATE, st}
]]
-- @include codes
-- @include reply

local reason = ARGV[1]
if not reason or reason == '' or #reason > 64 then return bad('reason must be 1..64 bytes') end
local now = server_now(ARGV[2])
local status = rcall('HGET', KEYS[1], 'status')
if not status then return reply({o = NOT_FOUND, now = now, what = 'session'}) end
if status == 'suspended' then return reply({o = INVALID_STATE, now = now, st = 'suspended'}) end
rcall('HSET', KEYS[1], 'status', 'paused', 'pause_reason', reason)
return reply({o = OK, now = now})
