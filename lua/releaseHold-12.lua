#!lua
--[[
  Release a hold: the patient backs out before paying; the unit goes back
  once (to the waitlist head, after the anti-scalper delay, or free).
  Idempotent: releasing an ended hold answers as before.

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] hold id
    ARGV[2] account ref ('' = any: admin and sweeper)
    ARGV[3] time offset ms (tests only)
    ARGV[4] random number in [0, 1) (anti-scalper delay)
  Output: JSON {o = OK, id, now, rp, pat, rq} | {o = NOT_FOUND} | {o = INVALID_STATE, st}
          | {o = RECOVERING} while the partition is recovering
]]
-- @include codes
-- @include bundle
-- @include records
-- @include giveBack

local id, acct = ARGV[1], ARGV[2] or ''
local rnd = tonumber(ARGV[4])
if not id or id == '' then return bad('hold id is required') end
if rnd == nil or rnd < 0 or rnd >= 1 then return bad('random must be in [0, 1)') end
local now = server_now(ARGV[3])
local k = bundle()
if recovering(k) then return reply({o = RECOVERING, now = now}) end
local rec = get_rec(k.recs, id)
if rec == nil or (acct ~= '' and rec.acct ~= acct) then
  return reply({o = NOT_FOUND, now = now, what = 'hold'})
end
if rec.st == 'x' or rec.st == 'v' then
  return reply({o = OK, id = id, now = now, rp = 1, pat = rec.pat, rq = rec.rq or ''})
end
if rec.st ~= 'h' then
  local names = {b = 'booked', c = 'cancelled', r = 'refund_due'}
  return reply({o = INVALID_STATE, now = now, st = names[rec.st] or rec.st})
end
end_record(k, rec, 'v', now)
give_back(k, settings(k), rec, now, rnd)
return reply(settled({o = OK, id = id, now = now, rp = 0, pat = rec.pat, rq = rec.rq or ''}))
