-- Reschedules (改约, lua/rescheduleBooking-20.lua): the booking a booking was
-- moved from (its payment is the first booking's), and the fee differences
-- finance settles (positive: the patient owes it; negative: it is owed to
-- the patient).
ALTER TABLE bookings ADD COLUMN rescheduled_from text;
CREATE INDEX bookings_rescheduled_from ON bookings (rescheduled_from)
    WHERE rescheduled_from IS NOT NULL;

CREATE TABLE fee_adjustments (
    booking_id  text PRIMARY KEY,
    previous_id text NOT NULL,
    amount      integer NOT NULL CHECK (amount <> 0),
    state       text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    settled_at  timestamptz,
    settled_by  text
);
