-- haoyuan 0009: other backends book through the scheduling standards (issue 17).
--
-- fhir_clients: a backend that embeds haoyuan through the FHIR facade
-- (/fhir/r4). Its bearer token is `hyf_<id>_<secret>`; only the SHA-256 of
-- the secret is stored, shown once when the client is added (`haoyuan
-- fhir-client add`). `scopes` are SMART system scopes (system/Slot.read,
-- system/Appointment.write, ...). `identity` says how it names patients:
-- 'verify' (the default: every patient's national ID, name and phone go to
-- the real-name authority, as a /v1 binding does) or 'trusted' (the client
-- vouches for its patients' real names, e.g. the hospital's own backend).
-- `rate_per_s`/`burst`: the client's own quota (GCRA) on top of the
-- per-patient limits every hold meets.
CREATE TABLE fhir_clients (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    scopes      text[] NOT NULL,
    identity    text NOT NULL DEFAULT 'verify' CHECK (identity IN ('verify', 'trusted')),
    rate_per_s  double precision NOT NULL DEFAULT 50 CHECK (rate_per_s >= 0),
    burst       integer NOT NULL DEFAULT 100 CHECK (burst >= 1),
    secret_hash text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    disabled_at timestamptz,
    disabled_by text
);

-- What aggregators need to show a hospital (SMART Scheduling Links
-- Location: telecom and address); empty until `haoyuan fhir-location` sets it.
ALTER TABLE hospitals ADD COLUMN contact jsonb NOT NULL DEFAULT '{}'::jsonb;

-- SMART Scheduling Links bulk publishing: the NDJSON files of the last
-- publication (written by `haoyuan publish`, served by every API worker at
-- /fhir/r4/bulk/<name>), and the publication itself (one row).
CREATE TABLE bulk_files (
    name         text PRIMARY KEY,
    type         text NOT NULL CHECK (type IN ('Location', 'Schedule', 'Slot')),
    body         bytea NOT NULL,
    etag         text NOT NULL,
    resources    integer NOT NULL,
    jurisdiction text[] NOT NULL DEFAULT '{}',
    generated_at timestamptz NOT NULL
);
CREATE TABLE bulk_publication (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    transaction_time timestamptz NOT NULL,
    -- What triggers a new publication: the schedule and every slot's
    -- free/busy state (not the free counts, which move with every hold).
    fingerprint      text NOT NULL,
    files            integer NOT NULL
);
