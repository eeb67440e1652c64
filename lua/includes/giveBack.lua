-- @include offer
-- @include units
-- Give a unit back: to the waitlist head if someone waits, else after the
-- anti-scalper delay (rnd in [0, 1) picks it within the window), else free.
local function give_back(k, cfg, rec, now, rnd)
  local unit = tostring(rec.unit)
  if rcall('HGET', k.units, unit) ~= rec.id then return 'gone' end
  rcall('HDEL', k.units, unit)
  local pool = pool_of(rec.sc)
  local public = pool == 0 or pools_returned(cfg, now)
  if public and offer(k, cfg, now, unit, rec.sc, rec.slot, rec.sid) then return 'offered' end
  if cfg.rerelease_ms > 0 and rnd ~= nil then
    local at = now + math.floor(rnd * cfg.rerelease_ms)
    rcall('ZADD', k.quar, at, unit .. ':' .. rec.slot .. ':' .. string.format('%d', rec.sc))
    return 'delayed'
  end
  rcall('ZADD', k.free, rec.sc, unit)
  return 'free'
end

-- Units whose anti-scalper delay has passed go to the waitlist or free (bounded).
local function requeue(k, cfg, now, limit)
  if cfg.rerelease_ms <= 0 and rcall('EXISTS', k.quar) == 0 then return 0 end
  local due = rcall('ZRANGEBYSCORE', k.quar, '-inf', now, 'LIMIT', 0, limit)
  for _, m in ipairs(due) do
    rcall('ZREM', k.quar, m)
    local unit, slot, sc = string.match(m, '^(%d+):([^:]+):(%d+)$')
    sc = tonumber(sc)
    local public = pool_of(sc) == 0 or pools_returned(cfg, now)
    if not (public and offer(k, cfg, now, unit, sc, slot, cfg.sid)) then
      rcall('ZADD', k.free, sc, unit)
    end
  end
  return #due
end
