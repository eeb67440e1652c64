"""The HIS forwarder on real Redis, real PostgreSQL and the HIS simulator as a
real subprocess: at least once, exactly one Appointment per booking."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from engine import Engine
from engine.forwarder import ForwarderConfig, HisForwarder, his_lag
from engine.his import FhirHisClient
from engine.schedule_import import import_sessions
from engine.testing.his_simulator import SimConfig, SimulatorProcess
from tests.enginekit import book_many, drain, make_spec


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(SimConfig(seed=11)) as proc:
        yield proc


class Admin:
    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=5.0)

    async def config(self, **fields: Any) -> None:
        resp = await self.http.post("/_sim/config", content=msgspec.json.encode(fields))
        assert resp.status_code == 200, resp.text

    async def appointments(self) -> dict[str, str]:
        data: dict[str, str] = (await self.http.get("/_sim/appointments")).json()
        return data

    async def created(self) -> Counter[str]:
        """Appointments created (201) per booking id."""
        rows = (await self.http.get("/_sim/received")).json()
        return Counter(
            r["booking_id"] for r in rows
            if r["method"] == "POST" and r["path"] == "/Appointment" and r["status_code"] == 201
        )

    async def posts(self) -> Counter[str]:
        rows = (await self.http.get("/_sim/received")).json()
        return Counter(r["booking_id"] for r in rows if r["method"] == "POST")


@pytest.fixture
async def admin(sim: SimulatorProcess) -> AsyncIterator[Admin]:
    a = Admin(sim.url)
    assert (await a.http.post("/_sim/reset")).status_code == 200
    yield a
    await a.http.aclose()


@pytest.fixture
async def his(sim: SimulatorProcess, admin: Admin) -> AsyncIterator[FhirHisClient]:
    async with FhirHisClient(sim.url, timeout=0.5, max_concurrency=8) as c:
        yield c


@pytest.fixture
def db(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    return db_pool


@pytest.fixture
def eng(engine_on_fresh_redis: Engine) -> Engine:
    return engine_on_fresh_redis


FAST = dict(backoff_base_s=0.02, backoff_cap_s=0.2, breaker_reset_s=0.2, idle_s=0.05,
            lease_s=10.0, concurrency=8)


def forwarder(eng: Engine, db: asyncpg.Pool, his: FhirHisClient, **kw: Any) -> HisForwarder:
    return HisForwarder(eng, db, his, ForwarderConfig(**{**FAST, **kw}))


async def forward(eng: Engine, db: asyncpg.Pool, his: FhirHisClient, **kw: Any) -> HisForwarder:
    f = forwarder(eng, db, his, **kw)
    await asyncio.wait_for(f.run(asyncio.Event(), burst=True), timeout=30)
    return f


async def setup(eng: Engine, db: asyncpg.Pool, n: int, *, doctor: str = "DR1",
                in_pg: bool = True) -> list[str]:
    spec = make_spec("S1", doctor=doctor, caps=(n + 5,))
    if in_pg:
        await import_sessions(eng, db, [spec])
    else:
        await eng.load_session(spec)  # schedule row missing: session data from Redis
    ids = await book_many(eng, "S1", n)
    await drain(eng, db, within_s=30)
    return ids


async def his_statuses(db: asyncpg.Pool) -> dict[str, str]:
    return {r["id"]: r["his_status"] for r in await db.fetch("SELECT id, his_status FROM bookings")}


async def assert_exactly_once(admin: Admin, db: asyncpg.Pool, ids: list[str]) -> None:
    assert await his_statuses(db) == dict.fromkeys(ids, "accepted")
    assert await admin.appointments() == dict.fromkeys(ids, "booked")
    assert await admin.created() == Counter(ids)
    rows = await db.fetch("SELECT his_id FROM bookings")
    assert all(r["his_id"] for r in rows)
    assert len({r["his_id"] for r in rows}) == len(ids)
    accepted = await db.fetchval(
        "SELECT count(*) FROM booking_events WHERE event_type = 'his_accepted'")
    assert accepted == len(ids)
    assert (await his_lag(db)).pending == 0


async def test_every_booking_accepted_exactly_once(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 12)
    lag = await his_lag(db)
    assert lag.pending == 12 and lag.oldest_pending_age_ms >= 0
    f = await forward(eng, db, his)
    assert f.accepted == 12
    await assert_exactly_once(admin, db, ids)
    appts = (await admin.http.get("/Appointment", params={"_count": 100})).json()["entry"]
    # Sent with the slot's start (naive, read as CST); the HIS gives each queue
    # number its ten minutes within the slot, and the booking keeps that window.
    starts = {e["resource"]["start"] for e in appts}
    assert starts <= {"2026-12-01T08:00:00+08:00", "2026-12-01T08:10:00+08:00",
                      "2026-12-01T08:20:00+08:00"}
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE his_visit_start IS NOT NULL"
                             " AND his_place IS NOT NULL") == 12
    # Running again sends nothing.
    before = await admin.posts()
    assert (await forward(eng, db, his)).accepted == 0
    assert await admin.posts() == before


async def test_session_data_from_redis_when_schedule_row_missing(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 3, in_pg=False)
    assert await db.fetchval("SELECT count(*) FROM sessions") == 0
    await forward(eng, db, his)
    await assert_exactly_once(admin, db, ids)


async def test_two_forwarders_share_the_work(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 30)
    await admin.config(latency_ms=20)
    a = forwarder(eng, db, his, batch_size=5)
    b = forwarder(eng, db, his, batch_size=5)
    stop = asyncio.Event()
    await asyncio.wait_for(asyncio.gather(a.run(stop, burst=True), b.run(stop, burst=True)), 30)
    assert a.accepted > 0 and b.accepted > 0 and a.accepted + b.accepted == 30
    # Skip-locked leases: each booking was sent once, by one forwarder.
    assert await admin.posts() == Counter(ids)
    await assert_exactly_once(admin, db, ids)


async def test_his_down_then_up(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 8)
    await admin.config(down=True)
    f = forwarder(eng, db, his)
    task = asyncio.create_task(f.run(asyncio.Event(), burst=True))
    await asyncio.sleep(0.8)
    assert not task.done()
    assert set((await his_statuses(db)).values()) == {"pending"}
    assert await db.fetchval("SELECT min(his_attempts) FROM bookings") >= 1
    assert await admin.appointments() == {}
    await admin.config(down=False)
    await asyncio.wait_for(task, timeout=30)
    await assert_exactly_once(admin, db, ids)


async def test_his_timeouts_reconciled_by_lookup(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 6)
    # Every write commits, then hangs past the client's 0.5 s timeout.
    await admin.config(timeout_rate=1.0, hang_s=1.0)
    f = forwarder(eng, db, his)
    task = asyncio.create_task(f.run(asyncio.Event(), burst=True))
    await asyncio.sleep(1.5)
    await admin.config(timeout_rate=0.0)
    await asyncio.wait_for(task, timeout=30)
    unknown = await db.fetchval(
        "SELECT count(DISTINCT booking_id) FROM booking_events WHERE event_type = 'his_unknown'")
    assert unknown == len(ids)
    await assert_exactly_once(admin, db, ids)


async def test_random_server_errors(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 15)
    await admin.config(error_rate=0.3)
    f = await forward(eng, db, his)
    assert f.deferred > 0
    await assert_exactly_once(admin, db, ids)


async def test_rejection_is_compensated(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 2, doctor="DR9")
    await admin.config(reject_doctors=["DR9"])
    f = await forward(eng, db, his)
    assert f.rejected == 2
    assert await admin.appointments() == {}
    for bid in ids:
        rec = await eng.record(bid)
        assert rec is not None and rec.state == "c"
    audit = await eng.audit("S1")
    assert audit.ok and audit.booked == 0 and audit.free == audit.capacity
    assert await his_statuses(db) == dict.fromkeys(ids, "rejected")
    await drain(eng, db, within_s=30)
    rows = await db.fetch("SELECT status, status_reason, his_status FROM bookings")
    assert [(r["status"], r["his_status"]) for r in rows] == [("cancelled", "rejected")] * 2
    assert {r["status_reason"] for r in rows} == {"his_rejected:doctor_stopped"}
    events = await db.fetch(
        "SELECT event_type, reason FROM booking_events WHERE event_type LIKE 'his_%'")
    assert [(e["event_type"], e["reason"]) for e in events] == [
        ("his_rejected", "doctor_stopped")] * 2
    # Nothing left for the HIS: a new run sends nothing.
    before = await admin.posts()
    await forward(eng, db, his)
    assert await admin.posts() == before
    assert (await his_lag(db)).pending == 0


async def test_cancelled_booking_is_cancelled_in_his(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 3)
    await forward(eng, db, his)
    assert (await eng.cancel(ids[0], reason="patient", force=True)).ok
    await drain(eng, db, within_s=30)
    assert (await his_statuses(db))[ids[0]] == "cancel_pending"
    f = await forward(eng, db, his)
    assert f.cancelled == 1
    assert await admin.appointments() == {ids[0]: "cancelled", ids[1]: "booked", ids[2]: "booked"}
    st = await his_statuses(db)
    assert st == {ids[0]: "cancelled", ids[1]: "accepted", ids[2]: "accepted"}
    assert await db.fetchval(
        "SELECT count(*) FROM booking_events WHERE event_type = 'his_cancelled'") == 1


async def test_cancelled_before_forwarding_is_never_booked(
    eng: Engine, db: asyncpg.Pool, his: FhirHisClient, admin: Admin
) -> None:
    ids = await setup(eng, db, 2)
    assert (await eng.cancel(ids[0], reason="patient", force=True)).ok
    await drain(eng, db, within_s=30)
    await forward(eng, db, his)
    assert await admin.appointments() == {ids[1]: "booked"}
    assert await his_statuses(db) == {ids[0]: "cancelled", ids[1]: "accepted"}
