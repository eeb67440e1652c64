#!lua
--[[
  Settle a patient-wide reservation: keep it active until a time (a hold's
  deadline, a booking's visit) or drop it (the hold failed, expired or was
  cancelled). Idempotent.

  Input:
    KEYS[1] active set  hy:{p}:pa:<patient>
    ARGV[1] request id
    ARGV[2] active until ms, or 0 to drop
  Output: JSON {o = OK}
]]
-- @include codes
-- @include reply

local until_ms = int_arg(ARGV[2])
if not ARGV[1] or ARGV[1] == '' or until_ms == nil or until_ms < 0 then
  return bad('request id and time are required')
end
if until_ms == 0 then
  rcall('ZREM', KEYS[1], ARGV[1])
else
  rcall('ZADD', KEYS[1], until_ms, ARGV[1])
end
return reply({o = OK})
