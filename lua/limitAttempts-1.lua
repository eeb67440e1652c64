#!lua
--[[
  A limit per client address on what should be rare: failed admin or login
  attempts, new accounts. GCRA: `burst` at once, then one per `interval`.
  "peek" asks whether one more would be allowed (nothing written: checked
  before the credentials, so a blocked address learns nothing); "take"
  counts one if allowed.

  Time is in milliseconds in this script.

  Input:
    KEYS[1] the limiter  hy:lim:<kind>:<client hash>
    ARGV[1] "peek" | "take"
    ARGV[2] interval ms (> 0)
    ARGV[3] burst (>= 1)
  Output: retry after ms; 0 = allowed (and, for "take", counted)
]]
-- @include codes
-- @include gcra

local mode, interval, burst = ARGV[1], int_arg(ARGV[2]), int_arg(ARGV[3])
if mode ~= 'peek' and mode ~= 'take' then return bad('mode must be peek or take') end
if interval == nil or interval < 1 or burst == nil or burst < 1 then
  return bad('interval and burst must be positive integers')
end
local now = server_now(0)
local wait, new_tat = gcra_check(KEYS[1], now, interval, burst)
if wait > 0 then return wait end
if mode == 'take' then gcra_commit(KEYS[1], now, new_tat) end
return 0
