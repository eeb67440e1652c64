"""Changes made in the HIS, back into the engine.

A cancel at the hospital's window or by phone, a 停诊 entered in the HIS, a
patient who arrived or did not come: the HIS's change feed (FHIR search on
``_lastUpdated`` after a stored cursor, Schedules first, then Appointments)
is read by :class:`HisInbound`, at least every ``interval_s`` and at once
when the HIS pushes a Subscription notification (``POST /v1/his/notify``
only wakes the poller: the search is the truth, so lost, repeated or
reordered notifications change nothing).

Idempotent: the cursor re-reads ``overlap_s`` behind the newest change seen
(commits may become visible out of order), and every change applied is
remembered by (resource, id, version) in ``his_changes``; applying one twice
does nothing anyway:

- an Appointment ``cancelled`` (or ``entered-in-error``) in the HIS whose
  booking is still booked here is cancelled in the engine (``force``, reason
  ``his_cancelled``): its unit returns atomically, to the waitlist's head
  first, and the writer refunds it; its ``his_status`` is ``cancelled`` already,
  so nothing is sent back. A cancel coded ``doctor_stopped`` suspends the
  whole session;
- a Schedule turned inactive (停诊) suspends the session (every booking
  cancelled and refunded);
- ``noshow`` feeds the no-show rule (``engine.rules.record_attendance``);
  ``arrived``, ``checked-in`` and ``fulfilled`` mark the visit attended.

A session the HIS makes active again is not reopened here (an operator
resumes it: its patients were refunded).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import msgspec

from engine.engine import Engine
from engine.his.base import HisChange, HisClient, HisUnavailable
from engine.outcomes import Reason, Refused
from engine.store import queries as q

__all__ = ["HisInbound", "InboundConfig", "InboundReport", "RecoveringError"]

log = logging.getLogger("haoyuan.his_inbound")

Resource = Literal["Appointment", "Schedule"]


@dataclass(slots=True)
class InboundConfig:
    #: Poll at least this often (s), notifications or not.
    interval_s: float = 30.0
    #: Re-read this far behind the newest change seen (s).
    overlap_s: float = 5.0


class RecoveringError(RuntimeError):
    """A change cannot be applied while Redis rebuilds: the poll stops there
    (the cursor stays) and is tried again."""


class InboundReport(msgspec.Struct):
    seen: int = 0
    applied: int = 0
    cancelled: int = 0
    suspended: int = 0
    no_shows: int = 0
    attended: int = 0


class HisInbound:
    def __init__(self, engine: Engine, pool: asyncpg.Pool, his: HisClient,
                 config: InboundConfig | None = None) -> None:
        self.engine = engine
        self.pool = pool
        self.his = his
        self.config = config or InboundConfig()
        self.total = InboundReport()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``: after every notification, else every ``interval_s``."""
        backoff = 0.5
        while not stop.is_set():
            try:
                await self.poll_once()
                backoff = 0.5
                await self._wait(stop)
            except (HisUnavailable, RecoveringError) as exc:
                log.warning("his inbound: %s; retrying", exc)
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("his inbound: poll failed")
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 30.0)

    async def _wait(self, stop: asyncio.Event) -> None:
        end = asyncio.get_running_loop().time() + self.config.interval_s
        while not stop.is_set():
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                return
            if await self.engine.wait_his_poke(min(left, 1.0)):
                return

    async def poll_once(self) -> InboundReport:
        """Read and apply every change since the cursors (Schedules first)."""
        report = InboundReport()
        resources: tuple[Resource, ...] = ("Schedule", "Appointment")
        for resource in resources:
            await self._poll(resource, report)
        for f in report.__struct_fields__:
            setattr(self.total, f, getattr(self.total, f) + getattr(report, f))
        return report

    async def _poll(self, resource: Resource, report: InboundReport) -> None:
        cursor = await self.pool.fetchval("SELECT cursor FROM his_sync WHERE resource = $1",
                                          resource) or ""
        changes = await self.his.changes(resource, _behind(cursor, self.config.overlap_s))
        newest = cursor
        for c in changes:
            report.seen += 1
            if _later(c.last_updated, newest):
                newest = c.last_updated
            if await self.pool.fetchval(
                    "SELECT true FROM his_changes WHERE resource = $1 AND his_id = $2"
                    " AND version = $3", resource, c.his_id, c.version):
                continue
            action = await self._apply(c, report)
            await self.pool.execute(
                "INSERT INTO his_changes (resource, his_id, version, booking_id, status, action)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                resource, c.his_id, c.version, c.booking_id or c.session_id, c.status, action)
            if action not in ("none", "not_ours", "already"):
                report.applied += 1
        await self.pool.execute(
            "INSERT INTO his_sync (resource, cursor, polled_at, changes_seen) VALUES"
            " ($1, $2, now(), $3) ON CONFLICT (resource) DO UPDATE SET cursor = $2,"
            " polled_at = now(), changes_seen = his_sync.changes_seen + $3",
            resource, newest, len(changes))

    # -- applying one change -----------------------------------------------------------
    async def _apply(self, c: HisChange, report: InboundReport) -> str:
        if c.resource == "Schedule":
            if c.status != "inactive" or not c.session_id:
                return "none"
            return await self._suspend(c.session_id, report)
        if not c.booking_id:
            return "not_ours"
        row = await self.pool.fetchrow(
            "SELECT b.status, b.his_status, b.session_id, s.hospital_id, s.dept_id"
            " FROM bookings b LEFT JOIN sessions s ON s.id = b.session_id WHERE b.id = $1",
            c.booking_id)
        if c.status in ("cancelled", "entered-in-error"):
            if c.reason == "doctor_stopped":
                sid = row["session_id"] if row is not None else _session_of(c.booking_id)
                return await self._suspend(sid, report) if sid else "none"
            return await self._cancel(c, row, report)
        if c.status == "noshow":
            return await self._attendance(c.booking_id, row, False, report)
        if c.status in ("arrived", "checked-in", "fulfilled"):
            return await self._attendance(c.booking_id, row, True, report)
        return "none"

    async def _cancel(self, c: HisChange, row: Any, report: InboundReport) -> str:
        booking = c.booking_id or ""
        if row is not None and (row["status"] != "booked" or row["his_status"] in (
                "cancel_pending", "cancelled")):
            return "already"
        # The HIS has it cancelled: nothing to send back (the writer keeps it so).
        await self.pool.execute(
            "UPDATE bookings SET his_status = 'cancelled', his_id = coalesce(his_id, $2),"
            " his_reason = $3 WHERE id = $1 AND status = 'booked'",
            booking, c.his_id, f"his:{c.reason or 'cancelled'}"[:200])
        res = await self.engine.cancel(booking, reason="his_cancelled", force=True)
        if isinstance(res, Refused) and res.reason is Reason.RECOVERING:
            # Redis is being rebuilt: this change must not be passed over.
            raise RecoveringError(f"booking {booking}'s partition is recovering")
        if not res.ok:
            log.warning("his inbound: cancelling booking %s in the engine: %s", booking,
                        getattr(res, "reason", "?"))
            return "engine_refused"
        if getattr(res, "replay", False):
            return "already"
        report.cancelled += 1
        log.info("his inbound: booking %s cancelled in the HIS (%s): unit returned, refund due",
                 booking, c.reason)
        return "cancelled"

    async def _suspend(self, session_id: str, report: InboundReport) -> str:
        status = await self.engine.session_status(session_id)
        if status is None:
            if await self.pool.fetchval("SELECT true FROM sessions WHERE id = $1", session_id):
                # Ours, but Redis lost it (a rebuild brings it back): retry, never skip.
                raise RecoveringError(f"session {session_id} is not in Redis (recovering)")
            return "not_ours"
        if status == "suspended":
            return "already"
        res = await self.engine.suspend(session_id, "his_suspended")
        if not res.ok:
            return "engine_refused"
        await q.set_session_status(self.pool, session_id, "suspended")
        report.suspended += 1
        log.warning("his inbound: session %s stopped in the HIS (停诊): suspended", session_id)
        return "suspended"

    async def _attendance(self, booking: str, row: Any, attended: bool,
                          report: InboundReport) -> str:
        from engine.rules import Rules, load_rules, record_attendance

        if row is None or row["status"] != "booked":
            return "none"
        rules = Rules()
        if row["hospital_id"] is not None:
            rules = (await load_rules(self.pool, row["hospital_id"])).for_dept(row["dept_id"])
        got = await record_attendance(self.pool, self.engine, booking, attended, rules)
        if got is None:
            return "none"
        if attended:
            report.attended += 1
            return "attended"
        report.no_shows += 1
        return "no_show"


def _session_of(booking_id: str) -> str:
    parts = booking_id.split(".")
    return parts[1] if len(parts) == 3 else ""


def _parse(value: str) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _later(a: str, b: str) -> bool:
    ta, tb = _parse(a), _parse(b)
    if ta is None:
        return False
    return tb is None or ta > tb


def _behind(cursor: str, seconds: float) -> str:
    t = _parse(cursor)
    return "" if t is None else (t - dt.timedelta(seconds=seconds)).astimezone(
        dt.UTC).isoformat()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
