-- @include reply
-- GCRA rate limit (generic cell rate algorithm), milliseconds.
-- interval: ms between requests at the sustained rate; burst: requests
-- allowed at once. Returns retry_after_ms (0 = allowed) and the new TAT.
local function gcra_check(key, now, interval, burst)
  if interval <= 0 then return 0, nil end
  local tat = tonumber(rcall('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  if now < allow_at then return allow_at - now, nil end
  return 0, new_tat
end

local function gcra_commit(key, now, new_tat)
  if new_tat == nil then return end
  rcall('SET', key, string.format('%d', new_tat), 'PX', math.max(1, new_tat - now))
end
