-- Hospital rules (per hospital, overridable per department), attendance and
-- the no-show policy's bans.

CREATE TABLE hospital_rules (
    hospital_id text NOT NULL,
    dept_id     text NOT NULL DEFAULT '',   -- '' = the hospital's default
    rules       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hospital_id, dept_id)
);

ALTER TABLE bookings
    ADD COLUMN attendance    text CHECK (attendance IN ('attended', 'no_show')),
    ADD COLUMN attendance_at timestamptz,
    ADD COLUMN late_cancel   boolean NOT NULL DEFAULT false;

CREATE INDEX bookings_patient_attendance ON bookings (patient_ref, attendance_at)
    WHERE attendance = 'no_show';

CREATE TABLE patient_bans (
    id           bigserial PRIMARY KEY,
    patient_ref  text NOT NULL,
    banned_from  timestamptz NOT NULL DEFAULT now(),
    banned_until timestamptz NOT NULL,
    reason       text NOT NULL,
    lifted_at    timestamptz,
    lifted_by    text
);
CREATE INDEX patient_bans_active ON patient_bans (patient_ref) WHERE lifted_at IS NULL;
