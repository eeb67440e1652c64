#!lua flags=no-writes
--[[
  Whether an idempotency key already has a stored answer (a retried hold).
  Read-only; a script only so that it rides in the engine's batched
  pipelines with the holds it competes with.

  Input:
    KEYS[1] idempotency key  hy:{p}:i:<account>:<key>
  Output: 1 or 0
]]
return redis.call('EXISTS', KEYS[1])
