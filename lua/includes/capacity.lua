-- @include reply
-- @include units
-- Set one slot's capacity. Raising adds units with fresh queue numbers
-- (加号), to the pools in `pools` ({count per pool index}) for a new slot,
-- else to the public pool; lowering removes only free units, highest first,
-- so a held or booked unit is never taken away. Returns the capacity applied.
local function set_capacity(sess_key, free_key, slot_id, idx, target, pools)
  local cur = tonumber(rcall('HGET', sess_key, 'c:' .. slot_id)) or 0
  local lo = idx * SLOT_BASE
  local hi = lo + SLOT_BASE - 1
  if target > cur then
    local plan = {}
    if cur == 0 and pools then
      local rest = target
      for p = 1, 3 do
        local n = math.min(tonumber(pools[tostring(p)]) or 0, rest)
        plan[p] = n
        rest = rest - n
      end
      plan[0] = rest
    else
      plan[0] = target - cur
    end
    for p = 0, 3 do
      for _ = 1, (plan[p] or 0) do
        local no = rcall('HINCRBY', sess_key, 'nextno', 1)
        rcall('ZADD', free_key, lo + p * POOL_BASE + no, tostring(no))
      end
    end
    cur = target
  elseif target < cur then
    local drop = rcall('ZREVRANGEBYSCORE', free_key, hi, lo, 'LIMIT', 0, cur - target)
    for _, no in ipairs(drop) do rcall('ZREM', free_key, no) end
    cur = cur - #drop
  end
  rcall('HSET', sess_key, 'c:' .. slot_id, cur)
  return cur
end
