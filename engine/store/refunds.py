"""Refunds due (a payment that found no unit, a cancelled booking, a HIS
rejection) and their payout, recorded by finance staff."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import msgspec

from engine.store.queries import Queryable

__all__ = ["RefundRow", "mark_refund_paid", "refunds"]


class RefundRow(msgspec.Struct, frozen=True, kw_only=True):
    booking_id: str
    reason: str
    created_at: dt.datetime
    fee_cents: int | None = None
    payment_ref: str | None = None
    paid_at: dt.datetime | None = None
    paid_ref: str | None = None
    paid_by: str | None = None


_COLS = ("r.booking_id, r.reason, r.created_at, b.fee_cents, b.payment_ref, r.paid_at,"
         " r.paid_ref, r.paid_by")


async def refunds(db: Queryable, *, paid: bool = False, limit: int = 100) -> list[RefundRow]:
    """Refunds not paid out yet (``paid=True``: paid ones), oldest first."""
    rows = await db.fetch(
        f"SELECT {_COLS} FROM refunds r LEFT JOIN bookings b ON b.id = r.booking_id"
        " WHERE (r.paid_at IS NOT NULL) = $1 ORDER BY r.created_at, r.booking_id LIMIT $2",
        paid, limit)
    return [RefundRow(**dict(r)) for r in rows]


async def mark_refund_paid(db: Queryable, booking_id: str, paid_ref: str, paid_by: str
                           ) -> tuple[RefundRow, Literal["paid", "replay", "conflict"]] | None:
    """Record a refund's payout: ``paid`` now; ``replay`` when it was already
    recorded under the same reference (idempotent); ``conflict`` when under
    another (unchanged). None if no refund is due for that booking."""
    changed = await db.fetchval(
        "UPDATE refunds SET paid_at = now(), paid_ref = $2, paid_by = $3"
        " WHERE booking_id = $1 AND paid_at IS NULL RETURNING booking_id",
        booking_id, paid_ref, paid_by)
    r = await db.fetchrow(
        f"SELECT {_COLS} FROM refunds r LEFT JOIN bookings b ON b.id = r.booking_id"
        " WHERE r.booking_id = $1", booking_id)
    if r is None:
        return None
    row = RefundRow(**dict(r))
    if changed is not None:
        return row, "paid"
    return row, "replay" if row.paid_ref == paid_ref else "conflict"
