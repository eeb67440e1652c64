"""Refunds as finance sees them: every refund order (``engine.store.payments``)
with its booking's fee and payment reference, and the payout finance records
by hand for providers without a refund API here."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import msgspec

from engine.store.payments import mark_refund_paid as _mark_paid
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
    state: str = "due"
    cause: str = ""
    amount: int = 0
    provider: str = ""
    out_refund_no: str = ""
    attempts: int = 0
    last_error: str | None = None


_COLS = ("coalesce(r.booking_id, r.transaction_id) AS booking_id, r.cause AS reason,"
         " r.created_at, b.fee_cents, coalesce(b.payment_ref, r.transaction_id) AS payment_ref,"
         " CASE WHEN r.state = 'succeeded' THEN r.finished_at END AS paid_at, r.paid_ref,"
         " r.paid_by, r.state, r.cause, r.amount, r.provider, r.out_refund_no, r.attempts,"
         " r.last_error")


async def refunds(db: Queryable, *, paid: bool = False, limit: int = 100,
                  state: str | None = None) -> list[RefundRow]:
    """Refunds not done yet (due, requested or failed; ``paid=True``:
    succeeded ones; or one ``state``), oldest first."""
    states = [state] if state else (["succeeded"] if paid else ["due", "requested", "failed"])
    rows = await db.fetch(
        f"SELECT {_COLS} FROM refund_orders r LEFT JOIN bookings b ON b.id = r.booking_id"
        " WHERE r.state = any($1::text[]) ORDER BY r.created_at, r.out_refund_no LIMIT $2",
        states, limit)
    return [RefundRow(**dict(r)) for r in rows]


async def mark_refund_paid(db: Queryable, booking_id: str, paid_ref: str, paid_by: str
                           ) -> tuple[RefundRow, Literal["paid", "replay", "conflict"]] | None:
    """Record a refund's payout: ``paid`` now; ``replay`` when it was already
    recorded under the same reference (idempotent); ``conflict`` when under
    another (or the provider paid it). None if no refund is due for that booking."""
    got = await _mark_paid(db, booking_id, paid_ref, paid_by)
    if got is None:
        return None
    _, how = got
    r = await db.fetchrow(
        f"SELECT {_COLS} FROM refund_orders r LEFT JOIN bookings b ON b.id = r.booking_id"
        " WHERE r.booking_id = $1 ORDER BY r.created_at LIMIT 1", booking_id)
    return RefundRow(**dict(r)), how
