-- @include codes
-- @include reply
-- Answers stored under an idempotency key (a hold's, or a cached sold-out's):
-- "<fingerprint>\n<answer JSON>", the fingerprint naming the request
-- (session|slot|patient), so the same key for another request is refused.

-- The stored answer as a replay (rp = 1), the refusal of a key used for
-- another request, or nil when the key has no answer yet.
local function stored_answer(key, fingerprint, now)
  local stored = rcall('GET', key)
  if not stored then return nil end
  local cut = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, cut - 1) ~= fingerprint then
    return reply({o = IDEMPOTENCY_MISMATCH, now = now})
  end
  return '{"rp":1,' .. string.sub(stored, cut + 2)
end

local function store_answer(key, fingerprint, body, ttl_ms)
  rcall('SET', key, fingerprint .. '\n' .. body, 'PX', ttl_ms)
end
