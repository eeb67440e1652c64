#!lua
--[[
  The patient-wide step of a hold, on the PATIENT's partition (a rule that
  crosses partitions): refuse a banned patient (no-shows) and a patient at
  the hospital's limit of active holds and bookings; else reserve one place.
  The engine then holds on the session's partition and, on failure, takes
  the reservation back (compensation). A reservation that is never settled
  expires by its score, so a crash between the two steps cannot leak.

  Input:
    KEYS[1] active set     hy:{p}:pa:<patient>  (member request id, score = active until ms)
    KEYS[2] ban key        hy:{p}:ban:<patient> (value: banned until ms)
    ARGV[1] request id
    ARGV[2] max active holds and bookings (0 = no limit)
    ARGV[3] provisional lifetime ms (the hold's payment window plus slack)
    ARGV[4] time offset ms (tests only)
  Output: JSON {o = OK, active, rp} | {o = BANNED, until_ms} | {o = LIMIT_REACHED, active}
]]
-- @include codes
-- @include reply

local rq = ARGV[1]
local max, ttl = int_arg(ARGV[2]), int_arg(ARGV[3])
if not rq or rq == '' then return bad('request id is required') end
if max == nil or max < 0 or ttl == nil or ttl < 1 then return bad('limit and lifetime are malformed') end
local now = server_now(ARGV[4])
local ban = tonumber(rcall('GET', KEYS[2]))
if ban and ban > now then return reply({o = BANNED, now = now, until_ms = ban}) end
rcall('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if rcall('ZSCORE', KEYS[1], rq) then
  return reply({o = OK, now = now, active = rcall('ZCARD', KEYS[1]), rp = 1})
end
local active = rcall('ZCARD', KEYS[1])
if max > 0 and active >= max then return reply({o = LIMIT_REACHED, now = now, active = active}) end
rcall('ZADD', KEYS[1], now + ttl, rq)
rcall('PEXPIRE', KEYS[1], 400 * 86400000)
return reply({o = OK, now = now, active = active + 1, rp = 0})
