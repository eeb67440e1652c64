-- @include reply
-- The session key bundle: every mutating session script takes these twelve
-- KEYS first, in this order (engine.keys.SessionKeys.bundle builds them).
--   1 meta  hy:{p}:s:<sid>      session hash
--   2 free  hy:{p}:f:<sid>      free units (zset, score as above)
--   3 units hy:{p}:u:<sid>      units in use: unit -> hold/booking id
--   4 dl    hy:{p}:x:<sid>      hold deadlines of the session
--   5 wait  hy:{p}:w:<sid>      waitlist (候补): "patient|account" by join order
--   6 quar  hy:{p}:q:<sid>      returned units waiting out the anti-scalper delay
--   7 recs  hy:{p}:recs         records of the partition (JSON by id)
--   8 pdl   hy:{p}:deadlines    hold deadlines of the partition (the sweeper's list)
--   9 rule  hy:{p}:r:...        patient -> active id, per department-day or doctor-day
--  10 outbox hy:{p}:outbox      the partition's outbox stream
--  11 seq   hy:{p}:seq          id sequence
--  12 epoch hy:{p}:epoch        the partition's recovery marker (see below)
local function bundle()
  return {meta = KEYS[1], free = KEYS[2], units = KEYS[3], dl = KEYS[4], wait = KEYS[5],
          quar = KEYS[6], recs = KEYS[7], pdl = KEYS[8], rule = KEYS[9], outbox = KEYS[10],
          seq = KEYS[11], epoch = KEYS[12]}
end

-- The recovery marker: present while Redis's state of the partition is whole.
-- Redis loses it with its data (a wipe); `haoyuan rebuild` deletes it while
-- it rebuilds and sets it again when done, and the writer deletes it when it
-- finds that Redis lost writes PostgreSQL had seen (a lost AOF tail, a
-- failover to a lagging replica). While it is absent every decision that
-- sells or changes a record answers RECOVERING and changes nothing.
local function recovering(k)
  return rcall('EXISTS', k.epoch) == 0
end

-- The session's settings that returns and offers depend on, read in one
-- HMGET with any extra fields a script needs (returned after the table).
-- sid and part (the partition) name new records: no script parses a key.
local SETTINGS = {'status', 'cutoff_ms', 'waitlist_ttl_ms', 'rerelease_ms', 'pool_return_ms',
                  'hold_ttl_ms', 'fee', 'sid', 'part'}
local function settings(k, ...)
  local s = rcall('HMGET', k.meta, 'status', 'cutoff_ms', 'waitlist_ttl_ms', 'rerelease_ms',
                  'pool_return_ms', 'hold_ttl_ms', 'fee', 'sid', 'part', ...)
  local cfg = {status = s[1], cutoff_ms = tonumber(s[2]) or 0,
               waitlist_ttl_ms = tonumber(s[3]) or 0, rerelease_ms = tonumber(s[4]) or 0,
               pool_return_ms = tonumber(s[5]) or 0, hold_ttl_ms = tonumber(s[6]) or 600000,
               fee = tonumber(s[7]) or 0, sid = s[8], part = s[9]}
  local extra = {}
  for i = #SETTINGS + 1, #s do extra[#extra + 1] = s[i] end
  return cfg, extra
end
