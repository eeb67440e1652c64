#!lua flags=no-writes
--[[
  The engine's patient ref of one of an account's bound patients, from the
  binding mirror (PostgreSQL is the truth; the API writes the mirror when a
  patient is bound or unbound). Read-only; a script only so that it rides in
  the engine's batched pipelines with the holds, instead of costing a
  PostgreSQL query per hold on release morning.

  Input:
    KEYS[1] binding mirror of the account  hy:pb:<account>  (hash)
    ARGV[1] patient id (the API's binding id)
  Output: the ref; "" when the binding is known to be gone (tombstone);
          nil when the mirror does not know it (ask PostgreSQL).
]]
local pid = ARGV[1]
if not pid or pid == '' then
  return redis.error_reply('ERR haoyuan: patient id is required')
end
return redis.call('HGET', KEYS[1], pid)
