-- Pausing sales (暂停放号): a session may be paused (no new holds, bookings
-- stand) as well as open or suspended (停诊).
ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_status_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_status_check
    CHECK (status IN ('open', 'suspended', 'paused'));
