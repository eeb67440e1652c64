#!lua
--[[
  Write one entry of an account's binding mirror (see readBinding).

  Input:
    KEYS[1] binding mirror of the account  hy:pb:<account>  (hash)
    ARGV[1] patient id (the API's binding id)
    ARGV[2] the patient ref, or "" for a tombstone (the binding is gone)
    ARGV[3] "set": always (bind, unbind); "fill": only if the mirror has no
            entry for it yet (filled from PostgreSQL after a miss; never
            overwrites a tombstone that an unbind wrote meanwhile);
            "drop": forget the entry unless it is a tombstone (the binding
            is no longer verified; ARGV[2] is ignored)
  Output: 1 written, 0 left as it was.
]]
local pid, ref, mode = ARGV[1], ARGV[2], ARGV[3]
if not pid or pid == '' or ref == nil then
  return redis.error_reply('ERR haoyuan: patient id and ref are required')
end
if string.sub(pid, 1, 1) == '~' then
  return redis.error_reply('ERR haoyuan: malformed patient id')
end
if string.find(ref, '|', 1, true) then
  return redis.error_reply('ERR haoyuan: ref must not contain "|"')
end
if mode == 'set' then
  redis.call('HSET', KEYS[1], pid, ref)
  return 1
elseif mode == 'fill' then
  if ref == '' then return redis.error_reply('ERR haoyuan: fill needs a ref') end
  return redis.call('HSETNX', KEYS[1], pid, ref)
elseif mode == 'drop' then
  local old = redis.call('HGET', KEYS[1], pid)
  if old == false or old == '' then return 0 end
  return redis.call('HDEL', KEYS[1], pid)
end
return redis.error_reply('ERR haoyuan: mode must be set, fill or drop')
