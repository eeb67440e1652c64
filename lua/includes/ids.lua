-- @include reply
-- Ids are "<partition>.<session>.<seq>"; the partition is the session's
-- (cfg.part, stored by loadSession), never parsed from a key name.
local function next_id(k, now, part, sid)
  -- Ids never go below server time x 1000: a Redis that lost its data, or a
  -- replica promoted before it had the last writes (its sequence rolled
  -- back), never reissues an id that PostgreSQL already holds. (Under 1,000
  -- ids a millisecond per partition, the sequence is the clock's.)
  local n = (tonumber(rcall('GET', k.seq)) or 0) + 1
  if n < now * 1000 then
    n = now * 1000
  end
  local id = string.format('%d', n)
  rcall('SET', k.seq, id)
  return string.format('%s.%s.%s', part, sid, id)
end
