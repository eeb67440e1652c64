-- haoyuan 0005: verified real-name bindings, token revocations, staff
-- identities with roles, and the staff audit trail.

-- How a binding's real-name check ended (engine.identity): 'self' (the
-- account holder is the patient: a face / WeChat real-name check), 'data'
-- (ID number, name and phone belong together), 'mismatch', 'unknown' (the
-- authority has no record), 'unavailable' (the check could not run), or
-- 'unverified' (bound before verification existed). Only 'self' and 'data'
-- may hold. Bindings made before this migration start unverified: they are
-- re-verified with POST /v1/patients/{id}/verify, and `haoyuan
-- rebuild-bindings` drops them from Redis's binding mirror.
ALTER TABLE patients
    ADD COLUMN verification text NOT NULL DEFAULT 'unverified'
        CHECK (verification IN ('self', 'data', 'mismatch', 'unknown', 'unavailable',
                                'unverified')),
    ADD COLUMN verified_at timestamptz,
    ADD COLUMN verification_ref text,
    -- NULL: unbound by its own account; 'revoked' by a verified binding of
    -- the same ID (revoked_by); 'displaced' by a verified binding that needed
    -- the place (an ID is bound to at most HAOYUAN_MAX_ACCOUNTS_PER_PATIENT).
    ADD COLUMN unbound_reason text CHECK (unbound_reason IN ('revoked', 'displaced')),
    ADD COLUMN revoked_by uuid;
CREATE INDEX patients_id_hash_bound ON patients (id_hash) WHERE unbound_at IS NULL;

-- Account tokens revoked before they expire (logout, an operator). Redis
-- holds the live copy that every request checks (the account's hash next to
-- its binding mirror); this table lets `haoyuan rebuild-bindings` restore it
-- after Redis lost data. token_id NULL: every token of the account that
-- expires at or before `until`.
CREATE TABLE token_revocations (
    id         bigserial PRIMARY KEY,
    account_id text NOT NULL,
    token_id   text,
    until      timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_by text NOT NULL
);
CREATE INDEX token_revocations_live ON token_revocations (until);

-- A person who administers the service. The bearer token is
-- `hys_<id>_<secret>`; only SHA-256 of the secret is stored, and it is shown
-- once, when the member is added (`haoyuan staff add`).
CREATE TABLE staff (
    id          text PRIMARY KEY,
    username    text NOT NULL UNIQUE,
    role        text NOT NULL CHECK (role IN ('operator', 'clerk', 'finance')),
    secret_hash text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    disabled_at timestamptz,
    disabled_by text
);

-- Who did what: one row per staff action that changed something (imports,
-- capacity, suspensions, rules, attendance, ban lifts, staff holds, refunds,
-- token revocations, staff changes). Append-only.
CREATE TABLE staff_audit (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    role   text NOT NULL,
    action text NOT NULL,
    target text,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX staff_audit_actor ON staff_audit (actor, at DESC);
CREATE INDEX staff_audit_target ON staff_audit (target, at DESC);

CREATE FUNCTION staff_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'staff_audit is append-only';
END $$;
CREATE TRIGGER staff_audit_append_only BEFORE UPDATE OR DELETE ON staff_audit
    FOR EACH ROW EXECUTE FUNCTION staff_audit_append_only();

-- Refunds paid out by finance (the payment side's reference and who did it).
ALTER TABLE refunds
    ADD COLUMN paid_at  timestamptz,
    ADD COLUMN paid_ref text,
    ADD COLUMN paid_by  text;
