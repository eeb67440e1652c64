-- The night closure of a session (booking closed at night, e.g. 23:00-06:00):
-- [from, to) in local minutes of the day, 0..1440; from == to means never.
-- The local day comes from the session's time zone, stored as minutes east
-- of UTC plus 1440 (tz_min + 1440, so the stored value is never negative:
-- China Standard Time, +480, is stored as 1920). Returns the instant the
-- booking reopens (ms) while it is night, else nil.
local function night_reopens(now, from_min, to_min, tz_stored)
  if from_min == to_min then return nil end
  local tz = (tz_stored or 1440) - 1440
  local minute = math.floor(((now / 1000 + tz * 60) % 86400) / 60)
  local night = (from_min < to_min and minute >= from_min and minute < to_min)
             or (from_min > to_min and (minute >= from_min or minute < to_min))
  if not night then return nil end
  local wait_min = (to_min - minute) % 1440
  return (math.floor(now / 60000) + wait_min) * 60000
end
