"""Statistics for the hospital's management (统计): what each release did.

Per day, department and doctor (each session, and their sums):

- ``released`` units, by channel pool (``public`` and each pool the session
  set aside: phone, window, referral);
- ``booked`` (booked now) and ``bookings`` (ever confirmed);
- ``sold_out_after_release_ms``: from the release instant to the first
  instant no unit was free (``holdUnit`` stamps it in Redis);
- ``tried``: distinct accounts that pressed "book" after the release;
  ``unmet_demand``: distinct accounts told "sold out" that hold no booking in
  that department-day at the end (their waitlist brought them nothing);
- ``cancelled_in_time`` / ``cancelled_late`` (by the patient; late: inside the
  no-show window), ``cancelled_other`` (停诊, HIS rejections and window
  cancels, conflicts);
- ``no_shows`` and ``no_show_rate`` (of the bookings whose attendance is
  known), ``waitlist_joins``, ``waitlist_offers``, ``waitlist_conversions``
  (offers that became bookings), ``rescheduled_in`` / ``rescheduled_out``
  (改约), ``refunds`` (refund orders), and ``his_rejections``.

Demand is counted without slowing the hot path: the API keeps the accounts
of each session in memory and adds them to Redis sets once a second
(``record_demand``: one pipelined ``SADD`` per session and kind), never a
PostgreSQL write per request; ``fold`` moves the sets and the sold-out
instants into PostgreSQL (the writer does it when idle, ``haoyuan stats``
before it reads), so the figures survive a Redis rebuild. Accounts, not
patients: a cached "sold out" is answered before the patient is resolved.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from engine import keys as K
from engine.engine import Engine
from engine.store.queries import Queryable

__all__ = ["DEMAND_KINDS", "FoldReport", "SessionStats", "fold", "record_demand", "stats",
           "totals"]

log = logging.getLogger("haoyuan.stats")

DEMAND_KINDS = ("tried", "refused", "joined")


async def record_demand(engine: Engine,
                        seen: Mapping[tuple[str, str], Iterable[str]]) -> int:
    """Add accounts to the demand sets: ``{(session_id, kind): accounts}``,
    in one pipeline. Sessions the engine does not know are skipped. Returns
    how many additions were sent."""
    pipe = engine.client.pipeline(transaction=False)
    sent = 0
    for (sid, kind), accounts in seen.items():
        if kind not in DEMAND_KINDS:
            raise ValueError(f"demand kind must be one of {DEMAND_KINDS}, not {kind!r}")
        members = sorted(set(accounts))
        ref = await engine.ref(sid) if members else None
        if ref is None:
            continue
        key = ref.keys.demand(kind)
        pipe.sadd(key, *members)
        pipe.sadd(ref.keys.part.demand_index, key)
        sent += len(members)
    if sent:
        await pipe.execute()
    return sent


class FoldReport(msgspec.Struct, frozen=True):
    demand_rows: int
    sold_out_sessions: int


async def fold(engine: Engine, db: Queryable, partitions: Sequence[int] | None = None
               ) -> FoldReport:
    """Move the demand sets and the sold-out instants of Redis into
    PostgreSQL (idempotent: a row is inserted once, a member leaves Redis
    only after its row is written)."""
    rows = 0
    parts = list(partitions if partitions is not None else range(K.PARTITIONS))
    pipe = engine.client.pipeline(transaction=False)
    for p in parts:
        pipe.smembers(K.PartitionKeys(p).demand_index)
    for p, index in zip(parts, await pipe.execute(), strict=True):
        pk = K.PartitionKeys(p)
        for raw in index:
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            # hy:{p<k>}:dm:<kind>:<sid>
            kind, _, sid = key.partition(":dm:")[2].partition(":")
            if kind not in DEMAND_KINDS or not sid:
                await engine.client.srem(pk.demand_index, raw)
                continue
            members = [m.decode() if isinstance(m, bytes) else str(m)
                       for m in await engine.client.smembers(key)]
            if members:
                await db.executemany(
                    "INSERT INTO demand (session_id, kind, account_id) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING", [(sid, kind, a) for a in members])
                await engine.client.srem(key, *members)
                rows += len(members)
            if not await engine.client.exists(key):
                await engine.client.srem(pk.demand_index, raw)
    # Sold-out instants of sessions released in the last week that have none yet.
    todo = await db.fetch(
        "SELECT id, partition FROM sessions WHERE sold_out_at IS NULL"
        " AND release_at <= now() AND date >= (now() - interval '7 days')::date")
    stamped = 0
    for r in todo:
        if partitions is not None and r["partition"] not in partitions:
            continue
        ms = await engine.client.hget(K.SessionKeys(r["partition"], r["id"]).meta, "soldout_ms")
        if ms is None:
            continue
        await db.execute("UPDATE sessions SET sold_out_at = $2 WHERE id = $1 AND"
                         " sold_out_at IS NULL", r["id"],
                         dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC))
        stamped += 1
    return FoldReport(rows, stamped)


class SessionStats(msgspec.Struct, kw_only=True):
    """One session's figures (see the module docstring)."""

    session_id: str
    hospital_id: str
    dept_id: str
    doctor_id: str
    date: str
    period: str
    released: int
    released_by_pool: dict[str, int]
    booked: int
    bookings: int
    sold_out_after_release_ms: int | None
    tried: int
    unmet_demand: int
    cancelled_in_time: int
    cancelled_late: int
    cancelled_other: int
    no_shows: int
    attended: int
    no_show_rate: float | None
    waitlist_joins: int
    waitlist_offers: int
    waitlist_conversions: int
    #: Bookings moved into this session by a reschedule (改约), and out of it.
    rescheduled_in: int
    rescheduled_out: int
    refunds: int
    his_rejections: int


_POOL_NAMES = {"1": "phone", "2": "window", "3": "referral"}
#: Figures that add up over sessions (the rest are recomputed).
_SUMMED = ("released", "booked", "bookings", "tried", "unmet_demand", "cancelled_in_time",
           "cancelled_late", "cancelled_other", "no_shows", "attended", "waitlist_joins",
           "waitlist_offers", "waitlist_conversions", "rescheduled_in", "rescheduled_out",
           "refunds", "his_rejections")


def _pools(spec: Any, caps: Mapping[str, int]) -> dict[str, int]:
    """Units per channel pool at release: each slot's pools, the rest public."""
    out: dict[str, int] = {"public": 0}
    slots = {}
    if isinstance(spec, str):
        spec = msgspec.json.decode(spec)
    if isinstance(spec, dict):
        slots = {s.get("slot_id"): s for s in spec.get("slots") or [] if isinstance(s, dict)}
    for slot_id, cap in caps.items():
        pooled = 0
        for ch, n in ((slots.get(slot_id) or {}).get("pools") or {}).items():
            name = _POOL_NAMES.get(str(ch), str(ch))
            out[name] = out.get(name, 0) + int(n)
            pooled += int(n)
        out["public"] += max(0, cap - pooled)
    return out


async def stats(db: Queryable, *, date_from: dt.date, date_to: dt.date,
                hospital: str | None = None) -> list[SessionStats]:
    """Every session of the days ``date_from`` .. ``date_to`` (of one hospital)."""
    sessions = await db.fetch(
        "SELECT s.id, s.hospital_id, s.dept_id, s.doctor_id, s.date, s.period, s.release_at,"
        " s.sold_out_at, s.spec FROM sessions s WHERE s.date BETWEEN $1 AND $2"
        " AND ($3::text IS NULL OR s.hospital_id = $3) ORDER BY s.date, s.dept_id,"
        " s.doctor_id, s.period", date_from, date_to, hospital)
    if not sessions:
        return []
    sids = [s["id"] for s in sessions]
    caps: dict[str, dict[str, int]] = {}
    for r in await db.fetch("SELECT session_id, slot_id, capacity FROM slots"
                            " WHERE session_id = ANY($1)", sids):
        caps.setdefault(r["session_id"], {})[r["slot_id"]] = r["capacity"]
    per: dict[str, dict[str, int]] = {sid: {} for sid in sids}

    def put(rows: Iterable[Any], name: str) -> None:
        for r in rows:
            per[r["session_id"]][name] = int(r["n"])

    put(await db.fetch(
        "SELECT session_id, count(*) FILTER (WHERE status = 'booked') AS n FROM bookings"
        " WHERE session_id = ANY($1) GROUP BY session_id", sids), "booked")
    put(await db.fetch(
        "SELECT b.session_id, count(DISTINCT b.id) AS n FROM bookings b JOIN booking_events e"
        " ON e.booking_id = b.id AND e.event_type = 'booked' WHERE b.session_id = ANY($1)"
        " GROUP BY b.session_id", sids), "bookings")
    for name, cond in (
            ("cancelled_in_time", "status = 'cancelled' AND status_reason = 'patient'"
                                  " AND NOT late_cancel"),
            ("cancelled_late", "status = 'cancelled' AND status_reason = 'patient'"
                               " AND late_cancel"),
            ("cancelled_other", "status IN ('cancelled', 'conflict')"
                                " AND status_reason IS DISTINCT FROM 'patient'"),
            ("no_shows", "attendance = 'no_show'"),
            ("attended", "attendance = 'attended'"),
            ("his_rejections", "his_status = 'rejected'"),
            ("rescheduled_in", "rescheduled_from IS NOT NULL"),
            ("rescheduled_out", "status = 'cancelled' AND status_reason = 'rescheduled'")):
        put(await db.fetch(
            f"SELECT session_id, count(*) AS n FROM bookings WHERE session_id = ANY($1)"
            f" AND {cond} GROUP BY session_id", sids), name)
    for kind, name in (("tried", "tried"), ("joined", "waitlist_joins")):
        put(await db.fetch(
            "SELECT session_id, count(*) AS n FROM demand WHERE session_id = ANY($1)"
            " AND kind = $2 GROUP BY session_id", sids, kind), name)
    # Told "sold out" and, at the end, no booking in that department-day.
    put(await db.fetch(
        "SELECT d.session_id, count(*) AS n FROM demand d JOIN sessions s ON s.id ="
        " d.session_id WHERE d.session_id = ANY($1) AND d.kind = 'refused' AND NOT EXISTS ("
        "  SELECT 1 FROM bookings b JOIN sessions t ON t.id = b.session_id"
        "  WHERE b.account_id = d.account_id AND b.status = 'booked'"
        "  AND t.dept_id = s.dept_id AND t.date = s.date) GROUP BY d.session_id", sids),
        "unmet_demand")
    # An offer is a hold made for the waitlist's head; it converted if that
    # hold became a booking.
    put(await db.fetch(
        "SELECT split_part(e.booking_id, '.', 2) AS session_id, count(DISTINCT e.booking_id)"
        " AS n FROM booking_events e WHERE e.event_type = 'waitlist_offer'"
        " AND split_part(e.booking_id, '.', 2) = ANY($1) GROUP BY 1", sids), "waitlist_offers")
    put(await db.fetch(
        "SELECT split_part(e.booking_id, '.', 2) AS session_id, count(DISTINCT e.booking_id)"
        " AS n FROM booking_events e JOIN booking_events b ON b.booking_id = e.booking_id"
        " AND b.event_type = 'booked' WHERE e.event_type = 'waitlist_offer'"
        " AND split_part(e.booking_id, '.', 2) = ANY($1) GROUP BY 1", sids),
        "waitlist_conversions")
    put(await db.fetch(
        "SELECT b.session_id, count(*) AS n FROM refund_orders o JOIN bookings b ON b.id ="
        " o.booking_id WHERE b.session_id = ANY($1) GROUP BY b.session_id", sids), "refunds")
    out = []
    for s in sessions:
        f = per[s["id"]]
        c = caps.get(s["id"], {})
        known = f.get("no_shows", 0) + f.get("attended", 0)
        sold = (int((s["sold_out_at"] - s["release_at"]).total_seconds() * 1000)
                if s["sold_out_at"] is not None else None)
        out.append(SessionStats(
            session_id=s["id"], hospital_id=s["hospital_id"], dept_id=s["dept_id"],
            doctor_id=s["doctor_id"], date=s["date"].isoformat(), period=s["period"],
            released=sum(c.values()), released_by_pool=_pools(s["spec"], c),
            sold_out_after_release_ms=sold,
            no_show_rate=round(f.get("no_shows", 0) / known, 4) if known else None,
            **{k: f.get(k, 0) for k in _SUMMED if k != "released"}))
    return out


def totals(rows: Sequence[SessionStats], by: Sequence[str]) -> list[dict[str, Any]]:
    """The figures summed by ``by`` (e.g. ``("date", "dept_id")``); the
    no-show rate over the group, the slowest sell-out of the group."""
    groups: dict[tuple[Any, ...], list[SessionStats]] = {}
    for r in rows:
        groups.setdefault(tuple(getattr(r, k) for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(by, key, strict=True))
        row["sessions"] = len(rs)
        for k in _SUMMED:
            row[k] = sum(getattr(r, k) for r in rs)
        pools: dict[str, int] = {}
        for r in rs:
            for p, n in r.released_by_pool.items():
                pools[p] = pools.get(p, 0) + n
        row["released_by_pool"] = pools
        known = row["no_shows"] + row["attended"]
        row["no_show_rate"] = round(row["no_shows"] / known, 4) if known else None
        sold = [r.sold_out_after_release_ms for r in rs]
        row["sold_out_after_release_ms"] = (max(x for x in sold if x is not None)
                                            if all(x is not None for x in sold) else None)
        out.append(row)
    return out
