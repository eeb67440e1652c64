-- @include makeHold
-- @include outbox
-- 候补: offer a returned public unit to the first waiting patient, as a hold
-- with its own payment window (never past the cut-off), with an outbox event
-- to notify them. Waiters who meanwhile hold or booked that day are skipped.
local function offer(k, cfg, now, unit, score, slot, sid)
  if cfg.waitlist_ttl_ms <= 0 or cfg.status ~= 'open' then return false end
  if cfg.cutoff_ms > 0 and now >= cfg.cutoff_ms then
    rcall('DEL', k.wait)  -- the waitlist is cleared at the cut-off
    return false
  end
  local ttl = cfg.waitlist_ttl_ms
  if cfg.cutoff_ms > 0 then ttl = math.min(ttl, cfg.cutoff_ms - now) end
  for _ = 1, 8 do
    local head = rcall('ZRANGE', k.wait, 0, 0)
    if #head == 0 then return false end
    rcall('ZREM', k.wait, head[1])
    local bar = string.find(head[1], '|', 1, true)
    local pat, acct = string.sub(head[1], 1, bar - 1), string.sub(head[1], bar + 1)
    local prior = rcall('HGET', k.rule, pat)
    if not (prior and is_active(k.recs, prior, now)) then
      local rec = make_hold(k, cfg, now, sid, slot, unit, score, pat, acct, ttl, {wl = 1})
      outbox(k.outbox, event_of('waitlist_offer', rec, now, 'waitlist'))
      return true
    end
  end
  return false
end
