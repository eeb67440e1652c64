"""The outbox writer's SQL: one function per event kind (``engine.events``).

Every statement is idempotent per outbox entry (``ON CONFLICT``), so a
redelivered entry writes nothing new. ``bookings``, ``booking_events`` and
``refunds`` carry no foreign keys on purpose: a booking Redis acknowledged is
never refused because a schedule row is late.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from engine.events import Booked, Cancelled, OutboxEvent, RefundDue
from engine.store.payments import cause_of_cancel, refund_for_booking

log = logging.getLogger("haoyuan.writer")

__all__ = ["record_booked", "record_cancelled", "record_event", "record_refund_due"]


def _ts(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


async def record_booked(conn: Any, ev: Booked, eid: str) -> str | None:
    """A booking. If PostgreSQL already has that unit booked by another
    booking (Redis lost a write: the partial unique index is the arbiter), it
    is recorded as a conflict with a refund, and the winner's id returned
    ('' if none is found); else None."""
    at = _ts(ev.at)
    inserted = await conn.fetchval(
        "INSERT INTO bookings (id, session_id, slot_id, unit, patient_ref, account_id,"
        " fee_cents, payment_ref, status, booked_at, stream_id)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,'booked',$9,$10)"
        " ON CONFLICT DO NOTHING RETURNING id",
        ev.id, ev.sid, ev.slot, ev.unit, ev.pat, ev.acct, ev.fee, ev.pay, at, eid,
    )
    if inserted is not None and ev.prev:
        # 改约: the booking it was moved from, and a fee difference for finance.
        await conn.execute("UPDATE bookings SET rescheduled_from = $2 WHERE id = $1",
                           ev.id, ev.prev)
        old_fee = await conn.fetchval("SELECT fee_cents FROM bookings WHERE id = $1", ev.prev)
        if old_fee is not None and old_fee != ev.fee:
            await conn.execute(
                "INSERT INTO fee_adjustments (booking_id, previous_id, amount)"
                " VALUES ($1, $2, $3) ON CONFLICT (booking_id) DO NOTHING",
                ev.id, ev.prev, ev.fee - old_fee)
    if inserted is None:
        exists = await conn.fetchrow(
            "SELECT session_id, unit, patient_ref FROM bookings WHERE id = $1", ev.id)
        if exists is not None and (exists["session_id"], exists["unit"],
                                   exists["patient_ref"]) != (ev.sid, ev.unit, ev.pat):
            # One id, two bookings: a Redis whose clock went back behind its
            # ids (ids never go below server time x 1000). PostgreSQL keeps the
            # first; the operator must look (rebuild puts Redis back to it).
            log.error("writer: booking id %s reissued for another unit or patient (a Redis"
                      " clock behind its ids?): kept the first; run `haoyuan audit`", ev.id)
        if exists is None:
            winner = await conn.fetchval(
                "SELECT id FROM bookings WHERE session_id = $1 AND unit = $2"
                " AND status = 'booked'", ev.sid, ev.unit,
            )
            await conn.execute(
                "INSERT INTO bookings (id, session_id, slot_id, unit, patient_ref,"
                " account_id, fee_cents, payment_ref, status, status_reason, booked_at,"
                " his_status, stream_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,'conflict',"
                " 'unit already booked',$9,'cancelled',$10) ON CONFLICT (id) DO NOTHING",
                ev.id, ev.sid, ev.slot, ev.unit, ev.pat, ev.acct, ev.fee, ev.pay, at, eid,
            )
            await conn.execute(
                "INSERT INTO booking_conflicts (booking_id, session_id, unit,"
                " winner_booking_id, detail) VALUES ($1,$2,$3,$4,$5)"
                " ON CONFLICT (booking_id) DO NOTHING",
                ev.id, ev.sid, ev.unit, winner,
                "Redis booked a unit PostgreSQL already holds (lost write)",
            )
            await conn.execute(
                "INSERT INTO refunds (booking_id, reason, stream_id) VALUES ($1,$2,$3)"
                " ON CONFLICT (booking_id) DO NOTHING", ev.id, "conflict", eid,
            )
            await refund_for_booking(conn, ev.id, ev.pay, ev.fee, "conflict",
                                     "unit already booked")
            return str(winner or "")
    return None


async def record_cancelled(conn: Any, ev: Cancelled, eid: str) -> None:
    """A cancelled booking: the row turns cancelled (or is created so, when
    its booked event is later in the stream) and the HIS is told (unless the
    HIS itself cancelled it). A paid booking that ends without a visit gets
    its one refund order."""
    at = _ts(ev.at)
    await conn.execute(
        "INSERT INTO bookings (id, session_id, slot_id, unit, patient_ref, account_id,"
        " fee_cents, payment_ref, status, status_reason, booked_at, cancelled_at,"
        " his_status, stream_id, late_cancel)"
        " VALUES ($1,$2,$3,NULL,$4,$5,$6,$7,'cancelled',$8,$9,$9,'cancel_pending',$10,"
        " $11)"
        " ON CONFLICT (id) DO UPDATE SET status = 'cancelled',"
        " status_reason = EXCLUDED.status_reason, cancelled_at = EXCLUDED.cancelled_at,"
        " late_cancel = EXCLUDED.late_cancel,"
        " his_status = CASE WHEN bookings.his_status IN ('rejected', 'cancelled')"
        "   THEN bookings.his_status ELSE 'cancel_pending' END, his_updated_at = NULL"
        " WHERE bookings.status = 'booked'",
        ev.id, ev.sid, ev.slot, ev.pat, ev.acct, ev.fee, ev.pay, ev.rsn or "cancelled",
        at, eid, bool(ev.late),
    )
    reason = ev.rsn or "cancelled"
    if reason in ("rescheduled", "reschedule_undone"):
        # 改约: the payment pays for the booking that stands, nothing to refund.
        return
    await refund_for_booking(conn, ev.id, ev.pay, ev.fee, cause_of_cancel(reason), reason)


async def record_refund_due(conn: Any, ev: RefundDue, eid: str) -> None:
    """A payment that found no unit: a refund_due row and its refund."""
    at = _ts(ev.at)
    await conn.execute(
        "INSERT INTO bookings (id, session_id, slot_id, unit, patient_ref, account_id,"
        " fee_cents, payment_ref, status, status_reason, booked_at, his_status, stream_id)"
        " VALUES ($1,$2,$3,NULL,$4,$5,$6,$7,'refund_due',$8,$9,'cancelled',$10)"
        " ON CONFLICT (id) DO NOTHING",
        ev.id, ev.sid, ev.slot, ev.pat, ev.acct, ev.fee, ev.pay, ev.rsn, at, eid,
    )
    await conn.execute(
        "INSERT INTO refunds (booking_id, reason, stream_id) VALUES ($1,$2,$3)"
        " ON CONFLICT (booking_id) DO NOTHING", ev.id, ev.rsn or "expired", eid,
    )
    await refund_for_booking(conn, ev.id, ev.pay, ev.fee, ev.rsn or "expired",
                             ev.rsn or "expired")


async def record_event(conn: Any, ev: OutboxEvent, eid: str) -> None:
    """The status history: one row per outbox entry."""
    await conn.execute(
        "INSERT INTO booking_events (booking_id, event_type, reason, at, stream_id,"
        " account_id, patient_ref, session_id, slot_id, unit, deadline_at)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)"
        " ON CONFLICT (booking_id, stream_id) DO NOTHING",
        ev.id, ev.kind, ev.rsn or None, _ts(ev.at), eid, ev.acct or None, ev.pat or None,
        ev.sid or None, ev.slot or None, ev.unit or None, _ts(ev.dl) if ev.dl else None,
    )
