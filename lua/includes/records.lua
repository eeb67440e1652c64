-- @include reply
-- Records (holds and bookings share one id) live in the partition's record
-- hash as JSON. st: h held, b booked, x expired, v released, c cancelled,
-- r refund due (a payment that found no unit).

-- The patient-wide count (hospital-wide active holds and bookings) lives on
-- each patient's own partition, which no session script may touch (another
-- hash slot). So every step that starts or ends a record notes here what the
-- count must become, {patient, member, active until ms (0 = drop)}, and the
-- reply carries it (`settle`); the engine applies it (settlePatient). The
-- member is the hold's request id (rq: what the engine reserved) or, for a
-- waitlist offer, the record id.
local SETTLE = {}
local function member_of(rec)
  if rec.rq and rec.rq ~= '' then return rec.rq end
  return rec.id
end
local function note_settle(rec, until_ms)
  SETTLE[#SETTLE + 1] = {rec.pat, member_of(rec), until_ms}
end
-- The reply table with the settlements noted so far (if any: Lua's JSON
-- would write an empty table as {}).
local function settled(tbl)
  if #SETTLE > 0 then tbl.settle = SETTLE end
  return tbl
end
local function get_rec(recs_key, id)
  local raw = rcall('HGET', recs_key, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_rec(recs_key, rec)
  rcall('HSET', recs_key, rec.id, cjson.encode(rec))
end

local function is_active(recs_key, id, now)
  local r = get_rec(recs_key, id)
  return r ~= nil and (r.st == 'b' or (r.st == 'h' and r.dl > now))
end

-- Drop the patient's per-day rule entry only if it still points at this id.
local function drop_rule(rule_key, rec)
  if rcall('HGET', rule_key, rec.pat) == rec.id then
    rcall('HDEL', rule_key, rec.pat)
  end
end

-- End a record: its deadlines go, its state, end time and reason are set,
-- and the patient's per-day rule entry is dropped if it still points at it.
-- The unit is the caller's business (give it back, or keep it booked).
local function end_record(k, rec, state, now, reason)
  rcall('ZREM', k.dl, rec.id)
  rcall('ZREM', k.pdl, rec.id)
  rec.st = state
  rec.ended = now
  if reason ~= nil then rec.rsn = reason end
  put_rec(k.recs, rec)
  drop_rule(k.rule, rec)
  note_settle(rec, 0)
end
