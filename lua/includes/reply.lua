-- What every script needs: the server clock, argument checks, the reply.
-- Time is in milliseconds in every script; "now" is Redis server time plus a
-- test-only offset that the engine passes (0 in production).
local rcall = redis.call

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
