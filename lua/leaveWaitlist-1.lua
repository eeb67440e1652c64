#!lua
--[[
  Leave a session's waitlist. Idempotent.

  Input:
    KEYS[1] waitlist  hy:{p}:w:<sid>
    ARGV[1] patient ref
    ARGV[2] account ref
  Output: JSON {o = OK, removed = 0|1}
]]
-- @include codes
-- @include reply

if not ARGV[1] or ARGV[1] == '' or not ARGV[2] or ARGV[2] == '' then
  return bad('patient and account are required')
end
return reply({o = OK, removed = rcall('ZREM', KEYS[1], ARGV[1] .. '|' .. ARGV[2])})
