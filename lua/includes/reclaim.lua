-- @include records
-- @include giveBack
-- @include outbox
-- Reclaim expired holds of one session: each goes back once (to the
-- waitlist head, after the anti-scalper delay, or free).
local function expire_one(k, cfg, id, now, rnd)
  local rec = get_rec(k.recs, id)
  if rec == nil or rec.st ~= 'h' then
    rcall('ZREM', k.dl, id)
    rcall('ZREM', k.pdl, id)
    return 0
  end
  end_record(k, rec, 'x', now)
  -- A waitlist offer nobody paid for: its patient is told it passed on.
  if rec.wl == 1 then outbox(k.outbox, event_of('offer_lapsed', rec, now, 'expired')) end
  give_back(k, cfg, rec, now, rnd)
  return 1
end

local function reclaim(k, cfg, now, limit, rnd)
  if limit <= 0 then return 0 end
  local ids = rcall('ZRANGEBYSCORE', k.dl, '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, id in ipairs(ids) do n = n + expire_one(k, cfg, id, now, rnd) end
  return n
end
