#!lua
--[[
  Cancel a booking: the unit goes back (to the waitlist head, after the
  anti-scalper delay, or free) and a "cancelled" event enters the outbox in
  the same step. Idempotent by booking id. Refused after the session's
  cancellation deadline unless forced (admin, HIS compensation, 停诊).

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] booking id
    ARGV[2] account ref ('' = any: admin, HIS compensation)
    ARGV[3] reason (short code, e.g. patient, his_rejected, conflict)
    ARGV[4] force: 1 ignores the cancellation deadline
    ARGV[5] time offset ms (tests only)
    ARGV[6] random number in [0, 1) (anti-scalper delay)
  Output: JSON {o = OK, id, now, rp, pat, rq, late} | {o = NOT_FOUND} |
          {o = INVALID_STATE, st} | {o = CANCEL_DEADLINE, deadline_ms}
          | {o = RECOVERING} while the partition is recovering (except the
          arbiter's forced "conflict" cancel: PostgreSQL already decided it,
          and rebuild needs the unit back for the booking that won)
]]
-- @include codes
-- @include bundle
-- @include records
-- @include outbox
-- @include giveBack

local id, acct, reason = ARGV[1], ARGV[2] or '', ARGV[3]
local rnd = tonumber(ARGV[6])
if not id or id == '' then return bad('booking id is required') end
if not reason or reason == '' or #reason > 64 then return bad('reason must be 1..64 bytes') end
if ARGV[4] ~= '0' and ARGV[4] ~= '1' then return bad('force must be 0 or 1') end
if rnd == nil or rnd < 0 or rnd >= 1 then return bad('random must be in [0, 1)') end
local now = server_now(ARGV[5])
local k = bundle()
if recovering(k) and not (ARGV[4] == '1' and reason == 'conflict') then
  return reply({o = RECOVERING, now = now})
end
local rec = get_rec(k.recs, id)
if rec == nil or (acct ~= '' and rec.acct ~= acct) then
  return reply({o = NOT_FOUND, now = now, what = 'booking'})
end
if rec.st == 'c' then
  return reply({o = OK, id = id, now = now, rp = 1, reason = rec.rsn, pat = rec.pat,
                rq = rec.rq or ''})
end
if rec.st ~= 'b' then
  local names = {h = 'held', x = 'expired', v = 'released', r = 'refund_due'}
  return reply({o = INVALID_STATE, now = now, st = names[rec.st] or rec.st})
end
local m = rcall('HMGET', k.meta, 'cancel_before_ms', 'starts_ms')
local before, starts = tonumber(m[1]) or 0, tonumber(m[2]) or 0
if ARGV[4] == '0' and before > 0 and starts > 0 and now > starts - before then
  return reply({o = CANCEL_DEADLINE, now = now, deadline_ms = starts - before})
end
-- A patient's late cancel (within a day of the visit) counts toward the
-- no-show policy; forced cancels (admin, HIS, 停诊) never do.
local late = (ARGV[4] == '0' and starts > 0 and now > starts - 86400000) and 1 or 0
end_record(k, rec, 'c', now, reason)
local ev = event_of('cancelled', rec, now, reason)
ev.late = late
outbox(k.outbox, ev)
give_back(k, settings(k), rec, now, rnd)
return reply(settled({o = OK, id = id, now = now, rp = 0, reason = reason, pat = rec.pat,
                      rq = rec.rq or '', late = late}))
