#!lua flags=no-writes
--[[
  The waiting room's line as it stands now (read only): what a worker needs
  to admit tickets without a Redis call each (see takeTicket-2.lua).

  Time is in milliseconds in this script.

  Input:
    KEYS[1] the line  hy:{wr}:line
    ARGV[1] rate, positions served per second (> 0)
  Output: JSON {served, issued, now}
]]
-- @include line

local rate = tonumber(ARGV[1])
if rate == nil or rate <= 0 then return bad('rate must be positive') end
local now = server_now(0)
local issued, served = line_now(KEYS[1], now, rate)
return reply({served = served, issued = issued, now = now})
