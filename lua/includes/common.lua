-- Shared helpers, stitched into every script by the loader (engine/scripts.py).
-- Time is in milliseconds in every script; "now" is Redis server time plus a
-- test-only offset that the engine passes (0 in production).
local rcall = redis.call

-- Outcome codes, mirrored by engine.outcomes.Code.
local OK = 0
local NOT_OPEN = -1
local SOLD_OUT = -2
local SUSPENDED = -3
local DUPLICATE = -4
local RATE_LIMITED = -5
local EXPIRED = -6
local NOT_FOUND = -7
local INVALID_STATE = -8
local IDEMPOTENCY_MISMATCH = -9
local CLOSED = -10
local CANCEL_DEADLINE = -11
local BANNED = -12
local LIMIT_REACHED = -13
local WAITLIST_FULL = -14
local RECOVERING = -15

-- A session's free units sit in one sorted set with score
--   slot index * SLOT_BASE + pool * POOL_BASE + queue number,
-- so "lowest free unit of slot i in pool p" is one range query.
-- Pool 0 is the public pool (号源池: 0 public, 1 phone, 2 window, 3 referral).
local SLOT_BASE = 1000000
local POOL_BASE = 100000

local function server_now(offset)
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (tonumber(offset) or 0)
end

local function bad(msg)
  return redis.error_reply('ERR haoyuan: ' .. msg)
end

local function reply(tbl)
  return cjson.encode(tbl)
end

local function int_arg(v)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) then return nil end
  return n
end

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
local SETTINGS = {'status', 'cutoff_ms', 'waitlist_ttl_ms', 'rerelease_ms', 'pool_return_ms',
                  'hold_ttl_ms', 'fee'}
local function settings(k, ...)
  local s = rcall('HMGET', k.meta, 'status', 'cutoff_ms', 'waitlist_ttl_ms', 'rerelease_ms',
                  'pool_return_ms', 'hold_ttl_ms', 'fee', ...)
  local cfg = {status = s[1], cutoff_ms = tonumber(s[2]) or 0,
               waitlist_ttl_ms = tonumber(s[3]) or 0, rerelease_ms = tonumber(s[4]) or 0,
               pool_return_ms = tonumber(s[5]) or 0, hold_ttl_ms = tonumber(s[6]) or 600000,
               fee = tonumber(s[7]) or 0}
  local extra = {}
  for i = #SETTINGS + 1, #s do extra[#extra + 1] = s[i] end
  return cfg, extra
end

-- Records (holds and bookings share one id) live in the partition's record
-- hash as JSON. st: h held, b booked, x expired, v released, c cancelled,
-- r refund due (a payment that found no unit).
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

-- The outbox never trims itself: a MAXLEN here could drop an entry the
-- writer has not written yet. The writer trims each stream below the oldest
-- entry any consumer group still needs (engine.writer.OutboxWriter.trim).
local function outbox(stream_key, event)
  event.v = 1
  return rcall('XADD', stream_key, '*', 'e', cjson.encode(event))
end

local function event_of(kind, rec, now, reason)
  return {t = kind, id = rec.id, sid = rec.sid, slot = rec.slot, unit = rec.unit,
          pat = rec.pat, acct = rec.acct, fee = rec.fee, pay = rec.pay or '',
          at = now, rsn = reason or '', dl = rec.dl or 0}
end

local function next_id(k, now, sid)
  -- Ids start from server time x 1000, so a Redis that lost its data never
  -- reissues an id that PostgreSQL already holds.
  local n = rcall('INCR', k.seq)
  if n == 1 then
    n = now * 1000
    rcall('SET', k.seq, string.format('%d', n))
  end
  local part = string.match(k.seq, '{p(%d+)}')
  return string.format('%s.%s.%d', part, sid, n)
end

-- Take a free unit for a new hold of a patient: units hash, deadlines, rule, record.
local function make_hold(k, cfg, now, sid, slot, unit, score, pat, acct, ttl, extra)
  local id = next_id(k, now, sid)
  local dl = now + ttl
  rcall('HSET', k.units, tostring(unit), id)
  rcall('ZADD', k.dl, dl, id)
  rcall('ZADD', k.pdl, dl, id)
  rcall('HSET', k.rule, pat, id)
  local rec = {id = id, sid = sid, slot = slot, unit = tonumber(unit), sc = score, pat = pat,
               acct = acct, st = 'h', dl = dl, at = now, fee = cfg.fee}
  for f, v in pairs(extra or {}) do rec[f] = v end
  put_rec(k.recs, rec)
  return rec
end

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
    local sid = string.match(k.meta, ':s:(.+)$')
    if not (public and offer(k, cfg, now, unit, sc, slot, sid)) then
      rcall('ZADD', k.free, sc, unit)
    end
  end
  return #due
end
