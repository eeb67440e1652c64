#!lua
--[[
  Join a session's waitlist (候补) when no unit the channel may use is free.
  Bounded; one entry per patient per session; not for a patient who already
  holds or booked that department-day. A returned unit goes to the head.

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] patient ref
    ARGV[2] account ref
    ARGV[3] pools the channel may use, comma separated
    ARGV[4] time offset ms (tests only)
  Output: JSON {o = OK, position, now, rp} | {o = SUSPENDED | CLOSED | NOT_OPEN |
          DUPLICATE | WAITLIST_FULL | NOT_FOUND} | {o = INVALID_STATE, st = 'units_free'}
          | {o = RECOVERING} while the partition is recovering
]]
-- @include codes
-- @include bundle
-- @include records
-- @include units

local pat, acct = ARGV[1], ARGV[2]
if not pat or pat == '' or not acct or acct == '' or string.find(pat, '|', 1, true)
   or string.find(acct, '|', 1, true) then
  return bad('patient and account are required (no "|")')
end
if not string.match(ARGV[3] or '', '^[0-3][0-3,]*$') then return bad('pools must be like 0,3') end
local now = server_now(ARGV[4])
local k = bundle()
if recovering(k) then return reply({o = RECOVERING, now = now}) end
local s = rcall('HMGET', k.meta, 'status', 'release_ms', 'cutoff_ms', 'waitlist_ttl_ms',
                'waitlist_max', 'slots', 'pool_return_ms')
if s[1] == false then return reply({o = NOT_FOUND, now = now, what = 'session'}) end
if s[1] == 'paused' then return reply({o = PAUSED, now = now}) end
if s[1] ~= 'open' then return reply({o = SUSPENDED, now = now}) end
if tonumber(s[4]) <= 0 then return reply({o = INVALID_STATE, now = now, st = 'no_waitlist'}) end
if now < tonumber(s[2]) then return reply({o = NOT_OPEN, now = now, release_ms = tonumber(s[2])}) end
local cutoff = tonumber(s[3])
if cutoff > 0 and now >= cutoff then return reply({o = CLOSED, now = now, cutoff_ms = cutoff}) end
local member = pat .. '|' .. acct
if rcall('ZSCORE', k.wait, member) then
  return reply({o = OK, now = now, rp = 1, position = rcall('ZRANK', k.wait, member) + 1})
end
local prior = rcall('HGET', k.rule, pat)
if prior and is_active(k.recs, prior, now) then
  return reply({o = DUPLICATE, now = now, existing = prior})
end
local all = tonumber(s[7]) > 0 and now >= tonumber(s[7])
for _, sl in ipairs(cjson.decode(s[6])) do
  local lo = tonumber(rcall('HGET', k.meta, 'i:' .. sl.id)) * SLOT_BASE
  local n = 0
  if all then
    n = rcall('ZCOUNT', k.free, lo, lo + SLOT_BASE - 1)
  else
    for p in string.gmatch(ARGV[3], '%d') do
      local plo = lo + tonumber(p) * POOL_BASE
      n = n + rcall('ZCOUNT', k.free, plo, plo + POOL_BASE - 1)
    end
  end
  if n > 0 then return reply({o = INVALID_STATE, now = now, st = 'units_free'}) end
end
if rcall('ZCARD', k.wait) >= tonumber(s[5]) then
  return reply({o = WAITLIST_FULL, now = now})
end
-- FIFO by join time; the sequence breaks ties inside one millisecond.
rcall('ZADD', k.wait, now * 1000 + (rcall('INCR', k.seq) % 1000), member)
return reply({o = OK, now = now, rp = 0, position = rcall('ZCARD', k.wait)})
