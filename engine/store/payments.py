"""The money tables: payment references, the payments ledger, refund orders.

- ``claim`` ties a payment reference to its hold (``payment_refs``, 0004):
  one reference books at most one hold, ever; ``record_refund`` keeps a
  refused one (``payment_refunds``) for finance.
- ``record_payment`` writes a verified notification into the ledger
  (``payments``, 0006) once per provider transaction, before the engine
  confirms; ``settle_payment`` says what became of it.
- ``ensure_refund`` creates the one refund order of a payment (unique per
  provider transaction): the writer calls it for bookings that end without a
  visit, the payment intake for payments that booked nothing. The refund
  worker (``engine.refunds``) moves orders due -> requested -> succeeded |
  failed; finance pays out the providers without a refund API.

All idempotent: a retried callback or a redelivered outbox entry writes
nothing twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import msgspec

from engine.payments.base import order_no, refund_no
from engine.store.queries import Queryable

__all__ = [
    "MANUAL_PROVIDERS",
    "LedgerRow",
    "RefundOrder",
    "cause_of_cancel",
    "claim",
    "ensure_refund",
    "ledger_row",
    "mark_refund_paid",
    "record_payment",
    "record_refund",
    "refund_for_booking",
    "refund_orders",
    "settle_payment",
]

#: Providers whose refunds finance pays out by hand (no refund API here).
MANUAL_PROVIDERS = ("callback", "manual")

Verification = Literal["ok", "amount_mismatch", "unknown_hold", "reused"]
PaymentOutcome = Literal["pending", "booked", "refund", "same_money"]


async def claim(db: Queryable, payment_ref: str, hold_id: str, amount: int) -> str | None:
    """Claim ``payment_ref`` for ``hold_id``. None if it is (now, or already)
    this hold's; else the id of the hold it paid for first."""
    row = await db.fetchrow(
        "INSERT INTO payment_refs (payment_ref, hold_id, amount) VALUES ($1, $2, $3)"
        " ON CONFLICT (payment_ref) DO NOTHING RETURNING hold_id",
        payment_ref, hold_id, amount)
    if row is not None:
        return None
    owner = await db.fetchval("SELECT hold_id FROM payment_refs WHERE payment_ref = $1",
                              payment_ref)
    return None if owner is None or owner == hold_id else str(owner)


async def record_refund(db: Queryable, payment_ref: str, hold_id: str, amount: int,
                        reason: str) -> None:
    """A payment that booked nothing (once per reference and hold), for finance."""
    await db.execute(
        "INSERT INTO payment_refunds (payment_ref, hold_id, amount, reason)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (payment_ref, hold_id) DO NOTHING",
        payment_ref, hold_id, amount, reason)


# -- the ledger ----------------------------------------------------------------------


class LedgerRow(msgspec.Struct, frozen=True, kw_only=True):
    provider: str
    transaction_id: str
    out_trade_no: str
    hold_id: str | None
    payment_ref: str
    amount: int
    currency: str
    paid_at: dt.datetime
    verification: str
    outcome: str
    outcome_reason: str | None
    notifications: int
    first_seen_at: dt.datetime


_LEDGER_COLS = ", ".join(LedgerRow.__struct_fields__)


def _ledger(r: Any) -> LedgerRow:
    return LedgerRow(**{f: r[f] for f in LedgerRow.__struct_fields__})


async def record_payment(
    db: Queryable,
    *,
    provider: str,
    transaction_id: str,
    hold_id: str | None,
    payment_ref: str,
    amount: int,
    paid_at: dt.datetime,
    verification: Verification,
    currency: str = "CNY",
    out_trade_no: str | None = None,
) -> tuple[LedgerRow, bool]:
    """The ledger row of a verified payment, and whether this call created it
    (False: a repeated notification, counted in ``notifications``)."""
    row = await db.fetchrow(
        f"INSERT INTO payments (provider, transaction_id, out_trade_no, hold_id, payment_ref,"
        f" amount, currency, paid_at, verification) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        f" ON CONFLICT (provider, transaction_id) DO UPDATE SET"
        f" notifications = payments.notifications + 1, last_seen_at = now()"
        f" RETURNING {_LEDGER_COLS}, (xmax = 0) AS inserted",
        provider, transaction_id,
        out_trade_no or (order_no(hold_id) if hold_id else transaction_id),
        hold_id, payment_ref, amount, currency, paid_at, verification)
    return _ledger(row), bool(row["inserted"])


async def ledger_row(db: Queryable, provider: str, transaction_id: str) -> LedgerRow | None:
    r = await db.fetchrow(f"SELECT {_LEDGER_COLS} FROM payments WHERE provider = $1 AND"
                          " transaction_id = $2", provider, transaction_id)
    return None if r is None else _ledger(r)


async def settle_payment(db: Queryable, provider: str, transaction_id: str,
                         outcome: PaymentOutcome, reason: str | None = None) -> None:
    """What became of a payment (never back to ``pending``; ``refund`` is final)."""
    await db.execute(
        "UPDATE payments SET outcome = $3, outcome_reason = coalesce($4, outcome_reason)"
        " WHERE provider = $1 AND transaction_id = $2 AND outcome NOT IN ('refund')",
        provider, transaction_id, outcome, reason)


# -- refund orders ----------------------------------------------------------------------


def cause_of_cancel(reason: str) -> str:
    """The refund cause of a cancelled booking, from its cancel reason."""
    if reason == "patient":
        return "patient_cancel"
    if reason == "conflict":
        return "conflict"
    if reason.startswith("his_rejected"):
        return "his_rejected"
    if reason.startswith("his_cancelled"):
        return "his_cancelled"
    return "suspended"  # 停诊: an operator's, the scheduler's or the HIS's suspension


async def ensure_refund(
    db: Queryable,
    *,
    provider: str,
    transaction_id: str,
    booking_id: str | None,
    cause: str,
    reason: str,
    amount: int,
    total: int | None = None,
    out_trade_no: str | None = None,
) -> bool:
    """The one refund order of this payment (created if missing). True if created.
    A zero amount needs no refund."""
    if amount <= 0:
        return False
    got = await db.fetchval(
        "INSERT INTO refund_orders (out_refund_no, provider, transaction_id, out_trade_no,"
        " booking_id, cause, reason, amount, total) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        " ON CONFLICT DO NOTHING RETURNING out_refund_no",
        refund_no(provider, transaction_id), provider, transaction_id, out_trade_no,
        booking_id, cause, reason[:200], amount, max(total or amount, amount))
    if got is not None:
        await db.execute("UPDATE payments SET outcome = 'refund', outcome_reason = $3"
                         " WHERE provider = $1 AND transaction_id = $2",
                         provider, transaction_id, cause)
    return got is not None


async def refund_for_booking(db: Queryable, booking_id: str, payment_ref: str, fee: int,
                             cause: str, reason: str) -> bool:
    """The refund of a booking that ended without a visit: its payment from the
    ledger (the amount actually paid), or, for a payment that reached the
    engine without the ledger, a manual refund of the fee."""
    if not payment_ref:
        return False
    # A rescheduled booking (改约) is paid by the payment of the first one.
    first = await db.fetchval(
        "WITH RECURSIVE chain(id, prev, depth) AS ("
        "  SELECT id, rescheduled_from, 0 FROM bookings WHERE id = $1"
        "  UNION ALL SELECT b.id, b.rescheduled_from, c.depth + 1 FROM bookings b"
        "  JOIN chain c ON b.id = c.prev WHERE c.depth < 50)"
        " SELECT id FROM chain ORDER BY depth DESC LIMIT 1", booking_id) or booking_id
    r = await db.fetchrow(
        "SELECT provider, transaction_id, amount, out_trade_no FROM payments"
        " WHERE payment_ref = $1 AND (hold_id = $2 OR hold_id IS NULL)"
        " ORDER BY first_seen_at LIMIT 1", payment_ref, first)
    if r is None:
        # No ledger row (the engine confirmed without it): the booking is the
        # payment's identity here, and finance pays it out.
        return await ensure_refund(db, provider="manual", transaction_id=booking_id,
                                   booking_id=booking_id, cause=cause, reason=reason,
                                   amount=fee, total=fee)
    return await ensure_refund(db, provider=r["provider"], transaction_id=r["transaction_id"],
                               booking_id=booking_id, cause=cause, reason=reason,
                               amount=r["amount"], total=r["amount"],
                               out_trade_no=r["out_trade_no"])


RefundState = Literal["due", "requested", "succeeded", "failed"]


class RefundOrder(msgspec.Struct, frozen=True, kw_only=True):
    out_refund_no: str
    provider: str
    transaction_id: str
    out_trade_no: str | None
    booking_id: str | None
    cause: str
    reason: str
    amount: int
    total: int
    state: RefundState
    attempts: int
    next_attempt_at: dt.datetime | None
    provider_refund_id: str | None
    provider_status: str | None
    last_error: str | None
    paid_ref: str | None
    paid_by: str | None
    created_at: dt.datetime
    requested_at: dt.datetime | None
    finished_at: dt.datetime | None


REFUND_COLS = ", ".join(RefundOrder.__struct_fields__)


def refund_order(r: Any) -> RefundOrder:
    return RefundOrder(**{f: r[f] for f in RefundOrder.__struct_fields__})


async def refund_orders(db: Queryable, *, states: tuple[str, ...] = ("due", "requested",
                                                                       "failed"),
                        booking_id: str | None = None, limit: int = 100) -> list[RefundOrder]:
    """Refund orders in ``states`` (oldest first), or every order of one booking."""
    if booking_id is not None:
        rows = await db.fetch(f"SELECT {REFUND_COLS} FROM refund_orders WHERE booking_id = $1"
                              " ORDER BY created_at", booking_id)
    else:
        rows = await db.fetch(
            f"SELECT {REFUND_COLS} FROM refund_orders WHERE state = any($1::text[])"
            " ORDER BY created_at, out_refund_no LIMIT $2", list(states), limit)
    return [refund_order(r) for r in rows]


async def mark_refund_paid(db: Queryable, booking_id: str, paid_ref: str, paid_by: str
                           ) -> tuple[RefundOrder, Literal["paid", "replay", "conflict"]] | None:
    """Finance records a refund it paid out by hand (a provider without a
    refund API, or one that failed): ``paid`` now; ``replay`` when it was
    already recorded under the same reference; ``conflict`` when it was paid
    under another reference or by the provider. None if the booking has no
    refund order."""
    changed = await db.fetchval(
        "UPDATE refund_orders SET state = 'succeeded', paid_ref = $2, paid_by = $3,"
        " finished_at = now(), next_attempt_at = NULL"
        " WHERE booking_id = $1 AND state IN ('due', 'failed')"
        " AND (provider = any($4::text[]) OR state = 'failed') RETURNING out_refund_no",
        booking_id, paid_ref, paid_by, list(MANUAL_PROVIDERS))
    r = await db.fetchrow(f"SELECT {REFUND_COLS} FROM refund_orders WHERE booking_id = $1"
                          " ORDER BY created_at LIMIT 1", booking_id)
    if r is None:
        return None
    row = refund_order(r)
    if changed is not None:
        return row, "paid"
    return row, "replay" if row.paid_ref == paid_ref else "conflict"
