-- @include reply
-- The outbox never trims itself: a MAXLEN here could drop an entry the
-- writer has not written yet. The writer trims each stream below the oldest
-- entry any consumer group still needs (engine.writer.OutboxWriter.trim).
local function outbox(stream_key, event)
  event.v = 1
  return rcall('XADD', stream_key, '*', 'e', cjson.encode(event))
end

local function event_of(kind, rec, now, reason)
  return {t = kind, id = rec.id, sid = rec.sid, slot = rec.slot, unit = rec.unit,
          pat = rec.pat, acct = rec.acct, fee = rec.fee, pay = rec.pay or '',
          at = now, rsn = reason or '', dl = rec.dl or 0}
end
