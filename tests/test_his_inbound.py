"""The HIS both ways, beyond booking: the FHIR payloads we send and receive
validate (fhir.resources R4B); changes made in the HIS come back once
(window cancel, 停诊, no-show) and a notification wakes the poller; the two
answers retries cannot fix end in a terminal state an operator resolves; a
window cancel during a release spike gives the unit to the waitlist's head."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.subscription import Subscription
from litestar.testing import AsyncTestClient

from engine import Engine
from engine.audit import run_audit
from engine.forwarder import ForwarderConfig, HisForwarder, his_lag
from engine.his.attention import attention, resolve
from engine.his.base import HisBooking, HisPatient
from engine.his.fhir import FhirHisClient
from engine.his.fhir_resources import (
    SYS_NATIONAL_ID,
    appointment_resource,
    patient_resource,
    subscription_resource,
)
from engine.his.inbound import HisInbound
from engine.keys import PartitionKeys
from engine.outcomes import Held, RecordState
from engine.pii import check_digit
from engine.rules import HospitalRules, Rules, save_rules
from engine.testing.his_simulator import SimConfig, SimulatorProcess, subscription_notification
from tests.apikit import flushed_app
from tests.enginekit import book_many, drain, make_spec

AT = "2026-12-01T08:00:00+08:00"
FAST = dict(backoff_base_s=0.02, backoff_cap_s=0.2, breaker_reset_s=0.2, idle_s=0.05,
            lease_s=10.0, compensate_recheck_s=0.2)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(SimConfig(seed=4)) as proc:
        yield proc


@pytest.fixture
async def his(sim: SimulatorProcess) -> AsyncIterator[FhirHisClient]:
    async with httpx.AsyncClient() as http:
        await http.post(f"{sim.url}/_sim/reset")
    async with FhirHisClient(sim.url, timeout=2.0) as c:
        yield c


async def admin(sim: SimulatorProcess, path: str, **body: Any) -> Any:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as http:
        if body or path.startswith(("his/", "config")):
            r = await http.post(f"/_sim/{path}", content=msgspec.json.encode(body))
        else:
            r = await http.get(f"/_sim/{path}")
    assert r.status_code == 200, r.text
    return r.json()


def fwd(eng: Engine, db: asyncpg.Pool, his: FhirHisClient) -> HisForwarder:
    return HisForwarder(eng, db, his, ForwarderConfig(**FAST))  # type: ignore[arg-type]


async def forward(eng: Engine, db: asyncpg.Pool, his: FhirHisClient) -> HisForwarder:
    f = fwd(eng, db, his)
    await asyncio.wait_for(f.run(asyncio.Event(), burst=True), 30)
    return f


# -- payloads -------------------------------------------------------------------------


def test_the_patient_we_send_is_r4b_and_derived_from_the_id() -> None:
    p = HisPatient.of("ref", "11010519491231002X", "张三", "13800000000")
    assert (p.gender, p.birth_date) == ("female", "1949-12-31")
    male = "11010519900307001" + check_digit("11010519900307001")
    assert HisPatient.of("r", male, "李四", "13900000000").gender == "male"
    res = Patient.model_validate(patient_resource(p))
    assert res.identifier[0].system == SYS_NATIONAL_ID == "urn:oid:2.16.156.10011.1.3"
    assert res.identifier[0].type.coding[0].code == "NI"
    assert (res.gender, str(res.birthDate), res.name[0].text) == ("female", "1949-12-31", "张三")
    assert res.telecom[0].value == "13800000000"
    # Never in a log line by accident.
    assert "11010519491231002X" not in repr(p) and "张三" not in repr(p)


def test_the_appointment_references_the_his_patient_and_notifications_validate() -> None:
    b = HisBooking(booking_id="1.S.2", session_id="S", slot_id="0800", unit=2,
                   patient_ref="hk1.ref", doctor_id="DR1", dept_id="D1",
                   start="2026-12-01T08:00:00", end="2026-12-01T08:30:00", fee=5000,
                   patient_his_id="pat-7")
    appt = Appointment.model_validate(appointment_resource(b))
    assert "Patient/pat-7" in {p.actor.reference for p in appt.participant}
    note = Bundle.model_validate(subscription_notification(3, ["Appointment/appt-1"], AT))
    assert note.type == "history" and note.entry[0].resource.get_resource_type() == "Parameters"
    sub = Subscription.model_validate(subscription_resource(
        "https://hy.example.org/v1/his/notify", "token"))
    assert sub.channel.type == "rest-hook" and "identifier" in sub.criteria


# -- changes in ----------------------------------------------------------------------------


async def test_changes_in_the_his_come_back_once(
        engine_on_fresh_redis: Engine, db_pool: asyncpg.Pool, his: FhirHisClient,
        sim: SimulatorProcess) -> None:
    eng, db = engine_on_fresh_redis, db_pool
    await save_rules(db, "H1", HospitalRules(default=Rules(no_show_limit=1)))
    await eng.load_session(make_spec("IN1", caps=(5,)))
    await eng.load_session(make_spec("IN2", dept="D2", doctor="DR2", caps=(5,)))
    from engine.schedule_import import import_sessions

    await import_sessions(eng, db, [make_spec("IN1", caps=(5,)),
                                    make_spec("IN2", dept="D2", doctor="DR2", caps=(5,))])
    a = await book_many(eng, "IN1", 3)
    b = await book_many(eng, "IN2", 2, prefix="q")
    await drain(eng, db)
    await forward(eng, db, his)
    await admin(sim, "his/cancel", booking_id=a[0], reason="window")
    await admin(sim, "his/noshow", booking_id=a[1])
    await admin(sim, "his/arrive", booking_id=a[2])
    await admin(sim, "his/suspend", session_id="IN2")
    inbound = HisInbound(eng, db, his)
    first = await inbound.poll_once()
    assert (first.cancelled, first.no_shows, first.attended, first.suspended) == (1, 1, 1, 1)
    again = await inbound.poll_once()  # the overlap re-reads them: nothing twice
    assert again.applied == 0
    rec = await eng.record(a[0])
    assert rec is not None and rec.state is RecordState.CANCELLED
    assert await eng.session_status("IN2") == "suspended"
    assert {(await eng.record(x)).state for x in b} == {RecordState.CANCELLED}  # type: ignore[union-attr]
    await drain(eng, db)
    rows = {r["id"]: r for r in await db.fetch(
        "SELECT id, status, status_reason, his_status, attendance FROM bookings")}
    assert (rows[a[0]]["status"], rows[a[0]]["his_status"]) == ("cancelled", "cancelled")
    assert rows[a[0]]["status_reason"] == "his_cancelled"
    assert rows[a[1]]["attendance"] == "no_show" and rows[a[2]]["attendance"] == "attended"
    assert await db.fetchval("SELECT count(*) FROM patient_bans") == 1  # the no-show rule
    assert await db.fetchval("SELECT status FROM sessions WHERE id = 'IN2'") == "suspended"
    # Each was refunded once (a manual refund: these payments never met the ledger).
    causes = Counter(r["cause"] for r in await db.fetch("SELECT cause FROM refund_orders"))
    assert causes == {"his_cancelled": 1, "suspended": 2}
    # Nothing goes back to the HIS for what the HIS did itself.
    puts = [r for r in await admin(sim, "received") if r["method"] == "PUT"]
    await forward(eng, db, his)
    assert [r for r in await admin(sim, "received") if r["method"] == "PUT"] == puts
    assert (await his_lag(db)).pending == 0


async def test_a_notification_wakes_the_poller(redis_url: str, fresh_pg_dsn: str) -> None:
    token = "his-notify-token-0123456789-abcdefghij"
    app = await flushed_app(redis_url, fresh_pg_dsn, his_notify_token=token)
    async with AsyncTestClient(app) as client, Engine.connect(redis_url) as eng:
        r = await client.post("/v1/his/notify", content=b"",
                              headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 401
        assert not await eng.wait_his_poke(0.05)
        body = msgspec.json.encode(subscription_notification(1, ["Appointment/a"], AT))
        for _ in range(3):  # repeated pings coalesce
            r = await client.post("/v1/his/notify", content=body, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})
            assert r.status_code == 200 and r.json() == {"status": "accepted"}
        assert await eng.wait_his_poke(1.0)
        assert not await eng.wait_his_poke(0.05)
    app = await flushed_app(redis_url, fresh_pg_dsn)
    async with AsyncTestClient(app) as client:  # not configured: off
        assert (await client.post("/v1/his/notify", content=b"")).status_code == 404


# -- no endless loops -------------------------------------------------------------------------


async def test_answers_no_retry_can_fix_end_for_an_operator(
        engine_on_fresh_redis: Engine, db_pool: asyncpg.Pool, his: FhirHisClient,
        sim: SimulatorProcess) -> None:
    eng, db = engine_on_fresh_redis, db_pool
    await eng.load_session(make_spec("AT", caps=(5,)))
    lost, refused, fine = await book_many(eng, "AT", 3)
    await drain(eng, db)
    await forward(eng, db, his)
    # 1. After an unknown outcome the HIS has it cancelled.
    await admin(sim, "his/cancel", booking_id=lost, reason="window")
    await db.execute("UPDATE bookings SET his_status = 'unknown', his_updated_at = NULL"
                     " WHERE id = $1", lost)
    # 2. The HIS refuses our cancel.
    await admin(sim, "config", refuse_cancel=[refused])
    assert (await eng.cancel(refused, reason="patient")).ok
    await drain(eng, db)
    f = await forward(eng, db, his)
    assert f.attention == 2
    lag = await his_lag(db)
    assert (lag.lookup_cancelled, lag.cancel_refused, lag.pending) == (1, 1, 0)
    before = len(await admin(sim, "received"))
    await forward(eng, db, his)  # no endless retries
    assert len(await admin(sim, "received")) == before
    stuck = {a.booking_id: a for a in await attention(db)}
    assert stuck[lost].his_status == "lookup_cancelled" and stuck[lost].reason == "cancelled"
    assert stuck[refused].his_status == "cancel_refused"
    assert stuck[refused].reason == "cancel_refused"
    report = await run_audit(eng, db, his)
    assert not report.ok and {a.booking_id for a in report.his_attention} == {lost, refused}
    assert any("his resolve" in b for b in report.breaches)
    # The operator: the HIS is right about the first; the second was cancelled by hand.
    got = await resolve(eng, db, lost, "cancel", actor="op", note="confirmed with the HIS")
    assert not isinstance(got, str) and got.his_status == "cancelled"
    assert isinstance(await resolve(eng, db, fine, "done", actor="op"), str)
    await admin(sim, "his/cancel", booking_id=refused, reason="desk")  # by hand, in the HIS
    got = await resolve(eng, db, refused, "done", actor="op", note="cancelled at the desk")
    assert not isinstance(got, str) and got.his_status == "cancelled"
    await drain(eng, db)
    assert await attention(db) == []
    assert await db.fetchval("SELECT status FROM bookings WHERE id = $1", lost) == "cancelled"
    assert await db.fetchval("SELECT count(*) FROM refund_orders WHERE booking_id = $1",
                             lost) == 1
    events = [r["event_type"] for r in await db.fetch(
        "SELECT event_type FROM booking_events WHERE event_type LIKE 'his_resolved%'")]
    assert sorted(events) == ["his_resolved_cancel", "his_resolved_done"]
    await forward(eng, db, his)
    final = await run_audit(eng, db, his)
    assert final.ok, final.breaches


# -- a window cancel during the spike ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_window_cancel_during_a_release_spike_goes_to_the_waitlist_head(
        engine_on_fresh_redis: Engine, db_pool: asyncpg.Pool, his: FhirHisClient,
        sim: SimulatorProcess) -> None:
    eng, db = engine_on_fresh_redis, db_pool
    spec = msgspec.structs.replace(make_spec("SPK", caps=(20,)), waitlist_max=50,
                                   waitlist_ttl_ms=600_000)
    from engine.schedule_import import import_sessions

    await import_sessions(eng, db, [spec])
    # Early birds book a few units and reach the HIS before the crowd.
    early = await book_many(eng, "SPK", 3, prefix="early")
    await drain(eng, db)
    await forward(eng, db, his)
    inbound = HisInbound(eng, db, his)
    stop = asyncio.Event()
    workers = [asyncio.create_task(inbound.run(stop)),
               asyncio.create_task(fwd(eng, db, his).run(stop))]
    rng = random.Random(7)
    waiters: list[str] = []

    async def patient(i: int) -> None:
        await asyncio.sleep(rng.uniform(0, 0.3))
        h = await eng.hold("SPK", "0800", patient=f"crowd{i}", account=f"c{i}")
        if isinstance(h, Held):
            await eng.confirm(h.hold_id, f"crowd-pay-{i}")
            return
        if h.reason.value == "sold-out":
            w = await eng.join_waitlist("SPK", patient=f"crowd{i}", account=f"c{i}")
            if w.ok:
                waiters.append(f"crowd{i}")

    async def window() -> None:
        await asyncio.sleep(0.15)  # in the middle of the spike
        await admin(sim, "his/cancel", booking_id=early[0], reason="window")
        await eng.poke_his()

    await asyncio.gather(*(patient(i) for i in range(120)), window())
    # The cancel lands (the poller woke); the waitlist head is offered the unit.
    for _ in range(100):
        rec = await eng.record(early[0])
        if rec is not None and rec.state is RecordState.CANCELLED:
            break
        await asyncio.sleep(0.05)
    rec = await eng.record(early[0])
    assert rec is not None and rec.state is RecordState.CANCELLED
    assert waiters, "the crowd should have sold the session out"
    snap = await eng.snapshot("SPK")
    assert snap is not None
    ref = await eng.ref("SPK")
    assert ref is not None
    offered = [msgspec.json.decode(r) for r in await eng.client.hvals(
        PartitionKeys(ref.partition).records)]
    head = [o for o in offered if o.get("wl") == 1 and o.get("sid") == "SPK"]
    assert [o["pat"] for o in head] == [waiters[0]]
    # The head pays; everything settles; Redis = PostgreSQL = HIS.
    assert (await eng.confirm(head[0]["id"], "head-pay")).ok
    for _ in range(3):
        await drain(eng, db)
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    await forward(eng, db, his)
    report = await run_audit(eng, db, his)
    assert report.ok, report.breaches
    [s] = report.sessions
    assert s.booked_redis == s.booked_postgres == s.booked_his == 20
    assert await db.fetchval("SELECT count(*) FROM refund_orders WHERE booking_id = $1",
                             early[0]) == 1
