-- A payment reference books at most one hold, ever (issue 10).
--
-- The API claims a callback's reference for its hold here before it asks the
-- engine to confirm; the primary key is the constraint. It lives in its own
-- table, not as a unique index on bookings, because the outbox writer
-- legitimately writes several rows that carry one reference (a booking, its
-- 'conflict' row, a 'refund_due' row) and must never fail on them.
CREATE TABLE payment_refs (
    payment_ref text PRIMARY KEY,
    hold_id     text NOT NULL,
    amount      integer NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_refs_hold ON payment_refs (hold_id);

-- References already paid for a booking count as claimed (the oldest wins).
INSERT INTO payment_refs (payment_ref, hold_id, amount, claimed_at)
SELECT DISTINCT ON (payment_ref) payment_ref, id, fee_cents, booked_at
  FROM bookings
 WHERE payment_ref IS NOT NULL AND payment_ref <> ''
 ORDER BY payment_ref, booked_at, id
ON CONFLICT (payment_ref) DO NOTHING;

-- Payments that booked nothing and must go back to the payer: a reference
-- reused for another hold, a second payment for a hold already paid. One
-- row per (reference, hold): a retried callback records nothing twice.
CREATE TABLE payment_refunds (
    payment_ref text NOT NULL,
    hold_id     text NOT NULL,
    amount      integer NOT NULL,
    reason      text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_ref, hold_id)
);
