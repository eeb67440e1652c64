#!lua flags=no-writes
--[[
  An atomic snapshot of one session for audit and rebuild. Read-only;
  bounded by the session's capacity and waitlist.

  Input:
    KEYS[1] session hash          hy:{p}:s:<sid>
    KEYS[2] free units zset       hy:{p}:f:<sid>
    KEYS[3] units in use hash     hy:{p}:u:<sid>
    KEYS[4] records hash          hy:{p}:recs
    KEYS[5] delayed units zset    hy:{p}:q:<sid>
    KEYS[6] waitlist zset         hy:{p}:w:<sid>
    ARGV[1] time offset ms (tests only)
  Output: JSON {now, meta: {field: value}, free: [ [unit, score] ],
          used: [ [unit, record JSON or false, record id] ], delayed: [member],
          waiting: n} or {now, meta: false}
]]
-- @include codes
-- @include reply

local now = server_now(ARGV[1])
local flat = rcall('HGETALL', KEYS[1])
if #flat == 0 then return '{"now":' .. string.format('%d', now) .. ',"meta":false}' end
local meta = {}
for i = 1, #flat, 2 do meta[flat[i]] = flat[i + 1] end
local free = {}
local zs = rcall('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #zs, 2 do free[#free + 1] = {zs[i], tonumber(zs[i + 1])} end
local used = {}
local us = rcall('HGETALL', KEYS[3])
for i = 1, #us, 2 do
  used[#used + 1] = {us[i], rcall('HGET', KEYS[4], us[i + 1]) or false, us[i + 1]}
end
local out = {now = now, meta = meta, free = free, used = used,
             delayed = rcall('ZRANGE', KEYS[5], 0, -1), waiting = rcall('ZCARD', KEYS[6])}
return cjson.encode(out)
