-- @include reply
-- A session's free units sit in one sorted set with score
--   slot index * SLOT_BASE + pool * POOL_BASE + queue number,
-- so "lowest free unit of slot i in pool p" is one range query.
-- Pool 0 is the public pool (号源池: 0 public, 1 phone, 2 window, 3 referral).
local SLOT_BASE = 1000000
local POOL_BASE = 100000

local function pool_of(score)
  return math.floor((score % SLOT_BASE) / POOL_BASE)
end

-- Whether the session's channel pools have returned to the public pool.
local function pools_returned(cfg, now)
  return cfg.pool_return_ms > 0 and now >= cfg.pool_return_ms
end

local ALL_POOLS = {0, 1, 2, 3}

-- The lowest free queue number of slot `idx` among `pools` (pool indices).
-- Scores order by pool first, so each pool gives its lowest and the lowest
-- number wins. Returns the unit (a string) and its score, or nil.
local function lowest_free(free_key, idx, pools)
  local unit, score = nil, nil
  for _, p in ipairs(pools) do
    local lo = idx * SLOT_BASE + p * POOL_BASE
    local got = rcall('ZRANGEBYSCORE', free_key, lo, lo + POOL_BASE - 1,
                      'WITHSCORES', 'LIMIT', 0, 1)
    if #got > 0 and (unit == nil or tonumber(got[1]) < tonumber(unit)) then
      unit, score = got[1], tonumber(got[2])
    end
  end
  return unit, score
end
