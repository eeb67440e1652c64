-- haoyuan 0001: the record of schedules, accounts, patients, bookings and audits.
--
-- Redis decides; this database is the record. Personal data lives only in
-- patients.*_enc (AES-256-GCM per field, AAD = table/column/row id); everything
-- else names a patient by patient_ref / id_hash = HMAC-SHA256 of the
-- normalised national ID.
--
-- bookings, booking_events and refunds carry no foreign keys to sessions or
-- accounts on purpose: the writer must never fail to record a booking Redis
-- has acknowledged because a schedule row is late. The audit finds orphans.

CREATE TABLE hospitals (
    id   text PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE departments (
    id          text PRIMARY KEY,
    hospital_id text NOT NULL REFERENCES hospitals (id),
    name        text NOT NULL
);

CREATE TABLE doctors (
    id          text PRIMARY KEY,
    hospital_id text NOT NULL REFERENCES hospitals (id),
    dept_id     text NOT NULL REFERENCES departments (id),
    name        text NOT NULL,
    title       text
);

-- A session (出诊): one doctor, one date, one half-day.
CREATE TABLE sessions (
    id               text PRIMARY KEY,
    hospital_id      text NOT NULL REFERENCES hospitals (id),
    dept_id          text NOT NULL REFERENCES departments (id),
    doctor_id        text NOT NULL REFERENCES doctors (id),
    date             date NOT NULL,
    period           text NOT NULL CHECK (period IN ('AM', 'PM')),
    fee_cents        integer NOT NULL CHECK (fee_cents >= 0),
    release_at       timestamptz NOT NULL,
    cutoff_at        timestamptz,
    starts_at        timestamptz,
    cancel_before_ms bigint NOT NULL DEFAULT 0 CHECK (cancel_before_ms >= 0),
    hold_ttl_ms      integer NOT NULL DEFAULT 600000 CHECK (hold_ttl_ms > 0),
    scope            text NOT NULL DEFAULT 'dept' CHECK (scope IN ('dept', 'doctor')),
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'suspended')),
    partition        integer NOT NULL CHECK (partition >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_dept_date ON sessions (dept_id, date);
CREATE INDEX sessions_date ON sessions (date);

-- A slot (时段) of a session; its units are numbered 1..capacity in Redis.
CREATE TABLE slots (
    session_id text NOT NULL REFERENCES sessions (id),
    slot_id    text NOT NULL,
    start_time time,
    end_time   time,
    capacity   integer NOT NULL CHECK (capacity >= 0),
    PRIMARY KEY (session_id, slot_id)
);

-- The logged-in WeChat user. openid_hash is a keyed hash, never the openid.
CREATE TABLE accounts (
    id          text PRIMARY KEY,
    openid_hash text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A real-name patient (就诊人) bound to an account. Ciphertext only.
CREATE TABLE patients (
    id              uuid PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    id_hash         text NOT NULL,
    name_enc        bytea NOT NULL,
    phone_enc       bytea NOT NULL,
    national_id_enc bytea NOT NULL,
    key_id          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    unbound_at      timestamptz
);
CREATE UNIQUE INDEX patients_bound_once
    ON patients (account_id, id_hash) WHERE unbound_at IS NULL;
CREATE INDEX patients_id_hash ON patients (id_hash);
CREATE INDEX patients_key_id ON patients (key_id);

-- A booking (预约). id is the engine's "<partition>.<session>.<seq>".
CREATE TABLE bookings (
    id             text PRIMARY KEY,
    session_id     text NOT NULL,
    slot_id        text NOT NULL,
    unit           integer,
    patient_ref    text NOT NULL,
    account_id     text NOT NULL,
    fee_cents      integer NOT NULL DEFAULT 0,
    payment_ref    text,
    status         text NOT NULL
        CHECK (status IN ('booked', 'cancelled', 'refund_due', 'conflict')),
    status_reason  text,
    booked_at      timestamptz NOT NULL DEFAULT now(),
    cancelled_at   timestamptz,
    his_status     text NOT NULL DEFAULT 'pending'
        CHECK (his_status IN ('pending', 'accepted', 'rejected', 'unknown',
                              'cancel_pending', 'cancelled')),
    his_id         text,
    his_attempts   integer NOT NULL DEFAULT 0,
    his_updated_at timestamptz,
    stream_id      text,
    CHECK (status <> 'booked' OR unit IS NOT NULL)
);
-- The final arbiter: one booked row per (session, unit), whatever Redis lost.
CREATE UNIQUE INDEX bookings_one_per_unit
    ON bookings (session_id, unit) WHERE status = 'booked';
CREATE INDEX bookings_account ON bookings (account_id, booked_at DESC);
CREATE INDEX bookings_patient ON bookings (patient_ref);
CREATE INDEX bookings_session ON bookings (session_id);
CREATE INDEX bookings_his_todo ON bookings (his_updated_at NULLS FIRST)
    WHERE his_status IN ('pending', 'unknown', 'cancel_pending');

-- Full status history. Stream entry ids are unique per partition stream, and a
-- booking id names its partition, so (booking_id, stream_id) identifies an
-- outbox entry: a redelivered entry inserts nothing (ON CONFLICT DO NOTHING).
CREATE TABLE booking_events (
    seq        bigserial PRIMARY KEY,
    booking_id text NOT NULL,
    event_type text NOT NULL,
    reason     text,
    at         timestamptz NOT NULL DEFAULT now(),
    stream_id  text,
    UNIQUE (booking_id, stream_id)
);
CREATE INDEX booking_events_booking ON booking_events (booking_id, seq);

-- A booked row refused by bookings_one_per_unit (Redis lost a write).
CREATE TABLE booking_conflicts (
    id                bigserial PRIMARY KEY,
    booking_id        text NOT NULL UNIQUE,
    session_id        text NOT NULL,
    unit              integer,
    winner_booking_id text,
    detected_at       timestamptz NOT NULL DEFAULT now(),
    detail            text
);

-- Payment that must be returned (hold expired before confirmation, HIS rejection, ...).
CREATE TABLE refunds (
    booking_id text PRIMARY KEY,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    stream_id  text
);

-- Outbox entries that failed too often (poison); kept for a human.
CREATE TABLE outbox_dead_letters (
    stream     text NOT NULL,
    entry_id   text NOT NULL,
    payload    text NOT NULL,
    error      text,
    deliveries integer NOT NULL DEFAULT 0,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

-- One row per run of the conservation / Redis-vs-PostgreSQL audit.
CREATE TABLE audit_runs (
    id          bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    ok          boolean NOT NULL,
    sessions    integer NOT NULL DEFAULT 0,
    breaches    jsonb NOT NULL DEFAULT '[]'::jsonb,
    report      jsonb NOT NULL DEFAULT '{}'::jsonb
);
