-- haoyuan 0006: money and the HIS, both ways (issue 12).
--
-- payments        the ledger: every verified payment notification, once per
--                 provider transaction, recorded before the engine confirms
-- refund_orders   one refund per payment that booked nothing or whose
--                 booking ended without a visit: due -> requested ->
--                 succeeded | failed, with an idempotent out-refund number
-- reconcile_runs  each daily reconciliation (对账) against the provider's statement
-- his_patients    the HIS's own patient id (就诊卡 / MRN) per patient ref, encrypted
-- his_sync        cursors of the HIS change feed (FHIR _lastUpdated)
-- his_changes     HIS changes already applied (resource, id, version): a
--                 change seen twice is applied once
-- bookings        the HIS's appointment window and place, and two terminal
--                 HIS states that need an operator (no endless retries)

-- The ledger. provider 'wechat' (WeChat Pay API v3 notifications), 'callback'
-- (the generic signed callback POST /v1/holds/{id}/confirm). transaction_id is
-- the provider's own id (WeChat: transaction_id; callback: its payment_ref).
-- verification: 'ok' (signature, merchant and amount check out, hold known),
-- 'amount_mismatch' (paid amount differs from the fee), 'unknown_hold' (no
-- such hold), 'reused' (a callback reference already claimed by another hold).
-- outcome: what became of the money: 'pending' (not decided yet: the engine
-- was unreachable or recovering), 'booked', 'refund' (a refund order exists),
-- 'same_money' (a reused reference: the same money as an earlier payment).
CREATE TABLE payments (
    provider       text NOT NULL,
    transaction_id text NOT NULL,
    out_trade_no   text NOT NULL,
    hold_id        text,
    payment_ref    text NOT NULL,
    amount         integer NOT NULL CHECK (amount >= 0),
    currency       text NOT NULL DEFAULT 'CNY',
    paid_at        timestamptz NOT NULL,
    verification   text NOT NULL
        CHECK (verification IN ('ok', 'amount_mismatch', 'unknown_hold', 'reused')),
    outcome        text NOT NULL DEFAULT 'pending'
        CHECK (outcome IN ('pending', 'booked', 'refund', 'same_money')),
    outcome_reason text,
    notifications  integer NOT NULL DEFAULT 1,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, transaction_id)
);
CREATE INDEX payments_ref ON payments (payment_ref);
CREATE INDEX payments_hold ON payments (hold_id);
CREATE INDEX payments_paid_at ON payments (paid_at);
CREATE INDEX payments_pending ON payments (first_seen_at) WHERE outcome = 'pending';

-- One refund per payment, ever: the unique (provider, transaction_id) is what
-- makes "nothing refunded twice" structural. out_refund_no is derived from the
-- payment (engine.payments.base.refund_no), so even a re-created row would
-- carry the same number, and the provider refunds one number once.
-- Providers without a refund API here ('callback', and 'manual' for
-- payments that reached the engine without the ledger) are paid out by
-- finance (POST /v1/admin/refunds/{booking_id}/paid).
-- next_attempt_at is "not before" and the worker's lease; NULL: nothing more
-- will happen by itself (succeeded, or failed past max attempts).
CREATE TABLE refund_orders (
    out_refund_no      text PRIMARY KEY,
    provider           text NOT NULL,
    transaction_id     text NOT NULL,
    out_trade_no       text,
    booking_id         text,
    cause              text NOT NULL,
    reason             text NOT NULL,
    amount             integer NOT NULL CHECK (amount > 0),
    total              integer NOT NULL CHECK (total >= amount),
    currency           text NOT NULL DEFAULT 'CNY',
    state              text NOT NULL DEFAULT 'due'
        CHECK (state IN ('due', 'requested', 'succeeded', 'failed')),
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz DEFAULT now(),
    provider_refund_id text,
    provider_status    text,
    last_error         text,
    paid_ref           text,
    paid_by            text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    requested_at       timestamptz,
    finished_at        timestamptz,
    UNIQUE (provider, transaction_id)
);
CREATE INDEX refund_orders_booking ON refund_orders (booking_id);
CREATE INDEX refund_orders_todo ON refund_orders (provider, next_attempt_at)
    WHERE state IN ('due', 'requested', 'failed') AND next_attempt_at IS NOT NULL;

-- Refunds the writer and the API recorded before this migration: one order
-- each (the provider is unknown: finance pays them out by hand).
INSERT INTO refund_orders (out_refund_no, provider, transaction_id, booking_id, cause, reason,
                           amount, total, state, created_at, paid_ref, paid_by, finished_at,
                           next_attempt_at)
SELECT 'RF' || substr(encode(sha256(convert_to('manual:' || r.booking_id, 'UTF8')), 'hex'),
                      1, 30),
       'manual', r.booking_id, r.booking_id, r.reason,
       r.reason, b.fee_cents, b.fee_cents,
       CASE WHEN r.paid_at IS NULL THEN 'due' ELSE 'succeeded' END,
       r.created_at, r.paid_ref, r.paid_by, r.paid_at, NULL
  FROM refunds r JOIN bookings b ON b.id = r.booking_id
 WHERE b.fee_cents > 0
ON CONFLICT DO NOTHING;

CREATE TABLE reconcile_runs (
    id        bigserial PRIMARY KEY,
    provider  text NOT NULL,
    bill_date date NOT NULL,
    ok        boolean NOT NULL,
    counts    jsonb NOT NULL DEFAULT '{}'::jsonb,
    report    jsonb NOT NULL DEFAULT '{}'::jsonb,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconcile_runs_date ON reconcile_runs (bill_date, at DESC);

-- The HIS's patient id for a patient ref (AES-256-GCM; AAD: his_patients,
-- his_patient_id_enc, patient_ref), found or created by the forwarder once.
CREATE TABLE his_patients (
    patient_ref        text PRIMARY KEY,
    his_patient_id_enc bytea NOT NULL,
    key_id             text NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE his_sync (
    resource     text PRIMARY KEY,
    cursor       text NOT NULL DEFAULT '',
    polled_at    timestamptz,
    changes_seen bigint NOT NULL DEFAULT 0
);

CREATE TABLE his_changes (
    resource   text NOT NULL,
    his_id     text NOT NULL,
    version    text NOT NULL,
    booking_id text,
    status     text,
    action     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resource, his_id, version)
);

ALTER TABLE bookings
    ADD COLUMN his_reason      text,
    ADD COLUMN his_visit_start timestamptz,
    ADD COLUMN his_visit_end   timestamptz,
    ADD COLUMN his_place       text,
    DROP CONSTRAINT bookings_his_status_check,
    -- lookup_cancelled: after an unknown outcome the HIS has our booking
    -- cancelled; cancel_refused: the HIS refused our cancel. Both terminal
    -- until an operator runs `haoyuan his resolve`.
    ADD CONSTRAINT bookings_his_status_check
        CHECK (his_status IN ('pending', 'accepted', 'rejected', 'unknown', 'cancel_pending',
                              'cancelled', 'lookup_cancelled', 'cancel_refused'));
CREATE INDEX bookings_payment_ref ON bookings (payment_ref);
CREATE INDEX bookings_his_attention ON bookings (his_updated_at)
    WHERE his_status IN ('lookup_cancelled', 'cancel_refused');
