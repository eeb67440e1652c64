-- @include ids
-- @include records
-- Take a free unit for a new hold of a patient: units hash, deadlines, rule, record.
local function make_hold(k, cfg, now, sid, slot, unit, score, pat, acct, ttl, extra)
  local id = next_id(k, now, cfg.part, sid)
  local dl = now + ttl
  rcall('HSET', k.units, tostring(unit), id)
  rcall('ZADD', k.dl, dl, id)
  rcall('ZADD', k.pdl, dl, id)
  rcall('HSET', k.rule, pat, id)
  local rec = {id = id, sid = sid, slot = slot, unit = tonumber(unit), sc = score, pat = pat,
               acct = acct, st = 'h', dl = dl, at = now, fee = cfg.fee}
  for f, v in pairs(extra or {}) do rec[f] = v end
  put_rec(k.recs, rec)
  note_settle(rec, dl + 1000)  -- a hold counts until its deadline
  return rec
end
