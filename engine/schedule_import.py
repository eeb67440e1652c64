"""Schedule import: sessions into PostgreSQL (the record) and the engine (Redis).

Sources: a JSON file (a list of :class:`~engine.model.SessionSpec`) or the
HIS (``HisClient.fetch_schedules``). Importing is idempotent: PostgreSQL rows
are upserted (``upsert_schedule`` never deletes), and the engine's
``loadSession`` script never resets the live inventory of a session it
already holds (holds and bookings stay on their units).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from engine.engine import Engine
from engine.his.base import HisClient, HisSchedule
from engine.keys import partition_of
from engine.model import SessionSpec
from engine.outcomes import Loaded
from engine.recovery import import_epochs
from engine.rules import HospitalRules, load_rules
from engine.store.queries import StoredSession, upsert_schedule

__all__ = [
    "CST",
    "ImportReport",
    "ScheduleFileError",
    "example_file",
    "fetch_from_his",
    "import_loaded",
    "import_sessions",
    "load_json_file",
    "spec_from_his",
]

#: China Standard Time (no daylight saving).
CST = dt.timezone(dt.timedelta(hours=8))


class ImportReport(msgspec.Struct, frozen=True):
    #: Sessions written (PostgreSQL and engine).
    sessions: int
    #: Sessions the engine did not have before.
    created: list[str]
    #: Sessions the engine already had (inventory kept).
    existing: list[str]
    slots: int
    capacity: int
    #: Sessions loaded into a partition that lost its data in Redis: they do
    #: not sell until ``haoyuan rebuild`` (engine.recovery).
    recovering: list[str] = []


class ScheduleFileError(ValueError):
    """A schedule file that cannot be read or does not validate."""


async def import_loaded(engine: Engine, pool: Any, specs: Sequence[SessionSpec]) -> list[Loaded]:
    """Record the sessions in PostgreSQL (one transaction), then load each into
    the engine; a partition opens only if it is new or whole
    (``engine.recovery.import_epochs``). The one import path: the CLI, the
    admin API and the scheduler all come here.

    Raises ``ValueError`` on duplicate session ids and
    ``engine.store.queries.ScheduleConflict`` if a session would move to
    another department, doctor or date (nothing is written then).
    """
    ids = [s.session_id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate session ids: {', '.join(dupes)}")
    if not specs:
        return []
    specs = await with_patient_rules(pool, specs)
    async with pool.acquire() as conn:
        await upsert_schedule(conn, [StoredSession.from_spec(s) for s in specs])
    epochs = await import_epochs(engine, pool, {partition_of(s.dept, s.date) for s in specs})
    loaded: list[Loaded] = []
    for spec in specs:
        epoch = epochs[partition_of(spec.dept, spec.date)]
        loaded.append(await engine.load_session(spec, open_partition=epoch is not None,
                                                epoch=epoch))
    return loaded


async def with_patient_rules(pool: Any, specs: Sequence[SessionSpec]) -> list[SessionSpec]:
    """The hospital's patient-wide limit (``Rules.max_active_per_patient``)
    on every session that does not set its own: a rule a hospital configured
    is in force whether or not the import applies the rest of its rules
    (release calendar, pools, ...: ``engine.rules.apply_rules``)."""
    per_hospital: dict[str, HospitalRules] = {}
    out: list[SessionSpec] = []
    for s in specs:
        if s.max_active_per_patient == 0:
            if s.hospital not in per_hospital:
                per_hospital[s.hospital] = await load_rules(pool, s.hospital)
            limit = per_hospital[s.hospital].for_dept(s.dept).max_active_per_patient
            if limit:
                s = msgspec.structs.replace(s, max_active_per_patient=limit)
        out.append(s)
    return out


async def import_sessions(engine: Engine, pool: Any, specs: Sequence[SessionSpec]) -> ImportReport:
    """``import_loaded``, summed up."""
    loaded = await import_loaded(engine, pool, specs)
    return ImportReport(
        sessions=len(specs),
        created=[x.session_id for x in loaded if x.created],
        existing=[x.session_id for x in loaded if not x.created],
        slots=sum(len(s.slots) for s in specs),
        capacity=sum(s.capacity for s in specs),
        recovering=[x.session_id for x in loaded if not x.open],
    )


def example_file() -> Path:
    """The documented example of a sessions file (``examples/sessions.json`` in
    a checkout, ``engine/examples/sessions.json`` in an installed wheel)."""
    packaged = resources.files("engine").joinpath("examples", "sessions.json")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "examples" / "sessions.json"


def load_json_file(path: str | Path) -> list[SessionSpec]:
    """A JSON file holding a list of sessions, validated.

    Raises :class:`ScheduleFileError` naming the file and the offending field
    (e.g. ``$[0].slots[1].start``).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ScheduleFileError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        specs = msgspec.json.decode(raw, type=list[SessionSpec])
    except msgspec.ValidationError as exc:
        raise ScheduleFileError(f"{p}: invalid schedule: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ScheduleFileError(f"{p}: not valid JSON: {exc}") from None
    ids = [s.session_id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ScheduleFileError(f"{p}: duplicate session ids: {', '.join(dupes)}")
    return specs


def _local(value: str, tz: dt.tzinfo) -> dt.datetime:
    t = dt.datetime.fromisoformat(value)
    return t.replace(tzinfo=tz) if t.tzinfo is None else t.astimezone(tz)


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def spec_from_his(
    s: HisSchedule,
    *,
    release_days_ahead: int = 7,
    release_hour: int = 7,
    hold_ttl_ms: int = 600_000,
    tz: dt.tzinfo = CST,
) -> SessionSpec:
    """One HIS session as a ``SessionSpec``.

    Release: ``release_days_ahead`` days before the session date at
    ``release_hour``:00 in ``tz``; ``starts_ms``: the first slot's start.
    Raises ``ValueError`` (``msgspec.ValidationError``) if the HIS data does
    not fit (no slots, ids or times out of pattern).
    """
    day = dt.date.fromisoformat(s.date)
    release = dt.datetime.combine(
        day - dt.timedelta(days=release_days_ahead), dt.time(release_hour), tzinfo=tz
    )
    slots = []
    starts: list[dt.datetime] = []
    for x in s.slots:
        start, end = _local(x.start, tz), _local(x.end, tz)
        starts.append(start)
        slots.append({"slot_id": x.id, "start": start.strftime("%H:%M"),
                      "end": end.strftime("%H:%M"), "capacity": x.capacity})
    data = {
        "session_id": s.session_id,
        "hospital": s.hospital_id,
        "dept": s.dept_id,
        "doctor": s.doctor_id,
        "date": s.date,
        "period": s.period,
        "fee": s.fee,
        "release_at_ms": _ms(release),
        "starts_ms": _ms(min(starts)) if starts else 0,
        "hold_ttl_ms": hold_ttl_ms,
        "slots": slots,
    }
    try:
        return msgspec.convert(data, SessionSpec)
    except msgspec.ValidationError as exc:
        raise msgspec.ValidationError(f"HIS session {s.session_id}: {exc}") from None


async def fetch_from_his(
    his: HisClient,
    start_date: str,
    end_date: str,
    *,
    release_days_ahead: int = 7,
    release_hour: int = 7,
    hold_ttl_ms: int = 600_000,
    tz: dt.tzinfo = CST,
) -> list[SessionSpec]:
    """The HIS's active sessions dated within ``[start_date, end_date]`` as specs.

    Sessions the HIS withdrew (``active`` false, 停诊) and sessions without
    slots are left out: suspending a loaded session is ``Engine.suspend``'s job.
    """
    schedules = await his.fetch_schedules(start_date, end_date)
    return [
        spec_from_his(s, release_days_ahead=release_days_ahead, release_hour=release_hour,
                      hold_ttl_ms=hold_ttl_ms, tz=tz)
        for s in schedules
        if s.active and s.slots
    ]
