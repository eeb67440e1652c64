"""Rebuild Redis state from PostgreSQL after Redis lost data, without ever
undoing a decision newer than what PostgreSQL has.

Per partition (``engine.recovery`` says which need it; a rebuild is safe on
any, and changes nothing on a healthy one):

1. **Close** it: delete its recovery marker, so every decision there answers
   ``recovering`` (nothing sells, nothing changes) until step 5.
2. **Drain** its outbox into PostgreSQL: decisions Redis acknowledged that the
   writer had not delivered yet (a cancel made while the writer lagged) are
   newer than PostgreSQL's rows, so they land first.
3. **Load** every session of the partition PostgreSQL has, exactly as it was
   loaded (``sessions.spec``: pools, waitlist, windows), live inventory kept.
4. **Restore** every booking PostgreSQL holds onto its own unit
   (``restoreBooking``): a hold whose confirmation Redis lost becomes the
   booking; a hold PostgreSQL never saw paid is displaced only if that unit is
   needed; a record Redis holds as cancelled, refunded or displaced is never
   revived. A booking the arbiter recorded as a conflict's loser is cancelled
   first (its unit is the winner's). Ids stay above every id PostgreSQL has seen; suspended sessions
   are suspended again.
5. **Reopen** it under its marker (the same one if it was whole), recorded
   in PostgreSQL with the outbox position now written.

If a step fails (PostgreSQL unreachable, the outbox does not drain), the
partition stays closed and the error says so: run the rebuild again.
``rebuild_bindings`` refills the binding mirror that holds read."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections import defaultdict
from typing import Any

import msgspec

from engine import recovery
from engine.engine import Engine, new_epoch
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import Refused, Restore
from engine.writer import OutboxWriter, WriterConfig, outbox_lag


class RebuildReport(msgspec.Struct):
    session_id: str
    restored: int
    already: int
    failed: list[str]
    #: Bookings PostgreSQL still calls booked that Redis holds as ended (newer).
    kept: list[str] = []
    partition: int | None = None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ms(ts: Any) -> int:
    """Epoch milliseconds, exactly (a float timestamp can be 1 ms off)."""
    return 0 if ts is None else int((ts - _EPOCH) // dt.timedelta(milliseconds=1))


async def session_spec_from_pg(conn: Any, session_id: str) -> SessionSpec | None:
    """The session as it was loaded (``sessions.spec``) with the capacities
    and slots PostgreSQL has now; from the columns for sessions recorded
    before the spec was kept."""
    s = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", session_id)
    if s is None:
        return None
    slots = await conn.fetch(
        "SELECT slot_id, start_time, end_time, capacity FROM slots WHERE session_id = $1"
        " ORDER BY start_time NULLS LAST, slot_id", session_id)
    current = [SlotSpec(slot_id=r["slot_id"],
                        start=r["start_time"].strftime("%H:%M") if r["start_time"] else "00:00",
                        end=r["end_time"].strftime("%H:%M") if r["end_time"] else "00:00",
                        capacity=r["capacity"]) for r in slots]
    if s["spec"] is not None:
        spec = msgspec.json.decode(s["spec"], type=SessionSpec)
        loaded = {x.slot_id: x for x in spec.slots}
        merged = [msgspec.structs.replace(loaded[c.slot_id], capacity=c.capacity)
                  if c.slot_id in loaded else c for c in current]
        return msgspec.structs.replace(
            spec, slots=merged or spec.slots, fee=s["fee_cents"],
            release_at_ms=_ms(s["release_at"]), cutoff_ms=_ms(s["cutoff_at"]),
            starts_ms=_ms(s["starts_at"]), cancel_before_ms=s["cancel_before_ms"],
            hold_ttl_ms=s["hold_ttl_ms"])
    return SessionSpec(
        session_id=s["id"], hospital=s["hospital_id"], dept=s["dept_id"], doctor=s["doctor_id"],
        date=s["date"].isoformat(), period=s["period"], fee=s["fee_cents"],
        release_at_ms=_ms(s["release_at"]), cutoff_ms=_ms(s["cutoff_at"]),
        starts_ms=_ms(s["starts_at"]), cancel_before_ms=s["cancel_before_ms"],
        hold_ttl_ms=s["hold_ttl_ms"], scope=s["scope"], slots=current,
    )


async def drain(engine: Engine, pool: Any, partitions: list[int], *,
                timeout_s: float = 60.0) -> int:
    """Write every outbox entry of these partitions into PostgreSQL: new ones,
    and pending ones another writer holds (claimed after a short idle).
    Raises ``RecoveryError`` if they do not drain in time."""
    w = OutboxWriter(engine, pool, WriterConfig(
        block_ms=20, claim_idle_ms=1000, consumer=f"rebuild-{os.getpid()}",
        guard_interval_s=0), partitions=partitions)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        await w.ensure_groups()
        while True:
            lag = await outbox_lag(engine.client, partitions)
            if lag.pending == 0 and lag.undelivered == 0:
                return w.written
            if loop.time() > deadline:
                raise recovery.RecoveryError(
                    f"the outbox of partitions {partitions} did not drain in {timeout_s:.0f} s "
                    f"({lag.pending} pending, {lag.undelivered} undelivered)")
            if await w.step() == 0:
                await asyncio.sleep(0.05)
    except recovery.RecoveryError:
        raise
    except Exception as exc:
        raise recovery.RecoveryError(
            f"the outbox of partitions {partitions} could not be written to PostgreSQL "
            f"({type(exc).__name__}: {exc})") from exc


async def rebuild_session(engine: Engine, pool: Any, session_id: str) -> RebuildReport:
    """Load one session from PostgreSQL and put its bookings back (steps 3-4;
    the caller closes and drains the partition first, and reopens it)."""
    async with pool.acquire() as conn:
        spec = await session_spec_from_pg(conn, session_id)
        if spec is None:
            return RebuildReport(session_id, 0, 0, ["session not in PostgreSQL"])
        rows = await conn.fetch(
            "SELECT id, session_id, slot_id, unit, patient_ref, account_id, fee_cents,"
            " payment_ref, booked_at FROM bookings WHERE session_id = $1 AND status = 'booked'"
            " ORDER BY unit", session_id)
        status = await conn.fetchval("SELECT status FROM sessions WHERE id = $1", session_id)
        every_id = [r["id"] for r in await conn.fetch(
            "SELECT id FROM bookings WHERE session_id = $1", session_id)]
        losers = [r["booking_id"] for r in await conn.fetch(
            "SELECT booking_id FROM booking_conflicts WHERE session_id = $1", session_id)]
    loaded = await engine.load_session(spec, open_partition=False)
    # A booking the arbiter found on a unit PostgreSQL had already booked
    # (Redis lost a write and sold the unit again) ends first, if the writer
    # could not end it then: its unit goes back to the booking that won.
    for bid in losers:
        await engine.cancel(bid, reason="conflict", force=True)
    restored = already = 0
    failed: list[str] = []
    kept: list[str] = []
    for r in rows:
        res = await engine.restore_stored(r)
        if isinstance(res, Refused):
            failed.append(f"{r['id']}: {res.reason.value} {res.what or ''}".strip())
        elif res is Restore.RESTORED:
            restored += 1
        elif res is Restore.ALREADY:
            already += 1
        else:
            kept.append(f"{r['id']}: {res.value}")
    # Ids of bookings that are not restored (cancelled, refunded) must not be
    # issued again either: the sequence goes above the highest one.
    if every_id:
        await engine.raise_sequence(max(every_id, key=lambda i: int(i.rsplit(".", 1)[1])))
    if status == "suspended" and await engine.session_status(session_id) != "suspended":
        await engine.suspend(session_id, "suspended")
    elif status == "paused" and await engine.session_status(session_id) != "paused":
        await engine.pause(session_id, "paused")
    return RebuildReport(session_id, restored, already, failed, kept, loaded.partition)


async def rebuild_partition(engine: Engine, pool: Any, partition: int, session_ids: list[str],
                            *, drain_timeout_s: float = 60.0) -> list[RebuildReport]:
    """Close, drain, load and restore, reopen one partition (the module's steps)."""
    before = await engine.partition_epoch(partition)
    rows = await recovery.recorded(pool, [partition])
    pg_epoch = rows[partition]["epoch"] if partition in rows else ""
    await engine.close_partition(partition)
    await drain(engine, pool, [partition], timeout_s=drain_timeout_s)
    reports = [await rebuild_session(engine, pool, sid) for sid in session_ids]
    whole = before is not None and (before == pg_epoch or not pg_epoch)
    epoch = before if whole and before is not None else new_epoch()
    # Everything in the stream is in PostgreSQL now (drained while closed).
    await recovery.record_open(pool, partition, epoch, await recovery.last_entry(engine, partition))
    await engine.open_partition(partition, epoch)
    return reports


async def rebuild(engine: Engine, pool: Any, session_ids: list[str] | None = None, *,
                  drain_timeout_s: float = 60.0) -> list[RebuildReport]:
    """Rebuild the partitions of these sessions (every session PostgreSQL has
    in them), or of every session PostgreSQL has. One partition at a time:
    each is closed only while it is rebuilt."""
    if session_ids:
        rows = await pool.fetch("SELECT id, partition FROM sessions WHERE id = ANY($1)",
                                session_ids)
        parts = {r["partition"] for r in rows}
        unknown = sorted(set(session_ids) - {r["id"] for r in rows})
    else:
        parts, unknown = await recovery.known_partitions(pool), []
    by_part: dict[int, list[str]] = defaultdict(list)
    if parts:
        for r in await pool.fetch("SELECT id, partition FROM sessions WHERE partition = ANY($1)"
                                  " ORDER BY id", sorted(parts)):
            by_part[r["partition"]].append(r["id"])
    reports = [RebuildReport(sid, 0, 0, ["session not in PostgreSQL"]) for sid in unknown]
    for p in sorted(parts):
        reports += await rebuild_partition(engine, pool, p, by_part[p],
                                           drain_timeout_s=drain_timeout_s)
    return sorted(reports, key=lambda r: r.session_id)


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
