#!lua
--[[
  Reclaim expired holds of one session and release units whose anti-scalper
  delay has passed (the sweeper's step; hold scripts also do a few on the
  way). No keyspace notifications: deadlines sit in sorted sets. Past the
  cut-off the waitlist is cleared with a "waitlist_closed" event per waiter.

  Input:
    KEYS[1..12] the session key bundle (includes/bundle.lua)
    ARGV[1] most holds to reclaim in this call (1..1000)
    ARGV[2] time offset ms (tests only)
    ARGV[3] random number in [0, 1) (anti-scalper delay)
  Output: JSON {o = OK, expired, requeued, closed, more, now} | {o = RECOVERING, ...zeros}
]]
-- @include codes
-- @include bundle
-- @include outbox
-- @include reclaim

local limit = int_arg(ARGV[1])
local rnd = tonumber(ARGV[3])
if limit == nil or limit < 1 or limit > 1000 then return bad('limit must be 1..1000') end
if rnd == nil or rnd < 0 or rnd >= 1 then return bad('random must be in [0, 1)') end
local now = server_now(ARGV[2])
local k = bundle()
if recovering(k) then
  return reply({o = RECOVERING, expired = 0, requeued = 0, closed = 0, more = 0, now = now})
end
local cfg = settings(k)
local closed = 0
if cfg.cutoff_ms > 0 and now >= cfg.cutoff_ms then
  local sid = rcall('HGET', k.meta, 'sid')
  for _, w in ipairs(rcall('ZRANGE', k.wait, 0, limit - 1)) do
    local bar = string.find(w, '|', 1, true)
    local pat = string.sub(w, 1, bar - 1)
    rcall('ZREM', k.wait, w)
    outbox(k.outbox, {t = 'waitlist_closed', id = sid .. ':' .. pat, sid = sid, slot = '',
                      unit = 0, pat = pat, acct = string.sub(w, bar + 1), at = now,
                      rsn = 'cutoff'})
    closed = closed + 1
  end
end
local n = reclaim(k, cfg, now, limit, rnd)
local q = requeue(k, cfg, now, limit)
local more = rcall('ZCOUNT', k.dl, '-inf', now) + rcall('ZCOUNT', k.quar, '-inf', now)
return reply(settled({o = OK, expired = n, requeued = q, closed = closed, more = more,
                      now = now}))
