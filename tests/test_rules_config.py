"""Hospital rules as configuration: the release calendar, pools, waitlist and
deadlines derived per department; the no-show policy on PostgreSQL with the
ban enforced in the hold decision."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
import msgspec
import pytest

from engine import Booked, Engine, Held, Reason, Refused
from engine.rules import (
    HospitalRules,
    Rules,
    apply_rules,
    check_ban,
    lift_ban,
    load_rules,
    local_instant_ms,
    record_attendance,
    save_rules,
)
from engine.writer import OutboxWriter, WriterConfig
from tests.enginekit import config, make_spec

CST = dt.timezone(dt.timedelta(hours=8))


def test_calendar_and_channel_rules_become_session_values() -> None:
    rules = HospitalRules(
        default=Rules(release_days_ahead=7, release_time="07:00", cutoff_time="17:00",
                      pools={"referral": 0.3}, waitlist_max=100),
        departments={"STOMA": {"release_days_ahead": 14, "release_time": "06:00",
                               "scope": "doctor"}},
    )
    base = make_spec(dept="CARDIO", date="2026-12-20", caps=(10, 4))
    s = apply_rules(base, rules.for_dept("CARDIO"))
    assert s.release_at_ms == int(dt.datetime(2026, 12, 13, 7, 0, tzinfo=CST).timestamp() * 1000)
    assert s.cutoff_ms == int(dt.datetime(2026, 12, 19, 17, 0, tzinfo=CST).timestamp() * 1000)
    assert [sl.pools for sl in s.slots] == [{"referral": 3}, {"referral": 1}]
    assert s.pool_return_ms == s.starts_ms - 86_400_000
    assert s.cancel_before_ms == 30 * 60_000 and s.waitlist_max == 100
    assert (s.night_from_min, s.night_to_min) == (23 * 60, 6 * 60)
    stoma = apply_rules(make_spec(dept="STOMA", date="2026-12-20"), rules.for_dept("STOMA"))
    assert stoma.release_at_ms == local_instant_ms("2026-12-06", "06:00", 480)
    assert stoma.scope == "doctor"
    expert = msgspec.structs.replace(base, kind="expert")
    assert apply_rules(expert, rules.default).cancel_before_ms == 12 * 3_600_000
    with pytest.raises(msgspec.ValidationError):
        HospitalRules(departments={"X": {"release_time": "25:00"}}).for_dept("X")


@pytest.fixture
def db(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    return db_pool


async def test_rules_round_trip_through_postgres(db: asyncpg.Pool) -> None:
    rules = HospitalRules(default=Rules(max_active_per_patient=3),
                          departments={"PEDS": {"waitlist_max": 50}})
    await save_rules(db, "H1", rules)
    loaded = await load_rules(db, "H1")
    assert loaded.default.max_active_per_patient == 3
    assert loaded.for_dept("PEDS").waitlist_max == 50
    with pytest.raises(msgspec.ValidationError):
        await save_rules(db, "H1", HospitalRules(departments={"X": {"ban_days": 0}}))


async def test_three_no_shows_ban_booking_until_lifted(
    fresh_redis: Any, redis_url: str, db: asyncpg.Pool
) -> None:
    rules = Rules(no_show_limit=3, no_show_window_days=90, ban_days=90)
    async with Engine.connect(redis_url, config(patient_rules=True)) as eng:
        for i in range(4):
            await eng.load_session(make_spec(f"S{i}", dept=f"D{i}", caps=(3,)))
        ids = []
        for i in range(3):
            h = await eng.hold(f"S{i}", "0800", patient="p-late", account="acct")
            assert isinstance(h, Held)
            b = await eng.confirm(h.hold_id, "pay")
            assert isinstance(b, Booked)
            ids.append(b.booking_id)
        w = OutboxWriter(eng, db, WriterConfig(block_ms=20))
        await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 30)
        first = await record_attendance(db, eng, ids[0], attended=False, rules=rules)
        assert first is not None and first.strikes == 1 and first.banned_until_ms is None
        await record_attendance(db, eng, ids[1], attended=True, rules=rules)
        second = await record_attendance(db, eng, ids[2], attended=False, rules=rules)
        assert second is not None and second.banned_until_ms is None
        assert await record_attendance(db, eng, "nope.x.1", attended=False, rules=rules) is None
        # A late cancel counts as the third strike.
        await db.execute("INSERT INTO bookings (id, session_id, slot_id, unit, patient_ref,"
                         " account_id, status, late_cancel, cancelled_at) VALUES"
                         " ('9.S9.1','S9','0800',NULL,'p-late','acct','cancelled',true,now())")
        strikes, until = await check_ban(db, eng, "p-late", rules)
        assert strikes == 3 and until is not None
        r = await eng.hold("S3", "0800", patient="p-late", account="acct")
        assert isinstance(r, Refused) and r.reason is Reason.BANNED and r.until_ms == until
        assert await lift_ban(db, eng, "p-late", admin="ops") == 1
        assert isinstance(await eng.hold("S3", "0800", patient="p-late", account="acct"), Held)


async def test_late_cancels_recorded_by_the_writer_ban_the_patient(
    fresh_redis: Any, redis_url: str, db: asyncpg.Pool
) -> None:
    """Three late cancels (within a day of the visit) through the engine: the
    writer records them and the third one bans the patient."""
    import time

    await save_rules(db, "H1", HospitalRules(default=Rules(no_show_limit=3)))
    starts = int(time.time() * 1000) + 3_600_000  # the visit is in an hour
    async with Engine.connect(redis_url, config(patient_rules=True)) as eng:
        from engine.schedule_import import import_sessions

        specs = [make_spec(f"L{i}", dept=f"D{i}", caps=(3,), starts_ms=starts)
                 for i in range(4)]
        await import_sessions(eng, db, specs)
        w = OutboxWriter(eng, db, WriterConfig(block_ms=20))
        for i in range(3):
            h = await eng.hold(f"L{i}", "0800", patient="p-cancel", account="acct")
            assert isinstance(h, Held)
            assert isinstance(await eng.confirm(h.hold_id, "pay"), Booked)
            c = await eng.cancel(h.hold_id, account="acct")
            assert c.ok and c.late
        await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 30)
        assert await db.fetchval("SELECT count(*) FROM bookings WHERE late_cancel") == 3
        r = await eng.hold("L3", "0800", patient="p-cancel", account="acct")
        assert isinstance(r, Refused) and r.reason is Reason.BANNED


async def test_a_hospital_limit_is_in_force_on_every_import(
        fresh_redis: Any, redis_url: str, db: asyncpg.Pool) -> None:
    """`max_active_per_patient` in a hospital's stored rules is read: a plain
    import (no apply_rules) carries it into the session, and the engine with
    its defaults (the CLI's and the API's) enforces it."""
    from engine import EngineConfig
    from engine.schedule_import import import_sessions

    await save_rules(db, "H1", HospitalRules(default=Rules(max_active_per_patient=1)))
    async with Engine.connect(redis_url, EngineConfig(account_rate_per_s=0,
                                                      patient_rate_per_s=0)) as eng:
        await import_sessions(eng, db, [make_spec("S1", dept="D1", caps=(3,)),
                                        make_spec("S2", dept="D2", caps=(3,))])
        h = await eng.hold("S1", "0800", patient="p", account="a")
        assert isinstance(h, Held)
        r = await eng.hold("S2", "0800", patient="p", account="a")
        assert not r.ok and r.reason.value == "limit-reached"
        stored = await db.fetchval("SELECT spec->>'max_active_per_patient' FROM sessions"
                                   " WHERE id = 'S2'")
        assert stored == "1"  # kept for a rebuild
