"""Audit and reconciliation: conservation in Redis, and Redis vs PostgreSQL
vs HIS agreement, per session.

A breach is anything that contradicts the invariants: capacity != free +
held + booked; a unit free and in use, or in use twice; a booking in Redis
that PostgreSQL does not have (once the outbox is drained) or the reverse;
a booking PostgreSQL says HIS accepted that HIS does not have, or one HIS has
booked that we cancelled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import msgspec

from engine.engine import Engine
from engine.his.attention import Attention, attention
from engine.his.base import HisClient, HisUnavailable
from engine.recovery import PartitionCheck, check_partitions
from engine.writer import outbox_lag


class SessionReport(msgspec.Struct):
    session_id: str
    capacity: int
    free: int
    held: int
    booked_redis: int
    booked_postgres: int | None
    booked_his: int | None
    ok: bool
    breaches: list[str]


class AuditReport(msgspec.Struct):
    ok: bool
    sessions: list[SessionReport]
    breaches: list[str]
    outbox_pending: int
    checked_at: str
    #: Partitions whose Redis state is not whole (engine.recovery): each needs
    #: ``haoyuan rebuild`` before it sells again. Empty: no rebuild needed.
    recovery: list[PartitionCheck] = []
    #: None: unknown (audited without PostgreSQL).
    rebuild_needed: bool | None = None
    #: Bookings the forwarder stopped retrying (``lookup_cancelled``,
    #: ``cancel_refused``): each a breach until ``haoyuan his resolve``.
    his_attention: list[Attention] = []


async def run_audit(
    engine: Engine,
    pool: Any | None = None,
    his: HisClient | None = None,
    *,
    session_ids: list[str] | None = None,
    his_concurrency: int = 16,
) -> AuditReport:
    lag = await outbox_lag(engine.client)
    in_flight = lag.pending + lag.undelivered
    sids = session_ids if session_ids is not None else await engine.session_ids()
    recovery: list[PartitionCheck] = []
    if pool is not None:
        recovery = await check_partitions(engine, pool)
        if session_ids is None:  # sessions Redis lost are sessions too
            pg_sids = {r["id"] for r in await pool.fetch("SELECT id FROM sessions")}
            sids = sorted(set(sids) | pg_sids)
    reports: list[SessionReport] = []
    all_breaches: list[str] = []
    pg_booked: dict[str, set[str]] = {}
    pg_unit: dict[str, int] = {}
    his_state: dict[str, str] = {}
    if pool is not None:
        rows = await pool.fetch(
            "SELECT id, session_id, status, unit, his_status FROM bookings"
            " WHERE session_id = ANY($1)", sids,
        )
        for r in rows:
            if r["status"] == "booked":
                pg_booked.setdefault(r["session_id"], set()).add(r["id"])
                pg_unit[r["id"]] = r["unit"]
            his_state[r["id"]] = r["his_status"]
    his_booked: dict[str, bool] = {}
    if his is not None and pool is not None:
        sem = asyncio.Semaphore(his_concurrency)

        async def look(bid: str) -> None:
            delay = 0.05
            for attempt in range(6):
                try:
                    async with sem:
                        res = await his.lookup(bid)
                    his_booked[bid] = res.outcome == "accepted"
                    return
                except HisUnavailable:
                    if attempt == 5:
                        raise
                    await asyncio.sleep(delay)
                    delay *= 2

        await asyncio.gather(*(look(b) for b in his_state))
    for sid in sids:
        a = await engine.audit(sid)
        breaches = list(a.breaches)
        redis_ids = set(a.booked_units)
        booked_pg: int | None = None
        booked_his: int | None = None
        if pool is not None:
            pg_ids = pg_booked.get(sid, set())
            booked_pg = len(pg_ids)
            if in_flight == 0:
                for b in sorted(redis_ids - pg_ids):
                    breaches.append(f"booking {b} is in Redis but not booked in PostgreSQL")
                for b in sorted(pg_ids - redis_ids):
                    breaches.append(f"booking {b} is booked in PostgreSQL but not in Redis")
                # One booking, two queue numbers (a lost write, then the hold
                # confirmed again on another unit): the HIS has PostgreSQL's.
                for b in sorted(pg_ids & redis_ids):
                    if a.booked_units[b] != pg_unit.get(b):
                        breaches.append(f"booking {b} is on unit {a.booked_units[b]} in Redis"
                                        f" but {pg_unit.get(b)} in PostgreSQL")
            if his is not None:
                booked_his = sum(1 for b in pg_ids if his_booked.get(b))
                for b in sorted(pg_ids):
                    if his_state.get(b) == "accepted" and not his_booked.get(b):
                        breaches.append(f"booking {b}: HIS accepted it but does not have it")
                for b, st in his_state.items():
                    if b.split(".")[1:2] == [sid] and b not in pg_ids and his_booked.get(b) \
                            and st in ("cancelled", "rejected"):
                        breaches.append(f"booking {b} is cancelled here but booked in HIS")
        reports.append(SessionReport(
            session_id=sid, capacity=a.capacity, free=a.free, held=a.held,
            booked_redis=a.booked, booked_postgres=booked_pg, booked_his=booked_his,
            ok=not breaches, breaches=breaches,
        ))
        all_breaches += [f"{sid}: {b}" for b in breaches]
    all_breaches += [f"partition {c.partition}: {c.state}: {c.detail}; run haoyuan rebuild"
                     for c in recovery]
    stuck: list[Attention] = []
    if pool is not None and his is not None:
        stuck = await attention(pool)
        all_breaches += [f"booking {a.booking_id}: HIS {a.his_status} ({a.reason}); run haoyuan"
                         f" his resolve {a.booking_id}" for a in stuck]
    return AuditReport(
        ok=not all_breaches, sessions=reports, breaches=all_breaches,
        outbox_pending=in_flight, checked_at=dt.datetime.now(dt.UTC).isoformat(),
        recovery=recovery, rebuild_needed=None if pool is None else bool(recovery),
        his_attention=stuck,
    )


def format_table(report: AuditReport) -> str:
    head = f"{'session':<28}{'cap':>6}{'free':>6}{'held':>6}{'redis':>7}{'pg':>7}{'his':>7}  ok"
    lines = [head, "-" * len(head)]
    for s in report.sessions:
        pg = "-" if s.booked_postgres is None else str(s.booked_postgres)
        his = "-" if s.booked_his is None else str(s.booked_his)
        lines.append(f"{s.session_id:<28}{s.capacity:>6}{s.free:>6}{s.held:>6}"
                     f"{s.booked_redis:>7}{pg:>7}{his:>7}  {'yes' if s.ok else 'NO'}")
    lines.append("")
    if report.outbox_pending:
        lines.append(f"note: {report.outbox_pending} outbox entries in flight; "
                     "Redis vs PostgreSQL not compared")
    if report.rebuild_needed:
        parts = ", ".join(str(c.partition) for c in report.recovery)
        lines.append(f"recovery: Redis lost state of partition(s) {parts}: sales there answer "
                     "'recovering' until `haoyuan rebuild` has run")
    elif report.rebuild_needed is False:
        lines.append("recovery: Redis's state is whole; no rebuild needed")
    if report.his_attention:
        lines.append(f"his attention: {len(report.his_attention)} booking(s) the forwarder "
                     "stopped retrying (lookup_cancelled / cancel_refused): haoyuan his resolve")
    lines += [f"BREACH {b}" for b in report.breaches]
    lines.append("audit: OK" if report.ok else f"audit: {len(report.breaches)} breach(es)")
    return "\n".join(lines)
