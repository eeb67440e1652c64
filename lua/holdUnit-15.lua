#!lua
--[[
  Hold (锁号) the lowest free unit of a slot, from the pools the caller's
  channel may use, for one patient, for the session's payment window. Every
  hospital rule is checked inside this one atomic step, before the first
  write.

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua: meta, free,
                units, dl, wait, quar, recs, pdl, rule, outbox, seq, epoch)
    KEYS[13] idempotency key       hy:{p}:i:<account>:<key>
    KEYS[14] account rate key      hy:{p}:rl:a:<account>
    KEYS[15] patient rate key      hy:{p}:rl:p:<patient>
    ARGV[1]  session id
    ARGV[2]  slot id
    ARGV[3]  patient ref (keyed hash, never a raw ID number)
    ARGV[4]  account ref
    ARGV[5]  pools the channel may use, comma separated ("0" = public only)
    ARGV[6]  account GCRA interval ms (0 = off)   ARGV[7] account burst
    ARGV[8]  patient GCRA interval ms (0 = off)   ARGV[9] patient burst
    ARGV[10] idempotency TTL ms
    ARGV[11] reclaim limit (expired holds and delayed units returned on the way)
    ARGV[12] time offset ms (tests only; 0 in production)
    ARGV[13] 1 = remember refusals under the idempotency key too (the
             client sent its own key), 0 = remember only a hold
    ARGV[14] random number in [0, 1) (anti-scalper delay of reclaimed units)
    ARGV[15] request id (kept on the record: the patient-wide reservation)
    ARGV[16] arrival ms: when the caller received the request, in its
             estimate of this server's time (0 = now). A request that arrived
             before the release instant is NOT_OPEN however late it is
             decided: pressing early gains nothing. (Clamped to now.)
  Output: JSON {o = OK, id, sid, slot, unit, dl, now} or a refusal
          {o = code, now, ...}; a replay carries rp = 1. RECOVERING (the
          partition's marker is gone), PAUSED, RATE_LIMITED and NOT_OPEN say
          "come back later" and are never remembered under the idempotency key.
]]
-- @include codes
-- @include answers
-- @include bundle
-- @include records
-- @include units
-- @include makeHold
-- @include gcra
-- @include reclaim
-- @include window

local sid, slot, pat, acct = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local a_int, a_burst = int_arg(ARGV[6]), int_arg(ARGV[7])
local p_int, p_burst = int_arg(ARGV[8]), int_arg(ARGV[9])
local idem_ttl, reclaim_limit = int_arg(ARGV[10]), int_arg(ARGV[11])
local rnd = tonumber(ARGV[14])
local arrived = int_arg(ARGV[16] or '0')
if not sid or sid == '' or not slot or slot == '' then return bad('session and slot are required') end
if not pat or pat == '' or not acct or acct == '' or string.find(pat, '|', 1, true)
   or string.find(acct, '|', 1, true) then
  return bad('patient and account are required (no "|")')
end
if not string.match(ARGV[5] or '', '^[0-3][0-3,]*$') then return bad('pools must be like 0,3') end
if a_int == nil or a_burst == nil or p_int == nil or p_burst == nil
   or idem_ttl == nil or reclaim_limit == nil or a_burst < 1 or p_burst < 1 or idem_ttl < 1
   or reclaim_limit < 0 or a_int < 0 or p_int < 0 or (ARGV[13] ~= '0' and ARGV[13] ~= '1')
   or rnd == nil or rnd < 0 or rnd >= 1 or arrived == nil or arrived < 0 then
  return bad('numeric arguments are malformed')
end
local now = server_now(ARGV[12])
if arrived == 0 or arrived > now then arrived = now end
local fingerprint = sid .. '|' .. slot .. '|' .. pat

-- 1. Idempotency: a retry returns the first answer and changes nothing.
local replay = stored_answer(KEYS[13], fingerprint, now)
if replay then return replay end
local remember_refusals = ARGV[13] == '1'
local function remember(tbl)
  local body = reply(tbl)
  if tbl.o == OK or remember_refusals then
    store_answer(KEYS[13], fingerprint, body, idem_ttl)
  end
  -- Settlements (this hold, holds reclaimed and units offered on the way)
  -- go to this caller only, never into the stored answer.
  if #SETTLE > 0 then body = reply(settled(tbl)) end
  return body
end

-- 2. Nothing sells while the partition is recovering (its marker is gone):
--    a "come back later" answer, never remembered under the key.
local k = bundle()
if recovering(k) then return reply({o = RECOVERING, now = now}) end

-- 3. Rate limits (GCRA), account and patient, checked before any write.
local a_retry, a_tat = gcra_check(KEYS[14], now, a_int, a_burst)
local p_retry, p_tat = gcra_check(KEYS[15], now, p_int, p_burst)
if a_retry > 0 or p_retry > 0 then
  return reply({o = RATE_LIMITED, now = now, retry_ms = math.max(a_retry, p_retry),
                who = (a_retry >= p_retry) and 'account' or 'patient'})
end
gcra_commit(KEYS[14], now, a_tat)
gcra_commit(KEYS[15], now, p_tat)

-- 4. The session and its window: release instant, cut-off, night closure.
local cfg, x = settings(k, 'release_ms', 'i:' .. slot, 'night_from_min', 'night_to_min', 'tz_min')
if cfg.status == false then return remember({o = NOT_FOUND, now = now, what = 'session'}) end
if x[2] == false then return remember({o = NOT_FOUND, now = now, what = 'slot'}) end
-- Paused (暂停放号) says "come back later": never remembered under the key.
if cfg.status == 'paused' then return reply({o = PAUSED, now = now}) end
if cfg.status ~= 'open' then return remember({o = SUSPENDED, now = now}) end
local release_ms, cutoff_ms = tonumber(x[1]), cfg.cutoff_ms
if arrived < release_ms then
  return reply({o = NOT_OPEN, now = now, release_ms = release_ms})
end
if cutoff_ms > 0 and now >= cutoff_ms then
  return remember({o = CLOSED, now = now, cutoff_ms = cutoff_ms})
end
local opens = night_reopens(now, tonumber(x[3]) or 0, tonumber(x[4]) or 0, tonumber(x[5]))
if opens then return reply({o = NOT_OPEN, now = now, release_ms = opens, night = 1}) end

-- 5. Expired holds and delayed units of this session go back first (bounded):
--    to the waitlist head if someone waits, never to this grabber first.
reclaim(k, cfg, now, reclaim_limit, rnd)
requeue(k, cfg, now, reclaim_limit)

-- 6. One active hold or booking per patient per department-day (or doctor-day).
local prior = rcall('HGET', k.rule, pat)
if prior and is_active(k.recs, prior, now) then
  return remember({o = DUPLICATE, now = now, existing = prior})
end

-- 7. The lowest free queue number of the slot in the channel's pools (all
--    pools once the pools have returned to the public).
local pools = ALL_POOLS
if not pools_returned(cfg, now) then
  pools = {}
  for p in string.gmatch(ARGV[5], '%d') do pools[#pools + 1] = tonumber(p) end
end
local unit, score = lowest_free(k.free, tonumber(x[2]), pools)
if unit == nil then return remember({o = SOLD_OUT, now = now}) end

rcall('ZREM', k.free, unit)
-- The first instant the session had no free unit left (statistics: time to sold out).
if rcall('ZCARD', k.free) == 0 then rcall('HSETNX', k.meta, 'soldout_ms', now) end
local rec = make_hold(k, cfg, now, sid, slot, unit, score, pat, acct, cfg.hold_ttl_ms,
                      {rq = ARGV[15] or ''})
return remember({o = OK, id = rec.id, sid = sid, slot = slot, unit = rec.unit, dl = rec.dl,
                 now = now})
