#!lua
--[[
  Create or update a session (出诊) and its slots. Reloading a session that
  is selling never resets holds or bookings: capacity changes go through
  set_capacity, status is set only when the session is new.

  Input:
    KEYS[1] session hash        hy:{p}:s:<sid>
    KEYS[2] free units zset     hy:{p}:f:<sid>
    KEYS[3] units in use hash   hy:{p}:u:<sid>
    KEYS[4] department-day set  hy:{p}:dd:<dept>:<date>
    KEYS[5] partition sessions  hy:{p}:sessions
    KEYS[6] recovery marker     hy:{p}:epoch
    ARGV[1] session id
    ARGV[2] session JSON: {sid, hospital, dept, doctor, date, period, fee,
            release_ms, cutoff_ms, starts_ms, cancel_before_ms, hold_ttl_ms, scope,
            waitlist_ttl_ms, waitlist_max, rerelease_ms, pool_return_ms,
            night_from_min, night_to_min, tz_min, max_active,
            slots: [{id, start, end, cap, pools: {"1": n, "2": n, "3": n}}]}
            (pools: units of a NEW slot set aside for phone, window, referral;
            the rest are public; units added later are public)
    ARGV[3] epoch: open the partition with this marker if it has none
            ('' = leave it as it is: a partition that lost its data stays
            closed until `haoyuan rebuild` reopens it)
    ARGV[4] the session's partition (engine.keys.partition_of): new
            records are named "<partition>.<session>.<seq>"
  Output: JSON {o, sid, created, open = 0|1, slots: [{id, cap, requested}]}
]]
-- @include codes
-- @include reply
-- @include units
-- @include capacity

local sid = ARGV[1]
local okj, m = pcall(cjson.decode, ARGV[2] or '')
if not okj or type(m) ~= 'table' then return bad('session JSON does not parse') end
if m.sid ~= sid then return bad('session id mismatch') end
for _, f in ipairs({'dept', 'doctor', 'date', 'period', 'hospital', 'scope'}) do
  if type(m[f]) ~= 'string' or m[f] == '' then return bad('field ' .. f .. ' must be a non-empty string') end
end
if m.scope ~= 'dept' and m.scope ~= 'doctor' then return bad('scope must be dept or doctor') end
local numeric = {'fee', 'release_ms', 'cutoff_ms', 'starts_ms', 'cancel_before_ms', 'hold_ttl_ms',
                 'waitlist_ttl_ms', 'waitlist_max', 'rerelease_ms', 'pool_return_ms',
                 'night_from_min', 'night_to_min', 'tz_min', 'max_active'}
for _, f in ipairs({'waitlist_ttl_ms', 'waitlist_max', 'rerelease_ms', 'pool_return_ms',
                    'night_from_min', 'night_to_min', 'tz_min', 'max_active'}) do
  if m[f] == nil then m[f] = 0 end
end
for _, f in ipairs(numeric) do
  local n = int_arg(m[f])
  if n == nil or n < 0 then return bad('field ' .. f .. ' must be a non-negative integer') end
end
if m.hold_ttl_ms < 1 then return bad('hold_ttl_ms must be positive') end
if type(m.slots) ~= 'table' or #m.slots == 0 or #m.slots > 96 then
  return bad('slots must be a list of 1 to 96 slots')
end
local seen = {}
for _, s in ipairs(m.slots) do
  if type(s) ~= 'table' or type(s.id) ~= 'string' or not string.match(s.id, '^[%w_%-:]+$') then
    return bad('slot id must match [A-Za-z0-9_:-]+')
  end
  if seen[s.id] then return bad('duplicate slot id ' .. s.id) end
  seen[s.id] = true
  local c = int_arg(s.cap)
  if c == nil or c < 0 or c > 9999 then return bad('slot capacity must be 0..9999') end
  if s.pools ~= nil then
    if type(s.pools) ~= 'table' then return bad('slot pools must be an object') end
    for pk, pv in pairs(s.pools) do
      local pn = int_arg(pv)
      if (pk ~= '1' and pk ~= '2' and pk ~= '3') or pn == nil or pn < 0 then
        return bad('slot pools map "1".."3" to non-negative counts')
      end
    end
  end
end
local epoch = ARGV[3] or ''
local part = int_arg(ARGV[4])
if part == nil or part < 0 then return bad('partition must be a non-negative integer') end
if #epoch > 64 then return bad('epoch must be at most 64 bytes') end
if m.night_from_min > 1440 or m.night_to_min > 1440 then return bad('night window is minutes of the day') end

local cur = rcall('HMGET', KEYS[1], 'dept', 'doctor', 'date', 'slots', 'nextno')
local created = cur[1] == false
if not created and (cur[1] ~= m.dept or cur[2] ~= m.doctor or cur[3] ~= m.date) then
  return bad('a session cannot move to another department, doctor or date')
end

-- Queue numbers of a session stay below POOL_BASE.
local growth = 0
for _, s in ipairs(m.slots) do
  local c0 = created and 0 or (tonumber(rcall('HGET', KEYS[1], 'c:' .. s.id)) or 0)
  if s.cap > c0 then growth = growth + s.cap - c0 end
end
if (tonumber(cur[5]) or 0) + growth >= POOL_BASE then
  return bad('a session holds at most 99999 queue numbers')
end

-- Validation is complete; writes start here (Lua has no rollback).
local slots = {}
if not created then slots = cjson.decode(cur[4]) end
local index = {}
for i, s in ipairs(slots) do index[s.id] = i end
-- The slot list is rewritten only when it changes: a reload of the same
-- session (a re-import, a rebuild) leaves every byte as it was.
local slots_changed = created
for _, s in ipairs(m.slots) do
  if index[s.id] == nil then
    slots[#slots + 1] = {id = s.id, start = s.start or '', ['end'] = s['end'] or ''}
    index[s.id] = #slots
    slots_changed = true
  else
    local e = slots[index[s.id]]
    if (s.start and s.start ~= e.start) or (s['end'] and s['end'] ~= e['end']) then
      slots_changed = true
    end
    e.start = s.start or e.start
    e['end'] = s['end'] or e['end']
  end
end
local slots_json = slots_changed and cjson.encode(slots) or cur[4]

rcall('HSET', KEYS[1], 'sid', sid, 'hospital', m.hospital, 'dept', m.dept,
  'doctor', m.doctor, 'date', m.date, 'period', m.period, 'fee', m.fee,
  'release_ms', m.release_ms, 'cutoff_ms', m.cutoff_ms, 'starts_ms', m.starts_ms,
  'cancel_before_ms', m.cancel_before_ms, 'hold_ttl_ms', m.hold_ttl_ms,
  'scope', m.scope, 'slots', slots_json, 'waitlist_ttl_ms', m.waitlist_ttl_ms,
  'waitlist_max', m.waitlist_max, 'rerelease_ms', m.rerelease_ms,
  'pool_return_ms', m.pool_return_ms, 'night_from_min', m.night_from_min,
  'night_to_min', m.night_to_min, 'tz_min', m.tz_min, 'part', part,
  'max_active', m.max_active)
rcall('HSETNX', KEYS[1], 'status', 'open')
rcall('HSETNX', KEYS[1], 'nextno', 0)
rcall('SADD', KEYS[4], sid)
rcall('SADD', KEYS[5], sid)
if epoch ~= '' then rcall('SET', KEYS[6], epoch, 'NX') end

local out = {}
for _, s in ipairs(m.slots) do
  rcall('HSET', KEYS[1], 'i:' .. s.id, index[s.id])
  local applied = set_capacity(KEYS[1], KEYS[2], s.id, index[s.id], s.cap, s.pools)
  out[#out + 1] = {id = s.id, cap = applied, requested = s.cap}
end
return reply({o = OK, sid = sid, created = created, open = rcall('EXISTS', KEYS[6]), slots = out})
