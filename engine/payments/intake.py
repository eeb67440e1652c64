"""Taking a payment in: the ledger first, then the engine.

Every payment that reaches us (a verified WeChat Pay notification, the
generic signed callback) goes through :func:`take_payment`:

1. it is written into the ledger (``payments``) by the provider's
   transaction id before anything else, so no payment is ever lost between
   the provider and the engine, and a repeated notification is counted, not
   applied twice;
2. a payment for a hold we do not know, or whose amount differs from the
   session fee, books nothing and gets its refund order at once;
3. the payment reference is claimed for its hold (one reference books one
   hold, ever), then the engine confirms; a second payment for a hold that is
   already paid gets its refund order; a payment that arrives after its hold
   ended and finds no unit is refunded through the writer (the engine's
   ``refund_due`` event carries the payment).

A hold whose partition is recovering (Redis lost it; a rebuild brings it
back) is neither confirmed nor refunded: the ledger keeps it ``pending`` and
the caller tells the provider to retry.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec

from engine.engine import Engine
from engine.outcomes import Booked, Reason, RecordState, Refused, Restore
from engine.store import payments as store
from engine.store.queries import Queryable

__all__ = ["Incoming", "Taken", "take_payment"]

log = logging.getLogger("haoyuan.payments")

TakenKind = Literal["booked", "refund", "pending", "same_money", "refused"]


class Incoming(msgspec.Struct, frozen=True, kw_only=True):
    """A verified payment, whatever the provider."""

    provider: str
    transaction_id: str
    #: The hold it pays for ('' when the provider's order maps to none of ours).
    hold_id: str
    #: The reference the engine keeps on the booking (WeChat: the transaction id).
    payment_ref: str
    amount: int
    paid_at: dt.datetime
    currency: str = "CNY"
    out_trade_no: str | None = None


class Taken(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a payment."""

    kind: TakenKind
    #: A problem slug for the callback's answer: amount-mismatch, not-found,
    #: payment-reused, already-paid, expired, recovering, invalid-state.
    reason: str | None = None
    booked: Booked | None = None
    refused: Refused | None = None
    #: The payer gets the money back (a refund order exists or will).
    refund_due: bool = False
    fee: int | None = None
    #: The ledger already had this transaction (a repeated notification).
    repeated: bool = False


async def take_payment(
    engine: Engine,
    db: Queryable,
    p: Incoming,
    *,
    recovering: Callable[[str], Awaitable[bool]] | None = None,
) -> Taken:
    """Record ``p`` in the ledger, then confirm its hold (see the module docstring)."""
    rec = await engine.record(p.hold_id) if p.hold_id and _is_record_id(p.hold_id) else None
    if rec is None:
        if p.hold_id and recovering is not None and await recovering(p.hold_id):
            row, new = await _record(db, p, "ok")
            return Taken(kind="pending", reason="recovering", repeated=not new)
        row, new = await _record(db, p, "unknown_hold")
        await store.ensure_refund(db, provider=p.provider, transaction_id=p.transaction_id,
                                  booking_id=p.hold_id or None, cause="unknown_hold",
                                  reason="a payment for no hold of ours", amount=p.amount,
                                  total=p.amount, out_trade_no=row.out_trade_no)
        log.warning("payment %s/%s for an unknown hold: refunded", p.provider, p.transaction_id)
        return Taken(kind="refund", reason="not-found", refund_due=True, repeated=not new)
    fee = rec.fee
    if fee is not None and fee != p.amount:
        row, new = await _record(db, p, "amount_mismatch")
        await store.ensure_refund(db, provider=p.provider, transaction_id=p.transaction_id,
                                  booking_id=p.hold_id, cause="amount_mismatch",
                                  reason=f"paid {p.amount}, the fee is {fee}", amount=p.amount,
                                  total=p.amount, out_trade_no=row.out_trade_no)
        log.warning("payment %s/%s: amount differs from the fee of %s: refunded", p.provider,
                    p.transaction_id, p.hold_id)
        return Taken(kind="refund", reason="amount-mismatch", refund_due=True, fee=fee,
                     repeated=not new)
    row, new = await _record(db, p, "ok")
    if row.hold_id != p.hold_id:
        # The same transaction once more, for another hold: the same money,
        # which already paid for its first hold. Kept for finance, not refunded.
        await store.record_refund(db, p.payment_ref, p.hold_id, p.amount, "payment-reused")
        log.warning("payment %s/%s reused for hold %s", p.provider, p.transaction_id, p.hold_id)
        return Taken(kind="same_money", reason="payment-reused", refund_due=True, fee=fee,
                     repeated=True)
    owner = await store.claim(db, p.payment_ref, p.hold_id, p.amount)
    if owner is not None:
        await store.record_refund(db, p.payment_ref, p.hold_id, p.amount, "payment-reused")
        await store.settle_payment(db, p.provider, p.transaction_id, "same_money",
                                   "payment-reused")
        return Taken(kind="same_money", reason="payment-reused", refund_due=True, fee=fee,
                     repeated=not new)
    lost = rec.state is RecordState.HELD or (rec.state is RecordState.EXPIRED
                                             and rec.reason != "displaced")
    if not new and lost:
        # A notification again (its first answer was a FAIL) for a record
        # Redis has as a hold: the first may have booked before a failover
        # lost the confirmation. What PostgreSQL recorded booked stays this
        # payment's booking, on its unit (Redis is put back to it), never a
        # second unit for one hold. (A record Redis has booked, cancelled or
        # refunded is newer than PostgreSQL: the confirm below answers it.)
        stored = await db.fetchrow(
            "SELECT id, session_id, slot_id, unit, patient_ref, account_id, fee_cents,"
            " payment_ref, booked_at FROM bookings WHERE id = $1 AND status = 'booked'"
            " AND payment_ref = $2", p.hold_id, p.payment_ref)
        if stored is not None and await engine.restore_stored(stored) in (
                Restore.RESTORED, Restore.ALREADY):
            await store.settle_payment(db, p.provider, p.transaction_id, "booked")
            return Taken(kind="booked", fee=fee, repeated=True, booked=Booked(
                booking_id=stored["id"], session_id=stored["session_id"],
                slot_id=stored["slot_id"], unit=stored["unit"],
                server_ms=await engine.server_time_ms(), replay=True))
    out = await engine.confirm(p.hold_id, p.payment_ref)
    if isinstance(out, Booked):
        await store.settle_payment(db, p.provider, p.transaction_id, "booked")
        return Taken(kind="booked", booked=out, fee=fee, repeated=not new)
    if out.reason is Reason.INVALID_STATE and out.state == "paid":
        # A second payment for a hold already paid books nothing: refunded.
        await store.record_refund(db, p.payment_ref, p.hold_id, p.amount, "already-paid")
        await store.ensure_refund(db, provider=p.provider, transaction_id=p.transaction_id,
                                  booking_id=p.hold_id, cause="already_paid",
                                  reason="a second payment for a hold already paid",
                                  amount=p.amount, total=p.amount,
                                  out_trade_no=row.out_trade_no)
        return Taken(kind="refund", reason="already-paid", refused=out, refund_due=True,
                     fee=fee, repeated=not new)
    if out.reason is Reason.EXPIRED:
        # refund_due: the writer creates the refund order from the engine's event.
        return Taken(kind="refund", reason="expired", refused=out, refund_due=True, fee=fee,
                     repeated=not new)
    if out.reason is Reason.RECOVERING:
        return Taken(kind="pending", reason="recovering", refused=out, repeated=not new)
    return Taken(kind="refused", reason=str(out.reason.value), refused=out, fee=fee,
                 repeated=not new)


_RECORD_ID = re.compile(r"\d{1,3}\.[A-Za-z0-9_-]{1,64}\.\d{1,19}", re.ASCII)


def _is_record_id(value: str) -> bool:
    return _RECORD_ID.fullmatch(value) is not None


async def _record(db: Queryable, p: Incoming, verification: store.Verification
                  ) -> tuple[store.LedgerRow, bool]:
    return await store.record_payment(
        db, provider=p.provider, transaction_id=p.transaction_id, hold_id=p.hold_id or None,
        payment_ref=p.payment_ref, amount=p.amount, paid_at=p.paid_at,
        verification=verification, currency=p.currency, out_trade_no=p.out_trade_no)
