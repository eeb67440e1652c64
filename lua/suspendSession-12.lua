#!lua
--[[
  Suspend a session (停诊): no more holds; every booking is cancelled with a
  "cancelled" outbox event carrying the reason; live holds are released;
  the waitlist is cleared with a "waitlist_closed" event per waiter.
  Bounded by the session's capacity and waitlist. Idempotent. Runs while
  the partition is recovering too (it never sells; a rebuild uses it).

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] reason (short code)
    ARGV[2] time offset ms (tests only)
  Output: JSON {o = OK, cancelled, released, now} | {o = NOT_FOUND}
]]
-- @include codes
-- @include bundle
-- @include records
-- @include outbox

local reason = ARGV[1]
if not reason or reason == '' or #reason > 64 then return bad('reason must be 1..64 bytes') end
local now = server_now(ARGV[2])
local k = bundle()
if rcall('EXISTS', k.meta) == 0 then return reply({o = NOT_FOUND, now = now, what = 'session'}) end
rcall('HSET', k.meta, 'status', 'suspended', 'suspend_reason', reason)
local sid = rcall('HGET', k.meta, 'sid')
for _, w in ipairs(rcall('ZRANGE', k.wait, 0, -1)) do
  local bar = string.find(w, '|', 1, true)
  outbox(k.outbox, {t = 'waitlist_closed', id = sid .. ':' .. string.sub(w, 1, bar - 1), sid = sid,
                    slot = '', unit = 0, pat = string.sub(w, 1, bar - 1),
                    acct = string.sub(w, bar + 1), at = now, rsn = reason})
end
rcall('DEL', k.wait)
-- Units waiting out the anti-scalper delay come back now (the session is closed).
for _, m in ipairs(rcall('ZRANGE', k.quar, 0, -1)) do
  local unit, _, sc = string.match(m, '^(%d+):([^:]+):(%d+)$')
  rcall('ZADD', k.free, tonumber(sc), unit)
end
rcall('DEL', k.quar)
local in_use = rcall('HGETALL', k.units)
local cancelled, released = 0, 0
for i = 1, #in_use, 2 do
  local rec = get_rec(k.recs, in_use[i + 1])
  if rec then
    rcall('HDEL', k.units, tostring(rec.unit))
    rcall('ZADD', k.free, rec.sc, tostring(rec.unit))
    if rec.st == 'b' then
      end_record(k, rec, 'c', now, reason)
      outbox(k.outbox, event_of('cancelled', rec, now, reason))
      cancelled = cancelled + 1
    elseif rec.st == 'h' then
      end_record(k, rec, 'v', now, reason)
      released = released + 1
    else
      drop_rule(k.rule, rec)
    end
  end
end
return reply(settled({o = OK, cancelled = cancelled, released = released, now = now}))
