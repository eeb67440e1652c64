"""Schedule import: JSON file and HIS into PostgreSQL and the engine."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from engine import Booked, Engine, Held
from engine.his import FhirHisClient, HisSchedule, HisSlot
from engine.schedule_import import (
    CST,
    ScheduleFileError,
    fetch_from_his,
    import_sessions,
    load_json_file,
)
from engine.testing.his_simulator import SimConfig, SimulatorProcess
from tests.enginekit import make_spec


@pytest.fixture
def db(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    return db_pool


@pytest.fixture
def eng(engine_on_fresh_redis: Engine) -> Engine:
    return engine_on_fresh_redis


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(SimConfig()) as proc:
        yield proc


def write(tmp_path: Path, data: Any) -> Path:
    p = tmp_path / "sessions.json"
    p.write_bytes(data if isinstance(data, bytes) else msgspec.json.encode(data))
    return p


async def test_json_file_into_pg_and_engine(
    eng: Engine, db: asyncpg.Pool, tmp_path: Path
) -> None:
    specs = [make_spec("S1", caps=(3, 2)), make_spec("S2", doctor="DR2", caps=(4,))]
    loaded = load_json_file(write(tmp_path, specs))
    assert loaded == specs
    report = await import_sessions(eng, db, loaded)
    assert report.sessions == 2 and report.created == ["S1", "S2"] and report.existing == []
    assert report.slots == 3 and report.capacity == 9
    rows = await db.fetch("SELECT id, doctor_id, date, status FROM sessions ORDER BY id")
    assert [(r["id"], r["doctor_id"], r["date"], r["status"]) for r in rows] == [
        ("S1", "DR1", dt.date(2026, 12, 1), "open"),
        ("S2", "DR2", dt.date(2026, 12, 1), "open"),
    ]
    slots = await db.fetch(
        "SELECT session_id, slot_id, start_time, capacity FROM slots ORDER BY 1, 2")
    assert [(s["session_id"], s["slot_id"], s["start_time"], s["capacity"]) for s in slots] == [
        ("S1", "0800", dt.time(8, 0), 3),
        ("S1", "0830", dt.time(8, 30), 2),
        ("S2", "0800", dt.time(8, 0), 4),
    ]
    for sid, cap in (("S1", 5), ("S2", 4)):
        av = await eng.availability(sid)
        assert av is not None and sum(s.free for s in av.slots) == cap


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[{", "not valid JSON"),
        (b"{}", "Expected `array`"),
        (msgspec.json.encode([{**msgspec.to_builtins(make_spec("S1")),
                               "slots": [{"slot_id": "a", "start": "8:00", "end": "09:00",
                                          "capacity": 1}]}]),
         "$[0].slots[0].start"),
        (msgspec.json.encode([make_spec("S1"), make_spec("S1")]), "duplicate session ids: S1"),
    ],
)
def test_bad_json_file_errors_are_clear(tmp_path: Path, content: bytes, needle: str) -> None:
    with pytest.raises(ScheduleFileError) as err:
        load_json_file(write(tmp_path, content))
    assert needle in str(err.value) and "sessions.json" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScheduleFileError, match="cannot read"):
        load_json_file(tmp_path / "nope.json")


async def test_reimport_keeps_holds_and_bookings(eng: Engine, db: asyncpg.Pool) -> None:
    spec = make_spec("S1", caps=(3, 2))
    await import_sessions(eng, db, [spec])
    h1 = await eng.hold("S1", "0800", patient="p1", account="a1")
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h1, Held) and isinstance(h2, Held)
    assert isinstance(await eng.confirm(h1.hold_id, "pay1"), Booked)
    before = await eng.audit("S1")
    assert before.ok and (before.held, before.booked, before.free) == (1, 1, 3)
    report = await import_sessions(eng, db, [spec])
    assert report.created == [] and report.existing == ["S1"]
    after = await eng.audit("S1")
    assert after.ok
    assert (after.held, after.booked, after.free, after.capacity) == (1, 1, 3, 5)
    assert after.booked_units == before.booked_units
    assert await db.fetchval("SELECT count(*) FROM sessions") == 1
    assert await db.fetchval("SELECT count(*) FROM slots") == 2


async def test_duplicate_ids_refused(eng: Engine, db: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        await import_sessions(eng, db, [make_spec("S1"), make_spec("S1")])
    assert await db.fetchval("SELECT count(*) FROM sessions") == 0


def his_schedule(sid: str, date: str, *, doctor: str = "DR1", active: bool = True,
                 period: str = "AM") -> HisSchedule:
    h0 = 8 if period == "AM" else 14
    return HisSchedule(
        session_id=sid, hospital_id="H1", dept_id="D01", doctor_id=doctor, date=date,
        period="AM" if period == "AM" else "PM", fee=5000, active=active,
        slots=(
            HisSlot(id=f"{h0:02d}00", start=f"{date}T{h0:02d}:00:00",
                    end=f"{date}T{h0:02d}:30:00", capacity=4),
            HisSlot(id=f"{h0:02d}30", start=f"{date}T{h0:02d}:30:00",
                    end=f"{date}T{h0 + 1:02d}:00:00", capacity=2),
        ),
    )


async def test_fetch_from_his_round_trip(
    sim: SimulatorProcess, eng: Engine, db: asyncpg.Pool
) -> None:
    schedules = [
        his_schedule("S20261201-D01-AM", "2026-12-01"),
        his_schedule("S20261201-D01-PM", "2026-12-01", doctor="DR2", period="PM"),
        his_schedule("S20261202-D01-AM", "2026-12-02", active=False),  # 停诊
        his_schedule("S20261205-D01-AM", "2026-12-05"),  # out of range
    ]
    async with httpx.AsyncClient(base_url=sim.url) as http:
        assert (await http.post("/_sim/reset")).status_code == 200
        resp = await http.post("/_sim/schedules", content=msgspec.json.encode(schedules))
        assert resp.status_code == 200, resp.text
    async with FhirHisClient(sim.url, timeout=3.0) as his:
        specs = await fetch_from_his(his, "2026-12-01", "2026-12-03", release_days_ahead=7,
                                     release_hour=7, hold_ttl_ms=300_000)
    assert [s.session_id for s in specs] == ["S20261201-D01-AM", "S20261201-D01-PM"]
    am, pm = specs
    assert (am.hospital, am.dept, am.doctor, am.date, am.period, am.fee) == (
        "H1", "D01", "DR1", "2026-12-01", "AM", 5000)
    assert pm.doctor == "DR2" and pm.period == "PM"
    assert [(x.slot_id, x.start, x.end, x.capacity) for x in am.slots] == [
        ("0800", "08:00", "08:30", 4), ("0830", "08:30", "09:00", 2)]
    release = dt.datetime(2026, 11, 24, 7, 0, tzinfo=CST)
    assert am.release_at_ms == pm.release_at_ms == int(release.timestamp() * 1000)
    assert am.starts_ms == int(dt.datetime(2026, 12, 1, 8, 0, tzinfo=CST).timestamp() * 1000)
    assert pm.starts_ms == int(dt.datetime(2026, 12, 1, 14, 0, tzinfo=CST).timestamp() * 1000)
    assert am.hold_ttl_ms == 300_000
    report = await import_sessions(eng, db, specs)
    assert report.created == [s.session_id for s in specs] and report.capacity == 12
    assert await db.fetchval("SELECT count(*) FROM slots") == 4
    started = await db.fetchval("SELECT starts_at FROM sessions WHERE id = $1", am.session_id)
    assert started == dt.datetime(2026, 12, 1, 0, 0, tzinfo=dt.UTC)
    av = await eng.availability(pm.session_id)
    assert av is not None and [(s.start, s.end) for s in av.slots] == [
        ("14:00", "14:30"), ("14:30", "15:00")]


async def test_scheduler_imports_by_the_rules_and_suspends_withdrawn(
    sim: SimulatorProcess, eng: Engine, db: asyncpg.Pool
) -> None:
    from engine.rules import HospitalRules, Rules, save_rules
    from engine.scheduler import schedule_once

    await save_rules(db, "H1", HospitalRules(
        default=Rules(release_days_ahead=7, release_time="07:00", waitlist_max=20,
                      pools={"referral": 0.25})))
    today = dt.date(2026, 11, 26)
    schedules = [
        his_schedule("S20261201-D01-AM", "2026-12-01"),
        his_schedule("S20261202-D01-AM", "2026-12-02"),
        his_schedule("S20261220-D01-AM", "2026-12-20"),  # beyond the calendar: later
    ]
    async with httpx.AsyncClient(base_url=sim.url) as http:
        assert (await http.post("/_sim/reset")).status_code == 200
        resp = await http.post("/_sim/schedules", content=msgspec.json.encode(schedules))
        assert resp.status_code == 200, resp.text
    async with FhirHisClient(sim.url, timeout=3.0) as his:
        r = await schedule_once(eng, db, his, today=today)
        assert r.imported == ["S20261201-D01-AM", "S20261202-D01-AM"]
        assert r.skipped == ["S20261220-D01-AM"]
        snap = await eng.snapshot("S20261201-D01-AM")
        assert snap is not None
        release = dt.datetime(2026, 11, 24, 7, 0, tzinfo=CST)
        assert int(snap["meta"]["release_ms"]) == int(release.timestamp() * 1000)
        assert int(snap["meta"]["waitlist_max"]) == 20
        # The HIS withdraws a session (停诊): the next pass suspends it.
        withdrawn = [his_schedule("S20261202-D01-AM", "2026-12-02", active=False)]
        async with httpx.AsyncClient(base_url=sim.url) as http:
            await http.post("/_sim/reset")
            await http.post("/_sim/schedules", content=msgspec.json.encode(withdrawn))
        r2 = await schedule_once(eng, db, his, today=today)
        assert r2.suspended == ["S20261202-D01-AM"]
        a = await eng.availability("S20261202-D01-AM")
        assert a is not None and a.status == "suspended"
