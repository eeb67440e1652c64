"""Rebuild a session's Redis state from PostgreSQL after Redis lost its data:
the session and its slots are loaded again, then every active booking is put
back on its own unit (never reissued). Holds are not restored: they were
never promised (their payments, if any, are found by reconciliation).
``rebuild_bindings`` refills the binding mirror that holds read."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from engine.engine import Engine
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import Refused


class RebuildReport(msgspec.Struct):
    session_id: str
    restored: int
    already: int
    failed: list[str]


def _ms(ts: Any) -> int:
    return 0 if ts is None else int(ts.timestamp() * 1000)


async def session_spec_from_pg(conn: Any, session_id: str) -> SessionSpec | None:
    s = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", session_id)
    if s is None:
        return None
    slots = await conn.fetch(
        "SELECT slot_id, start_time, end_time, capacity FROM slots WHERE session_id = $1"
        " ORDER BY start_time NULLS LAST, slot_id", session_id)
    return SessionSpec(
        session_id=s["id"], hospital=s["hospital_id"], dept=s["dept_id"], doctor=s["doctor_id"],
        date=s["date"].isoformat(), period=s["period"], fee=s["fee_cents"],
        release_at_ms=_ms(s["release_at"]), cutoff_ms=_ms(s["cutoff_at"]),
        starts_ms=_ms(s["starts_at"]), cancel_before_ms=s["cancel_before_ms"],
        hold_ttl_ms=s["hold_ttl_ms"], scope=s["scope"],
        slots=[SlotSpec(slot_id=r["slot_id"],
                        start=r["start_time"].strftime("%H:%M") if r["start_time"] else "00:00",
                        end=r["end_time"].strftime("%H:%M") if r["end_time"] else "00:00",
                        capacity=r["capacity"]) for r in slots],
    )


async def rebuild_session(engine: Engine, pool: Any, session_id: str) -> RebuildReport:
    async with pool.acquire() as conn:
        spec = await session_spec_from_pg(conn, session_id)
        if spec is None:
            return RebuildReport(session_id, 0, 0, ["session not in PostgreSQL"])
        rows = await conn.fetch(
            "SELECT id, slot_id, unit, patient_ref, account_id, fee_cents, payment_ref,"
            " booked_at FROM bookings WHERE session_id = $1 AND status = 'booked'"
            " ORDER BY unit", session_id)
        status = await conn.fetchval("SELECT status FROM sessions WHERE id = $1", session_id)
        every_id = [r["id"] for r in await conn.fetch(
            "SELECT id FROM bookings WHERE session_id = $1", session_id)]
    await engine.load_session(spec)
    restored = already = 0
    failed: list[str] = []
    for r in rows:
        res = await engine.restore_booking(
            booking_id=r["id"], session_id=session_id, slot_id=r["slot_id"], unit=r["unit"],
            patient=r["patient_ref"], account=r["account_id"], fee=r["fee_cents"],
            payment_ref=r["payment_ref"] or "", booked_at_ms=_ms(r["booked_at"]))
        if isinstance(res, Refused):
            failed.append(f"{r['id']}: {res.reason.value} {res.what or ''}".strip())
        elif res:
            restored += 1
        else:
            already += 1
    # Ids of bookings that are not restored (cancelled, refunded) must not be
    # issued again either: the sequence goes above the highest one.
    if every_id:
        await engine.raise_sequence(max(every_id, key=lambda i: int(i.rsplit(".", 1)[1])))
    if status == "suspended":
        await engine.suspend(session_id, "suspended")
    return RebuildReport(session_id, restored, already, failed)


async def rebuild(engine: Engine, pool: Any, session_ids: list[str] | None = None
                  ) -> list[RebuildReport]:
    if not session_ids:
        session_ids = [r["id"] for r in await pool.fetch("SELECT id FROM sessions ORDER BY id")]
    return [await rebuild_session(engine, pool, sid) for sid in session_ids]


async def rebuild_bindings(engine: Engine, pool: Any, *, chunk: int = 2000) -> int:
    """Fill the binding mirror (account -> patient id -> ref, read by every
    hold) from PostgreSQL's active bindings, after Redis lost it or for
    bindings written around the API, and put back the token revocations
    that have not expired. Only verified bindings get a ref, with fill
    semantics: an entry the mirror already has, a tombstone included, is
    left alone. An unverified binding's ref is dropped (e.g. bound before
    verification existed). Returns how many entries were written or dropped."""
    from engine.store.bindings import live_revocations

    written = 0
    async with pool.acquire() as conn, conn.transaction():
        cur = conn.cursor("SELECT account_id, id, id_hash, verification FROM patients"
                          " WHERE unbound_at IS NULL ORDER BY account_id, id")
        batch: list[Any] = []

        async def one(r: Any) -> bool:
            if r["verification"] in ("self", "data"):
                return await engine.mirror_binding(r["account_id"], str(r["id"]), r["id_hash"],
                                                   fill=True)
            return await engine.unmirror_binding(r["account_id"], str(r["id"]))

        async def flush() -> int:
            got = await asyncio.gather(*(one(r) for r in batch))
            batch.clear()
            return sum(got)

        async for r in cur:
            batch.append(r)
            if len(batch) >= chunk:
                written += await flush()
        written += await flush()
    for rv in await live_revocations(pool):
        await engine.revoke_tokens(rv.account_id, rv.token_id, rv.until_s, restore=True)
    return written
