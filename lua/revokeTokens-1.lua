#!lua
--[[
  Revoke an account's tokens (see readAccess): one token (logout), or every
  token expiring at or before a time (log out everywhere, an operator).
  Entries of tokens that have expired anyway are dropped on the way, so the
  hash stays small. Every-token bounds only grow, and a new one lies past
  the previous: a login right after a revocation gets a token expiring just
  past it (the API mints it so), and the next revocation must cover it.

  Input:
    KEYS[1] the account's hash  hy:pb:<account>
    ARGV[1] token id, or "" for every token
    ARGV[2] expiry (unix s): the token's, or the bound for every token
    ARGV[3] "restore" (optional): put back a recorded bound as it was (the
            larger of it and the present one; rebuild-bindings)
  Output: the bound written (unix s)
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
  if old ~= nil and old >= until_s then
    until_s = (ARGV[3] == 'restore') and old or old + 1
  end
  rcall('HSET', KEYS[1], '~all', until_s)
else
  rcall('HSET', KEYS[1], '~t:' .. tid, until_s)
end
return until_s
