#!lua flags=no-writes
--[[
  What one request of an account may do, in one read: whether its token was
  revoked (logout, an operator) and, if it names one, the patient ref of one
  of the account's bound patients from the binding mirror. Every account
  request reads it (a hold in the same batched pipelines as the decision),
  so a revocation or an unbind takes effect on every API worker at once.

  The account's hash holds the binding mirror (patient id -> ref, "" after
  an unbind; only verified bindings have a ref) and the revocations:
    "~all"    tokens of the account expiring at or before this (unix s)
    "~t:<id>" this one token (value: its expiry, unix s)
  Patient ids never start with "~".

  Input:
    KEYS[1] the account's hash  hy:pb:<account>
    ARGV[1] patient id, or "" (only the token)
    ARGV[2] token id
    ARGV[3] token expiry (unix s)
  Output: {revoked: 1 or 0, ref | "" (unbound) | nil (the mirror does not
          know it: ask PostgreSQL)}
]]
local pid, tid, exp = ARGV[1], ARGV[2], tonumber(ARGV[3])
if pid == nil or not tid or tid == '' or exp == nil then
  return redis.error_reply('ERR haoyuan: patient id, token id and expiry are required')
end
if string.sub(pid, 1, 1) == '~' then
  return redis.error_reply('ERR haoyuan: malformed patient id')
end
local got = redis.call('HMGET', KEYS[1], '~all', '~t:' .. tid, pid == '' and '~none' or pid)
local all = tonumber(got[1])
local revoked = (got[2] ~= false) or (all ~= nil and exp <= all)
return {revoked and 1 or 0, got[3]}
