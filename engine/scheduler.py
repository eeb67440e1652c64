"""The release scheduler: keeps the engine's schedule ahead of the release
calendar by itself.

Every ``interval_s`` it fetches the HIS's sessions (FHIR ``Schedule`` and
``Slot``) for the days that the hospital's rules will release soon, applies
the rules (release instant, cut-off, pools, waitlist, deadlines: see
engine.rules) and imports them idempotently (re-import never resets live
inventory). Sessions the HIS withdrew (停诊) and that are loaded are
suspended in the engine, so their bookings are cancelled with the reason.
The release itself needs no timer: the hold script refuses before the
release instant and sells from it on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import msgspec

from engine.engine import Engine
from engine.his.base import HisClient
from engine.rules import HospitalRules, apply_rules, load_rules
from engine.schedule_import import CST, import_sessions, spec_from_his

log = logging.getLogger("haoyuan.scheduler")


class ScheduleReport(msgspec.Struct, frozen=True):
    window: tuple[str, str]
    imported: list[str]
    created: list[str]
    suspended: list[str]
    skipped: list[str]


async def schedule_once(engine: Engine, pool: Any, his: HisClient, *,
                        today: dt.date | None = None, horizon_days: int | None = None
                        ) -> ScheduleReport:
    """One pass: import what the rules release within the horizon."""
    today = today or dt.datetime.now(CST).date()
    rules_cache: dict[str, HospitalRules] = {}

    async def rules_of(hospital: str) -> HospitalRules:
        if hospital not in rules_cache:
            rules_cache[hospital] = await load_rules(pool, hospital)
        return rules_cache[hospital]

    # Far enough ahead for the longest release calendar (plus a day of margin).
    horizon = horizon_days or 29
    start, end = (today + dt.timedelta(days=1)).isoformat(), (
        today + dt.timedelta(days=horizon)).isoformat()
    schedules = await his.fetch_schedules(start, end)
    specs, suspended, skipped = [], [], []
    for s in schedules:
        rules = (await rules_of(s.hospital_id)).for_dept(s.dept_id)
        if not s.active:
            ref = await engine.ref(s.session_id)
            if ref is not None:
                r = await engine.suspend(s.session_id, "his_withdrawn")
                if r.ok:
                    suspended.append(s.session_id)
            continue
        days_ahead = (dt.date.fromisoformat(s.date) - today).days
        if not s.slots or days_ahead > rules.release_days_ahead + 1:
            skipped.append(s.session_id)
            continue
        try:
            base = spec_from_his(s, hold_ttl_ms=rules.hold_ttl_ms)
        except ValueError as exc:
            log.error("scheduler: HIS session %s does not fit: %s", s.session_id, exc)
            skipped.append(s.session_id)
            continue
        specs.append(apply_rules(base, rules))
    report = await import_sessions(engine, pool, specs) if specs else None
    return ScheduleReport(
        window=(start, end), imported=[s.session_id for s in specs],
        created=list(report.created) if report else [], suspended=suspended, skipped=skipped)


async def run_scheduler(engine: Engine, pool: Any, his: HisClient, stop: asyncio.Event, *,
                        interval_s: float = 600.0) -> None:
    """Pass after pass until ``stop``; a failed pass is logged and retried."""
    while not stop.is_set():
        try:
            r = await schedule_once(engine, pool, his)
            log.info("scheduler: %d sessions imported (%d new), %d suspended, window %s..%s",
                     len(r.imported), len(r.created), len(r.suspended), *r.window)
        except Exception:
            log.exception("scheduler pass failed; retrying")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
