#!lua
--[[
  Put a booking that PostgreSQL holds back into Redis (rebuild after Redis
  lost data, or compensation after a write conflict): the same unit, never
  another. No outbox event: the booking is already recorded.
  Redis may have lost only the tail of the story (a crash of AOF everysec, a
  failover to a lagging replica): the unit may still be held by this very
  hold (its confirmation lost), which then becomes the booking; or held by
  another hold that PostgreSQL never saw paid, which PostgreSQL outranks: that
  hold ends (state x, reason "displaced") and the unit goes to the booking.
  A unit booked by another booking is a conflict: INVALID_STATE.
  Redis may also know more than PostgreSQL: a record Redis holds as
  cancelled, refunded or displaced is newer than a "booked" row whose later
  events have not reached PostgreSQL yet; it is never turned back into a
  booking (restored = 0, ended = its state).

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] booking JSON {id, sid, slot, unit, pat, acct, fee, pay, bt}
    ARGV[2] time offset ms (tests only)
  Output: JSON {o = OK, restored = 0|1, ended?} | {o = INVALID_STATE, holder}
          (the unit is booked by another record) | {o = NOT_FOUND, what}
]]
-- @include codes
-- @include bundle
-- @include records
-- @include units

local okj, b = pcall(cjson.decode, ARGV[1] or '')
if not okj or type(b) ~= 'table' or type(b.id) ~= 'string' or type(b.slot) ~= 'string'
   or int_arg(b.unit) == nil or type(b.pat) ~= 'string' or type(b.acct) ~= 'string' then
  return bad('booking JSON must carry id, slot, unit, pat and acct')
end
local now = server_now(ARGV[2])
local k = bundle()
local own = get_rec(k.recs, b.id)
if own and (own.st == 'c' or own.st == 'r' or (own.st == 'x' and own.rsn == 'displaced')) then
  return reply({o = OK, now = now, restored = 0, ended = own.st})
end
local idx = tonumber(rcall('HGET', k.meta, 'i:' .. b.slot))
if idx == nil then return reply({o = NOT_FOUND, now = now, what = 'slot'}) end
local unit = tostring(b.unit)
local holder = rcall('HGET', k.units, unit)
local score, cur = nil, nil
if holder then
  cur = get_rec(k.recs, holder)
  if holder == b.id and cur and cur.st == 'b' then
    return reply({o = OK, now = now, restored = 0})
  end
  if holder ~= b.id and not (cur and cur.st == 'h') then
    return reply({o = INVALID_STATE, now = now, holder = holder})
  end
  if cur == nil or math.floor(tonumber(cur.sc) / SLOT_BASE) ~= idx then
    return reply({o = NOT_FOUND, now = now, what = 'unit'})
  end
  score = tonumber(cur.sc)
  if holder ~= b.id then
    end_record(k, cur, 'x', now, 'displaced')
  else  -- its own hold, whose confirmation Redis lost: it becomes the booking
    rcall('ZREM', k.dl, holder)
    rcall('ZREM', k.pdl, holder)
  end
else
  score = rcall('ZSCORE', k.free, unit)
  if not score or math.floor(tonumber(score) / SLOT_BASE) ~= idx then
    return reply({o = NOT_FOUND, now = now, what = 'unit'})
  end
  score = tonumber(score)
  rcall('ZREM', k.free, unit)
end
rcall('HSET', k.units, unit, b.id)
rcall('HSET', k.rule, b.pat, b.id)
-- (JSON null decodes to cjson.null, which Lua counts as true: check types.)
local bt = type(b.bt) == 'number' and b.bt or now
local restored = {id = b.id, sid = b.sid, slot = b.slot, unit = b.unit, sc = score,
                  pat = b.pat, acct = b.acct, st = 'b', dl = 0, at = bt, bt = bt,
                  fee = type(b.fee) == 'number' and b.fee or 0,
                  pay = type(b.pay) == 'string' and b.pay or '', restored = 1}
if holder == b.id and cur ~= nil then restored.rq = cur.rq end  -- what the engine reserved
put_rec(k.recs, restored)
-- The booking counts hospital-wide again (Redis may have lost that count too).
local starts = tonumber(rcall('HGET', k.meta, 'starts_ms')) or 0
note_settle(restored, starts > 0 and starts + 86400000 or now + 30 * 86400000)
-- Keep new ids above every id PostgreSQL has seen.
local seq = tonumber(string.match(b.id, '%.(%d+)$'))
if seq and (tonumber(rcall('GET', k.seq)) or 0) < seq then
  rcall('SET', k.seq, string.format('%d', seq))
end
return reply(settled({o = OK, now = now, restored = 1}))
