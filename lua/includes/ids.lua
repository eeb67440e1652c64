-- @include reply
-- Ids are "<partition>.<session>.<seq>"; the partition is the session's
-- (cfg.part, stored by loadSession), never parsed from a key name.
local function next_id(k, now, part, sid)
  -- Ids start from server time x 1000, so a Redis that lost its data never
  -- reissues an id that PostgreSQL already holds.
  local n = rcall('INCR', k.seq)
  if n == 1 then
    n = now * 1000
    rcall('SET', k.seq, string.format('%d', n))
  end
  return string.format('%s.%s.%d', part, sid, n)
end
