-- Notifications to patients (engine/notify): what to tell whom, stored
-- deliveries, consent.
--
-- The account's openid, encrypted as patient data is (the WeChat
-- subscribe message is sent to it); filled at the next login.
ALTER TABLE accounts ADD COLUMN openid_enc bytea;
ALTER TABLE accounts ADD COLUMN openid_key_id text;

-- Each outbox event's who and when, for the notifier (a waitlist offer is a
-- hold, not a booking row); and whether the notifier has planned it.
-- Events already there count as planned: nothing old is sent after an upgrade.
ALTER TABLE booking_events
    ADD COLUMN account_id text,
    ADD COLUMN patient_ref text,
    ADD COLUMN session_id text,
    ADD COLUMN slot_id text,
    ADD COLUMN unit integer,
    ADD COLUMN deadline_at timestamptz,
    ADD COLUMN notified boolean NOT NULL DEFAULT true;
ALTER TABLE booking_events ALTER COLUMN notified SET DEFAULT false;
CREATE INDEX booking_events_to_notify ON booking_events (seq) WHERE NOT notified;

ALTER TABLE refund_orders ADD COLUMN notified boolean NOT NULL DEFAULT true;
ALTER TABLE refund_orders ALTER COLUMN notified SET DEFAULT false;
CREATE INDEX refund_orders_to_notify ON refund_orders (finished_at)
    WHERE NOT notified AND state = 'succeeded';

-- The visit reminder is planned once per booking.
ALTER TABLE bookings ADD COLUMN reminder_planned boolean NOT NULL DEFAULT false;

-- What the account agreed to receive (a WeChat subscribe message needs the
-- user's authorization: one message per one-time authorization, or
-- long-term: remaining NULL).
CREATE TABLE notify_consent (
    account_id text NOT NULL,
    kind       text NOT NULL,
    remaining  integer CHECK (remaining IS NULL OR remaining >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, kind)
);

-- One row per message: planned once (dedup_key), sent at least once with
-- that key (the provider or our simulator drops a repeat), never anything
-- personal beyond what the template shows (masked).
CREATE TABLE notifications (
    dedup_key       text PRIMARY KEY,
    account_id      text NOT NULL,
    booking_id      text,
    patient_ref     text,
    kind            text NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('wechat', 'sms', 'none')),
    state           text NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'sending', 'sent', 'failed', 'skipped')),
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX notifications_due ON notifications (next_attempt_at)
    WHERE state IN ('queued', 'sending');
CREATE INDEX notifications_account ON notifications (account_id, created_at DESC);
