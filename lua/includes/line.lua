-- @include reply
-- The waiting room's line: `issued` positions so far, `served` up to which
-- they are admitted, as of `at` (ms). Served advances with time at `rate` a
-- second and never passes issued: an empty line banks no capacity.
local function line_now(key, now, rate)
  local v = rcall('HMGET', key, 'issued', 'served', 'at')
  local issued = tonumber(v[1]) or 0
  local served = tonumber(v[2]) or 0
  local at = tonumber(v[3]) or now
  if now > at then served = served + rate * (now - at) / 1000 end
  if served > issued then served = issued end
  return issued, math.floor(served * 1000) / 1000
end

local function line_save(key, issued, served, now)
  rcall('HSET', key, 'issued', issued, 'served', served, 'at', now)
end
