#!lua
--[[
  Confirm a hold after payment: the hold becomes a booking (预约) and a
  "booked" event enters the partition's outbox in the same atomic step.
  A payment that arrives after the hold expired books the same unit if it is
  still free, else another free unit of the slot (of the hold's pool; of any
  pool once the pools have returned to the public), else answers "expired,
  refund due" with a refund event. Never a unit twice. Idempotent by hold id
  and payment reference: a hold paid with one reference (booked, refund due,
  or booked then cancelled) answers another reference "invalid state: paid"
  (that second payment is to be refunded; the API records it), never the
  first answer.

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] hold id
    ARGV[2] payment reference
    ARGV[3] time offset ms (tests only)
    ARGV[4] random number in [0, 1) (anti-scalper delay, if a unit goes back)
  Output: JSON {o = OK, id, sid, slot, unit, now, late, pat, rq} |
          {o = EXPIRED, id, now, reason} (refund due) | {o = NOT_FOUND} |
          {o = INVALID_STATE, st} (st: cancelled, or paid with another
          reference); a replay carries rp = 1.
          | {o = RECOVERING} while the partition is recovering
]]
-- @include codes
-- @include bundle
-- @include records
-- @include outbox
-- @include units
-- @include reclaim

local id, pay = ARGV[1], ARGV[2]
local rnd = tonumber(ARGV[4])
if not id or id == '' then return bad('hold id is required') end
if not pay or pay == '' or #pay > 128 then return bad('payment reference must be 1..128 bytes') end
if rnd == nil or rnd < 0 or rnd >= 1 then return bad('random must be in [0, 1)') end
local now = server_now(ARGV[3])
local k = bundle()
if recovering(k) then return reply({o = RECOVERING, now = now}) end
local rec = get_rec(k.recs, id)
if rec == nil then return reply({o = NOT_FOUND, now = now, what = 'hold'}) end

local function booked_reply(r, replay)
  return reply(settled({o = OK, id = r.id, sid = r.sid, slot = r.slot, unit = r.unit, now = now,
                        late = r.late or 0, pay = r.pay, rp = replay and 1 or 0, pat = r.pat,
                        rq = r.rq or ''}))
end
if (rec.st == 'b' or rec.st == 'r' or rec.st == 'c') and rec.pay and rec.pay ~= ''
    and rec.pay ~= pay then
  return reply({o = INVALID_STATE, now = now, st = 'paid'})
end
if rec.st == 'b' then return booked_reply(rec, true) end
if rec.st == 'r' then
  return reply({o = EXPIRED, id = id, now = now, reason = rec.rsn, rp = 1, pat = rec.pat,
                rq = rec.rq or ''})
end
if rec.st == 'c' then return reply({o = INVALID_STATE, now = now, st = 'cancelled'}) end

local cfg = settings(k)

local function book(r, late)
  r.st = 'b'
  r.pay = pay
  r.bt = now
  r.late = late
  rcall('HSET', k.units, tostring(r.unit), r.id)
  rcall('HSET', k.rule, r.pat, r.id)
  rcall('ZREM', k.dl, r.id)
  rcall('ZREM', k.pdl, r.id)
  put_rec(k.recs, r)
  outbox(k.outbox, event_of('booked', r, now))
  -- A booking counts hospital-wide until the day after its visit.
  local starts = tonumber(rcall('HGET', k.meta, 'starts_ms')) or 0
  note_settle(r, starts > 0 and starts + 86400000 or now + 30 * 86400000)
  return booked_reply(r, false)
end

local function refund(r, reason)
  r.st = 'r'
  r.pay = pay
  r.rsn = reason
  r.ended = now
  put_rec(k.recs, r)
  outbox(k.outbox, event_of('refund_due', r, now, reason))
  note_settle(r, 0)
  return reply(settled({o = EXPIRED, id = r.id, now = now, reason = reason, rp = 0,
                        pat = r.pat, rq = r.rq or ''}))
end

if rec.st == 'h' and rec.dl > now then
  -- A hold taken before a pause (暂停放号) is still paid for and booked.
  if cfg.status == 'open' or cfg.status == 'paused' then return book(rec, 0) end
  -- Suspended while the patient paid: the unit goes back, the money back too.
  drop_rule(k.rule, rec)
  rcall('ZREM', k.dl, id)
  rcall('ZREM', k.pdl, id)
  rcall('HDEL', k.units, tostring(rec.unit))
  rcall('ZADD', k.free, rec.sc, tostring(rec.unit))
  return refund(rec, 'suspended')
end
if rec.st == 'h' then
  -- Past its deadline, not yet reclaimed: the unit is returned as any expiry
  -- would (to a waiter first), then the late payment looks for a unit.
  expire_one(k, cfg, id, now, nil)
  rec = get_rec(k.recs, id)
end

-- The hold has ended (expired or released); the patient paid anyway.
if cfg.status == 'paused' then return refund(rec, 'paused') end
if cfg.status ~= 'open' then return refund(rec, 'suspended') end
local prior = rcall('HGET', k.rule, rec.pat)
if prior and prior ~= id and is_active(k.recs, prior, now) then
  return refund(rec, 'duplicate')
end
if rcall('ZSCORE', k.free, tostring(rec.unit)) then
  rcall('ZREM', k.free, tostring(rec.unit))
  return book(rec, 1)
end
-- Another unit of the slot: from the hold's own pool, or from any pool once
-- the pools have returned to the public; the lowest queue number wins.
local idx = tonumber(rcall('HGET', k.meta, 'i:' .. rec.slot))
local pools = pools_returned(cfg, now) and ALL_POOLS or {pool_of(rec.sc)}
local best, best_sc = lowest_free(k.free, idx, pools)
if best == nil then return refund(rec, 'expired') end
rcall('ZREM', k.free, best)
rec.unit = tonumber(best)
rec.sc = best_sc
return book(rec, 1)
