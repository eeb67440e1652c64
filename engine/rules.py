"""Hospital rules: configuration per hospital, overridable per department.

Each rule that gates a decision is enforced inside the atomic script of the
decision (the values land in the session hash in Redis); this module turns
a hospital's published rules into those values:

- release calendar: sessions open N days ahead at a local hour, booking stops
  at a cut-off (e.g. 17:00 the day before), booking closed at night;
- one per patient per department-day (or doctor-day); at most N active
  bookings per patient across the hospital (the session carries it,
  ``SessionSpec.max_active_per_patient``; checked on the patient's own
  partition by ``reservePatient``);
- channel pools (号源池) with shares and a return time before the session;
- waitlist (候补) size and payment window; anti-scalper re-release window;
- cancellation deadline per session kind (expert, general, ...);
- the no-show policy: N no-shows (or late cancels) in a window ban booking
  for a period (``record_attendance``, ``check_ban``, ``lift_ban``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from engine.model import Kind, Name, PoolName, SessionSpec, SlotSpec

Clock = Annotated[str, msgspec.Meta(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
Share = Annotated[float, msgspec.Meta(ge=0, le=1)]
DAY_MS = 86_400_000
#: Upper bounds keep every value inside PostgreSQL's integer and interval
#: types (``make_interval(days => n)`` takes an int4) and inside reason.
Days = Annotated[int, msgspec.Meta(ge=1, le=3650)]
SpanMs = Annotated[int, msgspec.Meta(ge=0, le=365 * DAY_MS)]


class Rules(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    release_days_ahead: Annotated[int, msgspec.Meta(ge=0, le=90)] = 7
    release_time: Clock = "07:00"
    cutoff_days_before: Annotated[int, msgspec.Meta(ge=0, le=30)] = 1
    cutoff_time: Clock = "17:00"
    night_from: Clock = "23:00"
    night_to: Clock = "06:00"
    tz_min: Annotated[int, msgspec.Meta(ge=-720, le=840)] = 480
    hold_ttl_ms: Annotated[int, msgspec.Meta(ge=1000, le=DAY_MS)] = 600_000
    scope: Literal["dept", "doctor"] = "dept"
    max_active_per_patient: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    cancel_before_ms: Annotated[dict[Kind, SpanMs], msgspec.Meta(max_length=32)] = (
        msgspec.field(default_factory=lambda: {"expert": 12 * 3_600_000, "general": 30 * 60_000}))
    pools: dict[PoolName, Share] = {}
    pool_return_before_ms: SpanMs = DAY_MS
    waitlist_max: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    waitlist_ttl_ms: Annotated[int, msgspec.Meta(ge=0, le=DAY_MS)] = 30 * 60_000
    rerelease_window_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0
    no_show_limit: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3
    no_show_window_days: Days = 90
    ban_days: Days = 90
    late_cancels_count: bool = True
    #: How often one booking may be rescheduled (改约); 0 = no limit.
    max_reschedules: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0


class HospitalRules(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A hospital's rules and the departments' overrides (partial objects)."""

    default: Rules = msgspec.field(default_factory=Rules)
    departments: Annotated[dict[Name, dict[str, Any]], msgspec.Meta(max_length=1000)] = {}

    def for_dept(self, dept: str) -> Rules:
        override = self.departments.get(dept)
        if not override:
            return self.default
        merged = msgspec.structs.asdict(self.default) | override
        return msgspec.convert(merged, Rules)


def _minutes(clock: str) -> int:
    h, m = clock.split(":")
    return int(h) * 60 + int(m)


def local_instant_ms(date: str, clock: str, tz_min: int, days_before: int = 0) -> int:
    day = dt.date.fromisoformat(date) - dt.timedelta(days=days_before)
    tz = dt.timezone(dt.timedelta(minutes=tz_min))
    hh, mm = clock.split(":")
    t = dt.datetime.combine(day, dt.time(int(hh), int(mm)), tz)
    return int(t.timestamp() * 1000)


def apply_rules(base: SessionSpec, rules: Rules) -> SessionSpec:
    """The session as the hospital's rules say it is sold."""
    release = local_instant_ms(base.date, rules.release_time, rules.tz_min,
                               rules.release_days_ahead)
    cutoff = local_instant_ms(base.date, rules.cutoff_time, rules.tz_min,
                              rules.cutoff_days_before)
    starts = base.starts_ms or local_instant_ms(base.date, base.slots[0].start, rules.tz_min)
    slots = []
    for s in base.slots:
        pools: dict[PoolName, int] = {}
        left = s.capacity
        for name, share in rules.pools.items():
            n = min(left, int(s.capacity * share))
            if n:
                pools[name] = n
                left -= n
        slots.append(SlotSpec(slot_id=s.slot_id, start=s.start, end=s.end,
                              capacity=s.capacity, pools=pools or s.pools))
    cancel = rules.cancel_before_ms.get(base.kind, rules.cancel_before_ms.get("general", 0))
    return msgspec.structs.replace(
        base,
        release_at_ms=release,
        cutoff_ms=cutoff if cutoff > release else 0,
        starts_ms=starts,
        hold_ttl_ms=rules.hold_ttl_ms,
        scope=rules.scope,
        cancel_before_ms=cancel,
        slots=slots,
        pool_return_ms=max(release, starts - rules.pool_return_before_ms) if rules.pools else 0,
        waitlist_max=rules.waitlist_max,
        waitlist_ttl_ms=rules.waitlist_ttl_ms if rules.waitlist_max else 0,
        rerelease_ms=rules.rerelease_window_ms,
        night_from_min=_minutes(rules.night_from),
        night_to_min=_minutes(rules.night_to),
        tz_min=rules.tz_min,
        max_active_per_patient=rules.max_active_per_patient,
    )


# -- the no-show policy (PostgreSQL is the record; the ban lands in Redis) ---------


class AttendanceResult(msgspec.Struct, frozen=True):
    booking_id: str
    attendance: str
    strikes: int
    banned_until_ms: int | None


async def record_attendance(pool: Any, engine: Any, booking_id: str, attended: bool,
                            rules: Rules) -> AttendanceResult | None:
    """Mark a booking attended or no-show (from HIS or an admin); a no-show
    may ban the patient. None if the booking is unknown or not booked.

    One transaction: the attendance, the count of strikes and the ban are
    written together or not at all; the ban then lands in Redis (a retry
    after a failure there finds the ban and lands it again)."""
    status = "attended" if attended else "no_show"
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE bookings SET attendance = $2, attendance_at = now() WHERE id = $1"
            " AND status = 'booked' RETURNING patient_ref", booking_id, status)
        if row is None:
            return None
        patient = row["patient_ref"]
        strikes, until = await _strikes_and_ban(conn, patient, rules)
    if until is not None:
        await engine.ban(patient, until)
    return AttendanceResult(booking_id, status, strikes, until)


async def check_ban(pool: Any, engine: Any, patient_ref: str, rules: Rules
                    ) -> tuple[int, int | None]:
    """Count the patient's strikes in the window; ban when they reach the limit."""
    async with pool.acquire() as conn, conn.transaction():
        strikes, until = await _strikes_and_ban(conn, patient_ref, rules)
    if until is not None:
        await engine.ban(patient_ref, until)
    return strikes, until


async def _strikes_and_ban(conn: Any, patient_ref: str, rules: Rules
                           ) -> tuple[int, int | None]:
    """The strikes in the window, and the ban (epoch ms) they lead to, written
    in the caller's transaction; None when there is no ban."""
    if rules.no_show_limit <= 0:
        return 0, None
    strikes = await conn.fetchval(
        "SELECT count(*) FROM bookings WHERE patient_ref = $1 AND ("
        " (attendance = 'no_show' AND attendance_at > now() - make_interval(days => $2))"
        " OR ($3 AND late_cancel AND cancelled_at > now() - make_interval(days => $2)))",
        patient_ref, rules.no_show_window_days, rules.late_cancels_count)
    if strikes < rules.no_show_limit:
        return int(strikes), None
    active = await conn.fetchval(
        "SELECT banned_until FROM patient_bans WHERE patient_ref = $1 AND lifted_at IS NULL"
        " AND banned_until > now() ORDER BY banned_until DESC LIMIT 1", patient_ref)
    if active is None:
        active = await conn.fetchval(
            "INSERT INTO patient_bans (patient_ref, banned_until, reason) VALUES"
            " ($1, now() + make_interval(days => $2), $3) RETURNING banned_until",
            patient_ref, rules.ban_days,
            f"{strikes} no-shows or late cancels in {rules.no_show_window_days} days")
    return int(strikes), int(active.timestamp() * 1000)


async def lift_ban(pool: Any, engine: Any, patient_ref: str, admin: str) -> int:
    """An admin lifts a patient's ban. Returns how many bans were lifted."""
    res = await pool.execute(
        "UPDATE patient_bans SET lifted_at = now(), lifted_by = $2 WHERE patient_ref = $1"
        " AND lifted_at IS NULL", patient_ref, admin)
    await engine.ban(patient_ref, 0)
    return int(res.split()[-1])


async def load_rules(pool: Any, hospital: str) -> HospitalRules:
    rows = await pool.fetch("SELECT dept_id, rules FROM hospital_rules WHERE hospital_id = $1",
                            hospital)
    out = HospitalRules()
    for r in rows:
        doc = msgspec.json.decode(r["rules"]) if isinstance(r["rules"], str | bytes) else r["rules"]
        if r["dept_id"] == "":
            out.default = msgspec.convert(doc, Rules)
        else:
            out.departments[r["dept_id"]] = doc
    return out


async def save_rules(pool: Any, hospital: str, rules: HospitalRules) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM hospital_rules WHERE hospital_id = $1", hospital)
        await conn.execute(
            "INSERT INTO hospital_rules (hospital_id, dept_id, rules) VALUES ($1, '', $2)",
            hospital, msgspec.json.encode(rules.default).decode())
        for dept, doc in rules.departments.items():
            msgspec.convert(msgspec.structs.asdict(rules.default) | doc, Rules)  # validates
            await conn.execute(
                "INSERT INTO hospital_rules (hospital_id, dept_id, rules) VALUES ($1, $2, $3)",
                hospital, dept, msgspec.json.encode(doc).decode())
