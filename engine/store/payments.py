"""Payment references: one reference books at most one hold, ever.

``claim`` ties a payment callback's reference to its hold (the primary key
of ``payment_refs`` is the constraint; migration 0004) before the engine is
asked to confirm; a reference already tied to another hold is refused and
``record_refund`` keeps it for the payment side to return. Both are
idempotent, so a retried callback answers as the first one did.
"""

from __future__ import annotations

from engine.store.queries import Queryable

__all__ = ["claim", "record_refund"]


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
    """A payment that booked nothing: to be returned (once per reference and hold)."""
    await db.execute(
        "INSERT INTO payment_refunds (payment_ref, hold_id, amount, reason)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (payment_ref, hold_id) DO NOTHING",
        payment_ref, hold_id, amount, reason)
