#!lua
--[[
  Change one slot's capacity (加号 raises it; lowering removes free units only).

  Input:
    KEYS[1] session hash     hy:{p}:s:<sid>
    KEYS[2] free units zset  hy:{p}:f:<sid>
    ARGV[1] slot id
    ARGV[2] target capacity (0..9999)
  Output: JSON {o, slot, cap, requested} or {o = NOT_FOUND}
]]
-- @include codes
-- @include reply
-- @include units
-- @include capacity

local target = int_arg(ARGV[2])
if target == nil or target < 0 or target > 9999 then return bad('capacity must be 0..9999') end
local idx = tonumber(rcall('HGET', KEYS[1], 'i:' .. (ARGV[1] or '')))
if idx == nil then return reply({o = NOT_FOUND, what = 'slot'}) end
local cur = tonumber(rcall('HGET', KEYS[1], 'c:' .. ARGV[1])) or 0
local nextno = tonumber(rcall('HGET', KEYS[1], 'nextno')) or 0
if target > cur and nextno + target - cur >= POOL_BASE then
  return bad('a session holds at most 99999 queue numbers')
end
local applied = set_capacity(KEYS[1], KEYS[2], ARGV[1], idx, target, nil)
return reply({o = OK, slot = ARGV[1], cap = applied, requested = target})
