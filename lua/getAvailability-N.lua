#!lua flags=no-writes
--[[
  Remaining units per slot for one or more sessions of one department-day,
  in one round trip. Read-only.

  Input:
    KEYS[4i-3] session hash      hy:{p}:s:<sid>
    KEYS[4i-2] free units zset   hy:{p}:f:<sid>
    KEYS[4i-1] waitlist zset     hy:{p}:w:<sid>
    KEYS[4i]   recovery marker   hy:{p}:epoch (absent: status "recovering")
    ARGV[1]    time offset ms (tests only)
    ARGV[2]    pools the reader's channel may use, comma separated
  Output: JSON {now, sessions: [{sid, status (open | suspended | recovering), release_ms, cutoff_ms, waiting,
          slots: [{id, start, end, cap, free}]}]} (missing sessions omitted;
          free counts the units of the channel's pools, or all once the pools
          have returned to the public)
]]
-- @include codes
-- @include reply
-- @include units

if #KEYS == 0 or #KEYS % 4 ~= 0 then
  return bad('keys come in fours: session, free, waitlist, marker')
end
if not string.match(ARGV[2] or '', '^[0-3][0-3,]*$') then return bad('pools must be like 0,3') end
local now = server_now(ARGV[1])
local out = {}
for i = 1, #KEYS, 4 do
  local s = rcall('HMGET', KEYS[i], 'sid', 'status', 'release_ms', 'cutoff_ms', 'slots',
                  'pool_return_ms')
  if s[1] then
    local all = tonumber(s[6] or 0) > 0 and now >= tonumber(s[6])
    local slots = {}
    for _, sl in ipairs(cjson.decode(s[5])) do
      local meta = rcall('HMGET', KEYS[i], 'i:' .. sl.id, 'c:' .. sl.id)
      local lo = tonumber(meta[1]) * SLOT_BASE
      local n = 0
      if all then
        n = rcall('ZCOUNT', KEYS[i + 1], lo, lo + SLOT_BASE - 1)
      else
        for p in string.gmatch(ARGV[2], '%d') do
          local plo = lo + tonumber(p) * POOL_BASE
          n = n + rcall('ZCOUNT', KEYS[i + 1], plo, plo + POOL_BASE - 1)
        end
      end
      slots[#slots + 1] = {id = sl.id, start = sl.start, ['end'] = sl['end'],
                           cap = tonumber(meta[2]), free = n}
    end
    local status = s[2]
    if rcall('EXISTS', KEYS[i + 3]) == 0 then status = 'recovering' end
    out[#out + 1] = {sid = s[1], status = status, release_ms = tonumber(s[3]),
                     cutoff_ms = tonumber(s[4]), waiting = rcall('ZCARD', KEYS[i + 2]),
                     slots = slots}
  end
end
if #out == 0 then return '{"now":' .. string.format('%d', now) .. ',"sessions":[]}' end
return reply({now = now, sessions = out})
