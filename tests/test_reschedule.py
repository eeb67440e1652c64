"""Rescheduling (改约, issue 13): the old booking stands until the new unit is
certain, the patient never ends with two bookings or none, the per-patient
rules see one booking throughout, the payment moves (no refund), a fee
difference is recorded for finance, the hospital may limit reschedules; in
one partition one script, across partitions a hold, a swap and a
compensation; and a storm of reschedules into a popular slot while a crowd
grabs it sells no unit twice."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import asyncpg
import msgspec
import pytest

from engine import Booked, Engine, Held, Reason, Refused, Rescheduled
from engine import keys as K
from tests.enginekit import config, make_spec, now_ms
from tests.test_stats import drain


def spec(sid: str, *, dept: str = "RD", doctor: str = "DR1", caps: tuple[int, ...] = (3, 3),
         fee: int = 5000, **kw: Any) -> Any:
    return msgspec.structs.replace(make_spec(sid, dept=dept, doctor=doctor, caps=caps, **kw),
                                   fee=fee)


async def book(eng: Engine, sid: str, slot: str, pat: str, acct: str) -> str:
    h = await eng.hold(sid, slot, patient=pat, account=acct)
    assert isinstance(h, Held), h
    b = await eng.confirm(h.hold_id, f"pay-{pat}")
    assert isinstance(b, Booked), b
    return b.booking_id


async def test_in_one_partition_one_atomic_step(engine_on_fresh_redis: Engine) -> None:
    eng = engine_on_fresh_redis
    eng.config.patient_rules = True
    await eng.load_session(spec("R1", caps=(1, 2)))
    await eng.load_session(spec("R2", doctor="DR2", caps=(1,), fee=8000))  # same dept-day
    old = await book(eng, "R1", "0800", "p1", "a1")
    assert await eng.active_count("p1") == 1
    # To the other slot of the same session, then to another doctor that day.
    r = await eng.reschedule(old, account="a1", session_id="R1", slot_id="0830")
    assert isinstance(r, Rescheduled) and r.previous_id == old and r.slot_id == "0830", r
    rec_old, rec_new = await eng.record(old), await eng.record(r.booking_id)
    assert rec_old is not None and rec_old.state.value == "c" and rec_old.reason == "rescheduled"
    assert rec_new is not None and rec_new.state.value == "b"
    assert rec_new.payment_ref == "pay-p1" and rec_new.reschedules == 1
    assert await eng.active_count("p1") == 1  # one booking throughout
    # The old unit went back: someone else can have it.
    assert isinstance(await eng.hold("R1", "0800", patient="p2", account="a2"), Held)
    r2 = await eng.reschedule(r.booking_id, account="a1", session_id="R2", slot_id="0800")
    assert isinstance(r2, Rescheduled) and (r2.fee, r2.previous_fee) == (8000, 5000)
    # Refusals change nothing: sold out (R2 has one unit, now the patient's).
    other = await book(eng, "R1", "0830", "p3", "a3")
    no = await eng.reschedule(other, account="a3", session_id="R2", slot_id="0800")
    assert isinstance(no, Refused) and no.reason is Reason.SOLD_OUT
    still = await eng.record(other)
    assert still is not None and still.state.value == "b"
    # Someone else's booking, the same slot, a limit.
    assert (await eng.reschedule(other, account="a1", session_id="R1", slot_id="0800")
            ).reason is Reason.NOT_FOUND  # type: ignore[union-attr]
    same = await eng.reschedule(other, account="a3", session_id="R1", slot_id="0830")
    assert isinstance(same, Refused) and same.state == "same_slot"
    capped = await eng.reschedule(r2.booking_id, account="a1", session_id="R1",
                                  slot_id="0830", max_reschedules=2)
    assert isinstance(capped, Refused) and capped.reason is Reason.LIMIT_REACHED
    for sid in ("R1", "R2"):
        a = await eng.audit(sid)
        assert a.ok, a.breaches


async def test_a_retry_returns_the_first_answer(engine_on_fresh_redis: Engine) -> None:
    eng = engine_on_fresh_redis
    await eng.load_session(spec("R1", caps=(1, 1)))
    old = await book(eng, "R1", "0800", "p1", "a1")
    first = await eng.reschedule(old, account="a1", session_id="R1", slot_id="0830",
                                 idempotency_key="k1")
    again = await eng.reschedule(old, account="a1", session_id="R1", slot_id="0830",
                                 idempotency_key="k1")
    assert isinstance(first, Rescheduled) and isinstance(again, Rescheduled)
    assert again.replay and again.booking_id == first.booking_id
    assert (await eng.audit("R1")).booked == 1


async def test_inside_the_cancel_deadline_it_is_refused_and_late_counts(
        engine_on_fresh_redis: Engine) -> None:
    eng = engine_on_fresh_redis
    await eng.load_session(spec("R1", caps=(2, 2), starts_ms=now_ms() + 3_600_000,
                                cancel_before_ms=7_200_000))
    old = await book(eng, "R1", "0800", "p1", "a1")
    r = await eng.reschedule(old, account="a1", session_id="R1", slot_id="0830")
    assert isinstance(r, Refused) and r.reason is Reason.CANCEL_DEADLINE
    await eng.load_session(spec("R3", caps=(2, 2), starts_ms=now_ms() + 3_600_000))
    old3 = await book(eng, "R3", "0800", "p3", "a3")
    late = await eng.reschedule(old3, account="a3", session_id="R3", slot_id="0830")
    assert isinstance(late, Rescheduled) and late.late  # within a day of the visit


async def test_across_partitions_with_a_compensation(engine_on_fresh_redis: Engine) -> None:
    eng = engine_on_fresh_redis
    eng.config.patient_rules = True
    a, b = spec("X1", dept="XA", caps=(1,)), None
    for i in range(200):  # a department-day of another partition
        cand = spec(f"X2{i}", dept=f"XB{i}", caps=(1,))
        if K.partition_of(cand.dept, cand.date) != K.partition_of(a.dept, a.date):
            b = cand
            break
    assert b is not None
    await eng.load_session(a)
    await eng.load_session(b)
    old = await book(eng, "X1", "0800", "p1", "a1")
    assert isinstance(await eng.reschedule(old, account="a1", session_id=b.session_id,
                                           slot_id="0800"), Refused)  # not one partition
    r = await eng.reschedule_across(old, account="a1", session_id=b.session_id,
                                    slot_id="0800")
    assert isinstance(r, Rescheduled), r
    new = await eng.record(r.booking_id)
    assert new is not None and new.state.value == "b" and new.payment_ref == "pay-p1"
    assert (await eng.record(old)).state.value == "c"  # type: ignore[union-attr]
    assert await eng.active_count("p1") == 1
    # Back, when the old session has no unit left: refused, the booking stands.
    await book(eng, "X1", "0800", "p2", "a2")
    back = await eng.reschedule_across(r.booking_id, account="a1", session_id="X1",
                                       slot_id="0800")
    assert isinstance(back, Refused) and back.reason is Reason.SOLD_OUT
    assert (await eng.record(r.booking_id)).state.value == "b"  # type: ignore[union-attr]
    for sid in ("X1", b.session_id):
        assert (await eng.audit(sid)).ok


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_reschedule_storm_into_a_popular_slot(
        fresh_redis: Any, redis_url: str, db_pool: asyncpg.Pool, fresh_pg_dsn: str) -> None:
    """40 patients booked elsewhere reschedule into a 10-unit slot while 60
    others grab it: no unit twice, every rescheduler ends with exactly one
    booking (the old or the new), the payments move without a refund, and
    PostgreSQL agrees with Redis."""
    from engine.schedule_import import import_sessions

    async with Engine.connect(redis_url, config(patient_rules=True)) as eng:
        hot = spec("HOT", dept="HD", doctor="DRH", caps=(10,))
        calm = spec("CALM", dept="HD", doctor="DRC", caps=(40,))
        await import_sessions(eng, db_pool, [hot, calm])
        movers = {f"m{i}": await book(eng, "CALM", "0800", f"m{i}", f"am{i}")
                  for i in range(40)}
        rnd = random.Random(5)
        results: list[Any] = []

        async def mover(p: str, bid: str) -> None:
            await asyncio.sleep(rnd.random() * 0.05)
            results.append((p, await eng.reschedule(bid, account=f"a{p}", session_id="HOT",
                                                    slot_id="0800")))

        async def grabber(i: int) -> None:
            await asyncio.sleep(rnd.random() * 0.05)
            results.append((f"g{i}", await eng.hold("HOT", "0800", patient=f"g{i}",
                                                    account=f"ag{i}")))

        await asyncio.gather(*(mover(p, b) for p, b in movers.items()),
                             *(grabber(i) for i in range(60)))
        moved = [p for p, r in results if isinstance(r, Rescheduled)]
        grabbed = [p for p, r in results if isinstance(r, Held)]
        assert len(moved) + len(grabbed) == 10, Counter(type(r).__name__ for _, r in results)
        hot_a, calm_a = await eng.audit("HOT"), await eng.audit("CALM")
        assert hot_a.ok and calm_a.ok, (hot_a.breaches, calm_a.breaches)
        assert len(set(hot_a.booked_units.values())) == hot_a.booked == len(moved)
        assert calm_a.booked == 40 - len(moved)
        for p in movers:  # one booking each, the old or the new
            assert await eng.active_count(p) == 1
        await drain(redis_url, fresh_pg_dsn)
    booked = await db_pool.fetch("SELECT session_id, patient_ref FROM bookings"
                                 " WHERE status = 'booked'")
    per = Counter(r["patient_ref"] for r in booked)
    assert all(per[p] == 1 for p in movers)
    assert await db_pool.fetchval("SELECT count(*) FROM refund_orders") == 0
    assert await db_pool.fetchval(
        "SELECT count(*) FROM bookings WHERE status = 'cancelled'"
        " AND status_reason = 'rescheduled'") == len(moved)
    assert await db_pool.fetchval(
        "SELECT count(*) FROM bookings WHERE rescheduled_from IS NOT NULL") == len(moved)


async def test_over_http_with_a_fee_difference(fresh_redis: Any, redis_url: str,
                                               fresh_pg_dsn: str) -> None:
    from litestar.testing import AsyncTestClient

    from tests.apikit import bind, flushed_app, import_sessions, login, next_id, pay

    app = await flushed_app(redis_url, fresh_pg_dsn)
    async with AsyncTestClient(app) as client:
        cheap = spec("HC1", dept="HTD", caps=(1,), fee=5000)
        dear = spec("HC2", dept="HTD", doctor="DR2", caps=(1,), fee=12000)
        await import_sessions(client, [cheap, dear])
        h = await login(client, f"rs-{next_id()}")
        pid = await bind(client, h, next_id())
        hid = (await client.post("/v1/holds", headers=h, json={
            "session_id": "HC1", "slot_id": "0800", "patient_id": pid})).json()["hold_id"]
        assert (await pay(client, hid, 5000)).status_code == 200
        r = await client.post(f"/v1/bookings/{hid}/reschedule", headers=h,
                              json={"session_id": "HC2", "slot_id": "0800"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["previous_id"] == hid and body["fee_difference"] == 7000
        again = await client.post(f"/v1/bookings/{body['booking_id']}/reschedule", headers=h,
                                  json={"session_id": "HC2", "slot_id": "0800"})
        assert again.status_code == 409 and again.json()["type"] == "/problems/invalid-state"
        bad = await client.post(f"/v1/bookings/{hid}/reschedule", headers=h,
                                json={"session_id": "HC1", "slot_id": "08 00"})
        assert bad.status_code == 422
    await drain(redis_url, fresh_pg_dsn)
    async with asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=1) as pool:
        row = await pool.fetchrow("SELECT status, rescheduled_from FROM bookings WHERE id = $1",
                                  body["booking_id"])
        assert (row["status"], row["rescheduled_from"]) == ("booked", hid)
        adj = await pool.fetchrow("SELECT previous_id, amount, state FROM fee_adjustments")
        assert (adj["previous_id"], adj["amount"], adj["state"]) == (hid, 7000, "open")
        assert await pool.fetchval("SELECT count(*) FROM refund_orders") == 0
        # The statistics count the move both ways.
        import datetime as dt

        from engine.stats import stats

        day = dt.date.fromisoformat(cheap.date)
        by = {r.session_id: r for r in await stats(pool, date_from=day, date_to=day)}
        assert (by["HC1"].rescheduled_out, by["HC1"].booked) == (1, 0)
        assert (by["HC2"].rescheduled_in, by["HC2"].booked, by["HC2"].bookings) == (1, 1, 1)
