"""Bookings the forwarder stopped retrying: they need a person.

Two answers of the HIS cannot be fixed by sending again
(``engine.forwarder``): ``lookup_cancelled`` (after an unknown outcome the
HIS holds our booking as cancelled) and ``cancel_refused`` (the HIS refused
our cancel, e.g. the patient already arrived). :func:`attention` lists them
(``haoyuan audit --his-url`` reports them as breaches, ``/metrics`` counts
them); :func:`resolve` is what the operator runs once they know
(``haoyuan his resolve BOOKING --action ...``):

- ``cancel`` (lookup_cancelled): the HIS is right, the visit will not take
  place: the booking is cancelled here too (its unit returns, it is refunded);
- ``retry``: send it again (lookup_cancelled: the HIS team re-opened the
  appointment; cancel_refused: they lifted the reason);
- ``done``: settled by hand in the HIS (lookup_cancelled: re-registered there;
  cancel_refused: cancelled there): recorded, nothing is sent.

Each resolution is a ``booking_events`` row naming the operator and the note.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import msgspec

from engine.engine import Engine

__all__ = ["Attention", "Resolution", "attention", "resolve"]

Action = Literal["cancel", "retry", "done"]


class Attention(msgspec.Struct, frozen=True):
    booking_id: str
    his_status: str
    reason: str | None
    status: str
    since: dt.datetime | None
    his_id: str | None


class Resolution(msgspec.Struct, frozen=True):
    booking_id: str
    action: str
    his_status: str
    detail: str


async def attention(db: Any, *, limit: int = 1000) -> list[Attention]:
    rows = await db.fetch(
        "SELECT id, his_status, his_reason, status, his_updated_at, his_id FROM bookings"
        " WHERE his_status IN ('lookup_cancelled', 'cancel_refused')"
        " ORDER BY his_updated_at, id LIMIT $1", limit)
    return [Attention(r["id"], r["his_status"], r["his_reason"], r["status"],
                      r["his_updated_at"], r["his_id"]) for r in rows]


async def resolve(engine: Engine, db: Any, booking_id: str, action: Action, *, actor: str,
                  note: str = "") -> Resolution | str:
    """Resolve one booking needing attention; a string says why it cannot be."""
    row = await db.fetchrow("SELECT his_status, status FROM bookings WHERE id = $1", booking_id)
    if row is None:
        return "no such booking"
    st = row["his_status"]
    if st not in ("lookup_cancelled", "cancel_refused"):
        return f"booking needs no attention (his_status {st})"
    detail = ""
    if action == "cancel":
        if st != "lookup_cancelled":
            return "cancel applies to lookup_cancelled (the HIS holds it cancelled)"
        res = await engine.cancel(booking_id, reason="his_cancelled", force=True)
        detail = "cancelled here too" if res.ok else f"engine: {getattr(res, 'reason', '?')}"
        new = "cancelled"
    elif action == "retry":
        new = "pending" if st == "lookup_cancelled" else "cancel_pending"
    else:
        new = "accepted" if st == "lookup_cancelled" else "cancelled"
    async with db.acquire() as conn, conn.transaction():
        tag = await conn.execute(
            "UPDATE bookings SET his_status = $2, his_updated_at = NULL, his_attempts = 0,"
            " his_reason = NULL WHERE id = $1 AND his_status = $3", booking_id, new, st)
        if tag == "UPDATE 0":
            return "the booking changed meanwhile; look again"
        await conn.execute(
            "INSERT INTO booking_events (booking_id, event_type, reason) VALUES ($1, $2, $3)",
            booking_id, f"his_resolved_{action}",
            f"{actor}: {st} -> {new}" + (f"; {note}" if note else "") + (
                f"; {detail}" if detail else ""))
    return Resolution(booking_id, action, new, detail)
