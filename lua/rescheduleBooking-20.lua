#!lua
--[[
  Reschedule (改约) a booking to another session or slot of the same
  partition, in one atomic step: the patient keeps the old booking until the
  new unit is certain and never holds both. The new unit is the lowest free
  one of the new slot in the channel's pools; the new booking is paid by the
  old booking's payment (its id is new, its payment reference the old one);
  the old booking ends (state c, reason "rescheduled") and its unit goes back
  (to the waitlist's head first). The per-patient rules see one booking
  throughout: the patient-wide place moves to the new booking, and the
  department-day (or doctor-day) rule moves from the old key to the new.
  Inside the old session's cancel deadline it is refused as a cancel would
  be; a late reschedule (within a day of the visit) counts as a late cancel.

  Input:
    KEYS[1..12]  the old session's key bundle (includes/bundle.lua)
    KEYS[13..18] the new session's meta, free, units, dl, wait, quar
    KEYS[19]     the new session's rule key (the patient's active id that
                 department-day or doctor-day)
    KEYS[20]     idempotency key      hy:{p}:i:<account>:<key>
    ARGV[1] booking id            ARGV[2] account ref (its owner)
    ARGV[3] new session id        ARGV[4] new slot id
    ARGV[5] pools the channel may use ("0" = public only)
    ARGV[6] idempotency TTL ms    ARGV[7] time offset ms (tests only)
    ARGV[8] random number in [0, 1) (the old unit's anti-scalper delay)
    ARGV[9] reschedules a booking may have (0 = no limit)
  Output: JSON {o = OK, id, old, sid, slot, unit, fee, old_fee, late, now} |
          a refusal {o = code, now, ...} (nothing changed); a replay rp = 1
]]
-- @include codes
-- @include answers
-- @include bundle
-- @include records
-- @include units
-- @include ids
-- @include outbox
-- @include giveBack
-- @include window

local id, acct, nsid, nslot = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local idem_ttl, rnd, max_rs = int_arg(ARGV[6]), tonumber(ARGV[8]), int_arg(ARGV[9])
if not id or id == '' or not acct or acct == '' or not nsid or nsid == ''
   or not nslot or nslot == '' then
  return bad('booking, account, session and slot are required')
end
if not string.match(ARGV[5] or '', '^[0-3][0-3,]*$') then return bad('pools must be like 0,3') end
if idem_ttl == nil or idem_ttl < 1 or rnd == nil or rnd < 0 or rnd >= 1
   or max_rs == nil or max_rs < 0 then
  return bad('numeric arguments are malformed')
end
local now = server_now(ARGV[7])
local fingerprint = id .. '|' .. nsid .. '|' .. nslot
local replay = stored_answer(KEYS[20], fingerprint, now)
if replay then return replay end
local function remember(tbl)
  local body = reply(tbl)
  store_answer(KEYS[20], fingerprint, body, idem_ttl)
  if #SETTLE > 0 then body = reply(settled(tbl)) end
  return body
end

local k = bundle()
if recovering(k) then return reply({o = RECOVERING, now = now}) end
local nk = {meta = KEYS[13], free = KEYS[14], units = KEYS[15], dl = KEYS[16], wait = KEYS[17],
            quar = KEYS[18], recs = k.recs, pdl = k.pdl, rule = KEYS[19], outbox = k.outbox,
            seq = k.seq, epoch = k.epoch}

-- The booking: the account's own, booked.
local rec = get_rec(k.recs, id)
if rec == nil or rec.acct ~= acct then
  return remember({o = NOT_FOUND, now = now, what = 'booking'})
end
if rec.st ~= 'b' then
  local names = {h = 'held', x = 'expired', v = 'released', r = 'refund_due', c = 'cancelled'}
  return remember({o = INVALID_STATE, now = now, st = names[rec.st] or rec.st})
end
if rec.sid == nsid and rec.slot == nslot then
  return remember({o = INVALID_STATE, now = now, st = 'same_slot'})
end
if max_rs > 0 and (tonumber(rec.rs) or 0) >= max_rs then
  return remember({o = LIMIT_REACHED, now = now, what = 'reschedules'})
end
-- The old session's deadline, as a cancel would see it.
local om = rcall('HMGET', k.meta, 'cancel_before_ms', 'starts_ms')
local before, starts = tonumber(om[1]) or 0, tonumber(om[2]) or 0
if before > 0 and starts > 0 and now > starts - before then
  return remember({o = CANCEL_DEADLINE, now = now, deadline_ms = starts - before})
end
local late = (starts > 0 and now > starts - 86400000) and 1 or 0

-- The new session: selling now (every rule a hold checks, but the patient's own).
local cfg, x = settings(nk, 'release_ms', 'i:' .. nslot, 'night_from_min', 'night_to_min',
                        'tz_min', 'starts_ms')
if cfg.status == false then return remember({o = NOT_FOUND, now = now, what = 'session'}) end
if x[2] == false then return remember({o = NOT_FOUND, now = now, what = 'slot'}) end
if cfg.status == 'paused' then return reply({o = PAUSED, now = now}) end
if cfg.status ~= 'open' then return remember({o = SUSPENDED, now = now}) end
if now < tonumber(x[1]) then return reply({o = NOT_OPEN, now = now, release_ms = tonumber(x[1])}) end
if cfg.cutoff_ms > 0 and now >= cfg.cutoff_ms then
  return remember({o = CLOSED, now = now, cutoff_ms = cfg.cutoff_ms})
end
local opens = night_reopens(now, tonumber(x[3]) or 0, tonumber(x[4]) or 0, tonumber(x[5]))
if opens then return reply({o = NOT_OPEN, now = now, release_ms = opens, night = 1}) end
-- Another active hold or booking of the patient that day (not this one).
if nk.rule ~= k.rule then
  local prior = rcall('HGET', nk.rule, rec.pat)
  if prior and prior ~= id and is_active(k.recs, prior, now) then
    return remember({o = DUPLICATE, now = now, existing = prior})
  end
end
local pools = ALL_POOLS
if not pools_returned(cfg, now) then
  pools = {}
  for p in string.gmatch(ARGV[5], '%d') do pools[#pools + 1] = tonumber(p) end
end
local unit, score = lowest_free(nk.free, tonumber(x[2]), pools)
if unit == nil then return remember({o = SOLD_OUT, now = now}) end

-- Certain: the swap.
rcall('ZREM', nk.free, unit)
local nid = next_id(nk, now, cfg.part, nsid)
local nrec = {id = nid, sid = nsid, slot = nslot, unit = tonumber(unit), sc = score,
              pat = rec.pat, acct = acct, st = 'b', dl = 0, at = now, bt = now,
              fee = cfg.fee, pay = rec.pay, rq = rec.rq, rs = (tonumber(rec.rs) or 0) + 1,
              prev = id}
rcall('HSET', nk.units, tostring(unit), nid)
put_rec(k.recs, nrec)

end_record(k, rec, 'c', now, 'rescheduled')
SETTLE[#SETTLE] = nil  -- the patient-wide place is not given up: it moves
rcall('HSET', nk.rule, rec.pat, nid)
local ev = event_of('cancelled', rec, now, 'rescheduled')
ev.late = late
outbox(k.outbox, ev)
local bev = event_of('booked', nrec, now)
bev.prev = id
outbox(k.outbox, bev)
local nstarts = tonumber(x[6]) or 0
note_settle(nrec, nstarts > 0 and nstarts + 86400000 or now + 30 * 86400000)
give_back(k, settings(k), rec, now, rnd)
return remember({o = OK, id = nid, old = id, sid = nsid, slot = nslot, unit = nrec.unit,
                 fee = nrec.fee, old_fee = tonumber(rec.fee) or 0, late = late, now = now,
                 pat = rec.pat, rq = rec.rq or ''})
