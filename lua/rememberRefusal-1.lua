#!lua
--[[
  Remember a refusal that a worker answered from its own cache (sold out)
  under the request's idempotency key, so that a retry with the same key
  gets the same answer whichever worker takes it and whatever came back
  meanwhile. If the key already has an answer (this is a retry, or a twin
  request won the race), that answer is returned instead, as a hold script
  replay would (rp = 1). The stored form is holdUnit's: fingerprint, a
  newline, the answer.

  Input:
    KEYS[1] idempotency key  hy:{p}:i:<account>:<key>
    ARGV[1] session id   ARGV[2] slot id   ARGV[3] patient ref
    ARGV[4] the refusal code (SOLD_OUT: the only one a cache answers)
    ARGV[5] idempotency TTL ms
    ARGV[6] time offset ms (tests only)
  Output: JSON as holdUnit: the stored answer with rp = 1, or
          {o = IDEMPOTENCY_MISMATCH} (the key was used for another request),
          or the refusal just remembered {o = code, now}.
]]
-- @include codes
-- @include answers
-- @include reply

local sid, slot, pat = ARGV[1], ARGV[2], ARGV[3]
local code, ttl = int_arg(ARGV[4]), int_arg(ARGV[5])
if not sid or sid == '' or not slot or slot == '' or not pat or pat == '' then
  return bad('session, slot and patient are required')
end
if code ~= SOLD_OUT then return bad('only a sold-out answer is remembered from a cache') end
if ttl == nil or ttl < 1 then return bad('ttl must be a positive integer') end
local now = server_now(ARGV[6])
local fingerprint = sid .. '|' .. slot .. '|' .. pat
local replay = stored_answer(KEYS[1], fingerprint, now)
if replay then return replay end
local body = reply({o = code, now = now})
store_answer(KEYS[1], fingerprint, body, ttl)
return body
