#!lua
--[[
  A place in the waiting room's line (排队): the release-morning queue that
  forms when more patients press than the engine can serve. Positions are
  issued in order; the line is served at `rate` positions a second, counted
  by time, so an abandoned ticket never jams it (its turn passes); a patient
  has one place at a time (asking again returns it, until its turn and its
  window have passed). When nobody waits, the line stays empty.

  Time is in milliseconds in this script.

  Input:
    KEYS[1] the line      hy:{wr}:line  (hash: issued, served, at)
    KEYS[2] its places    hy:{wr}:acct  (hash: account -> "<position>:<due ms>")
    ARGV[1] account ref (no "|")
    ARGV[2] rate, positions served per second (> 0)
    ARGV[3] window ms: how long an admitted place stays honoured after its
            turn came (> 0)
    ARGV[4] time offset ms (tests only; 0 in production)
  Output: JSON {pos, due, served, issued, now, new = 0|1}: the caller's
          position and when its turn comes (due, ms), the line's served
          position and issued count at `now`, and whether the place is new
]]
-- @include line

local acct = ARGV[1]
local rate, window = tonumber(ARGV[2]), int_arg(ARGV[3])
if not acct or acct == '' or string.find(acct, '|', 1, true) then
  return bad('account is required (no "|")')
end
if rate == nil or rate <= 0 or window == nil or window < 1 then
  return bad('rate and window must be positive')
end
local now = server_now(ARGV[4])
local issued, served = line_now(KEYS[1], now, rate)
-- Everyone was admitted long ago: the places are forgotten.
if served >= issued and rcall('HLEN', KEYS[2]) > 0
   and now - (tonumber(rcall('HGET', KEYS[1], 'at')) or now) > window then
  rcall('DEL', KEYS[2])
end
local place = rcall('HGET', KEYS[2], acct)
if place then
  local pos, due = string.match(place, '^(%d+):(%d+)$')
  pos, due = tonumber(pos), tonumber(due)
  if pos and due and now <= due + window then  -- waiting, or admitted and honoured
    line_save(KEYS[1], issued, served, now)
    return reply({pos = pos, due = due, served = served, issued = issued, now = now, new = 0})
  end
end
issued = issued + 1
local due = now + math.ceil(1000 * (issued - served) / rate)
line_save(KEYS[1], issued, served, now)
rcall('HSET', KEYS[2], acct, issued .. ':' .. due)
rcall('PEXPIRE', KEYS[2], due - now + window)
return reply({pos = issued, due = due, served = served, issued = issued, now = now, new = 1})
