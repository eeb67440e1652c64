#!lua
--[[
  Revoke an account's tokens (see readAccess): one token (logout), or every
  token expiring at or before a time (log out everywhere, an operator).
  Entries of tokens that have expired anyway are dropped on the way, so the
  hash stays small.

  Input:
    KEYS[1] the account's hash  hy:pb:<account>
    ARGV[1] token id, or "" for every token
    ARGV[2] expiry (unix s): the token's, or the bound for every token
  Output: 1
]]
local rcall = redis.call
local tid, until_s = ARGV[1], tonumber(ARGV[2])
if tid == nil or until_s == nil or until_s ~= math.floor(until_s) or until_s < 0 then
  return redis.error_reply('ERR haoyuan: token id and expiry are required')
end
if string.find(tid, '[^A-Za-z0-9_-]') then
  return redis.error_reply('ERR haoyuan: malformed token id')
end
local now = tonumber(rcall('TIME')[1])
local flat = rcall('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local f = flat[i]
  if (f == '~all' or string.sub(f, 1, 3) == '~t:') and (tonumber(flat[i + 1]) or 0) < now then
    rcall('HDEL', KEYS[1], f)
  end
end
if tid == '' then
  local old = tonumber(rcall('HGET', KEYS[1], '~all'))
  if old == nil or old < until_s then rcall('HSET', KEYS[1], '~all', until_s) end
else
  rcall('HSET', KEYS[1], '~t:' .. tid, until_s)
end
return 1
