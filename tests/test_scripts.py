"""Every script, every outcome, against a real Redis; bad arguments change nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from engine import Booked, Cancelled, Engine, Held, Reason, Refused, Released
from engine.engine import ScriptError
from engine.keys import PartitionKeys
from engine.model import parse_session
from engine.outcomes import Restore, Suspended
from tests.enginekit import config, make_spec, now_ms


@pytest.fixture
def eng(engine_on_fresh_redis: Engine) -> Engine:
    return engine_on_fresh_redis


async def state(eng: Engine, sid: str = "S1") -> Any:
    snap = await eng.snapshot(sid)
    assert snap is not None
    snap.pop("now")
    return snap


async def dump(eng: Engine) -> dict[bytes, Any]:
    """Every key and its value: proof that nothing changed."""
    out: dict[bytes, Any] = {}
    for k in await eng.client.keys("*"):
        out[k] = await eng.client.dump(k)
    return out


# -- load / capacity --------------------------------------------------------------


async def test_load_creates_units_with_queue_numbers(eng: Engine) -> None:
    loaded = await eng.load_session(make_spec(caps=(3, 2)))
    assert loaded.created and [s.capacity for s in loaded.slots] == [3, 2]
    snap = await state(eng)
    assert sorted(int(u) for u, _ in snap["free"]) == [1, 2, 3, 4, 5]
    audit = await eng.audit("S1")
    assert audit.ok and audit.capacity == 5 and audit.free == 5


async def test_reload_never_resets_holds_or_bookings(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(3, 2)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    b = await eng.confirm(h.hold_id, "pay")
    assert isinstance(b, Booked)
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h2, Held)
    again = await eng.load_session(make_spec(caps=(3, 2)))
    assert not again.created
    audit = await eng.audit("S1")
    assert audit.ok and audit.booked == 1 and audit.held == 1 and audit.free == 3


async def test_capacity_up_adds_units_down_removes_only_free(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(3, 2)))
    h1 = await eng.hold("S1", "0800", patient="p1", account="a")
    h2 = await eng.hold("S1", "0800", patient="p2", account="a")
    assert isinstance(h1, Held) and isinstance(h2, Held)
    up = await eng.set_capacity("S1", "0800", 5)
    assert not isinstance(up, Refused) and up.capacity == 5
    snap = await state(eng)
    assert {int(u) for u, _ in snap["free"]} == {3, 4, 5, 6, 7}  # 加号: new numbers 6, 7
    down = await eng.set_capacity("S1", "0800", 0)
    assert not isinstance(down, Refused)
    assert down.capacity == 2 and down.requested == 0  # two units are held: they stay
    audit = await eng.audit("S1")
    assert audit.ok and audit.slots[0].capacity == 2 and audit.held == 2
    # Reload with a lower capacity behaves the same.
    r = await eng.load_session(make_spec(caps=(0, 1)))
    assert [s.capacity for s in r.slots] == [2, 1]
    assert (await eng.audit("S1")).ok


async def test_capacity_unknown_slot_or_session(eng: Engine) -> None:
    await eng.load_session(make_spec())
    r = await eng.set_capacity("S1", "9999", 3)
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND
    r = await eng.set_capacity("NOPE", "0800", 3)
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND


async def test_session_identity_cannot_change(eng: Engine) -> None:
    await eng.load_session(make_spec())
    before = await dump(eng)
    with pytest.raises(ScriptError, match="cannot move"):
        await eng.load_session(make_spec(doctor="DR2"))
    assert await dump(eng) == before


@pytest.mark.parametrize(
    "patch",
    [
        {"slots": []},
        {"slots": [{"slot_id": "a b", "start": "08:00", "end": "08:30", "capacity": 1}]},
        {"slots": [{"slot_id": "A", "start": "08:00", "end": "08:30", "capacity": -1}]},
        {"slots": [{"slot_id": "A", "start": "8", "end": "08:30", "capacity": 1}]},
        {"period": "EVENING"},
        {"session_id": "has.dot"},
        {"fee": -1},
        {"unknown_field": 1},
        {"hold_ttl_ms": 5},
        {"date": "2026-02-31"},
        {"date": "0000-00-00"},
        {"slots": [{"slot_id": "A", "start": "08:00", "end": "08:30", "capacity": 2,
                    "pools": {"referral": 3}}]},
        {"slots": [{"slot_id": "A", "start": "08:00", "end": "08:30", "capacity": 2,
                    "pools": {"vip": 1}}]},
    ],
)
def test_bad_session_specs_are_rejected(patch: dict[str, Any]) -> None:
    good = msgspec.to_builtins(make_spec())
    good.update(patch)
    with pytest.raises(msgspec.ValidationError):
        parse_session(msgspec.json.encode(good))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"sid":"S9"}',
        b'{"sid":"S1","hospital":"H","dept":"D","doctor":"X","date":"d","period":"AM",'
        b'"scope":"dept","fee":1,"release_ms":0,"cutoff_ms":0,"starts_ms":0,'
        b'"cancel_before_ms":0,"hold_ttl_ms":1000,"slots":[{"id":"A","cap":-3}]}',
        b'{"sid":"S1","hospital":"H","dept":"D","doctor":"X","date":"d","period":"AM",'
        b'"scope":"nope","fee":1,"release_ms":0,"cutoff_ms":0,"starts_ms":0,'
        b'"cancel_before_ms":0,"hold_ttl_ms":1000,"slots":[{"id":"A","cap":1}]}',
        b'{"sid":"S1","hospital":"H","dept":"D","doctor":"X","date":"d","period":"AM",'
        b'"scope":"dept","fee":1.5,"release_ms":0,"cutoff_ms":0,"starts_ms":0,'
        b'"cancel_before_ms":0,"hold_ttl_ms":1000,"slots":[{"id":"A","cap":1}]}',
    ],
)
async def test_load_script_rejects_bad_arguments_without_writing(eng: Engine, body: bytes) -> None:
    k = PartitionKeys(1)
    with pytest.raises(ScriptError):
        await eng.runner.run(
            "loadSession",
            [f"{k.records}x", f"{k.records}f", f"{k.records}u", f"{k.records}d", k.sessions,
             k.epoch],
            ["S1", body, "e1", 1],
        )
    assert await eng.client.dbsize() == 0


# -- hold ----------------------------------------------------------------------------


async def test_hold_takes_lowest_unit_then_sold_out(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(2, 1)))
    got = [await eng.hold("S1", "0800", patient=f"p{i}", account=f"a{i}") for i in range(3)]
    assert [g.unit for g in got if isinstance(g, Held)] == [1, 2]
    assert isinstance(got[2], Refused) and got[2].reason is Reason.SOLD_OUT
    other = await eng.hold("S1", "0830", patient="p9", account="a9")
    assert isinstance(other, Held) and other.unit == 3
    assert (await eng.audit("S1")).ok


async def test_hold_before_release_answers_release_instant_and_server_time(eng: Engine) -> None:
    release = now_ms() + 3_600_000
    await eng.load_session(make_spec(release_at_ms=release))
    r = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_OPEN
    assert r.release_at_ms == release and abs(r.server_ms - now_ms()) < 5_000
    assert (await eng.audit("S1")).free == 5


async def test_hold_refuses_suspended_and_unknown(eng: Engine) -> None:
    await eng.load_session(make_spec())
    r = await eng.hold("S1", "7777", patient="p1", account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND and r.what == "slot"
    r = await eng.hold("NOPE", "0800", patient="p1", account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND
    await eng.suspend("S1", "doctor_stopped")
    r = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.SUSPENDED
    assert await eng.resume("S1")
    assert isinstance(await eng.hold("S1", "0800", patient="p1", account="a1"), Held)


async def test_hold_closed_after_cutoff(eng: Engine) -> None:
    await eng.load_session(make_spec(cutoff_ms=now_ms() - 1))
    r = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.CLOSED


async def test_one_per_patient_per_department_day(eng: Engine) -> None:
    await eng.load_session(make_spec("S1", doctor="DR1"))
    await eng.load_session(make_spec("S2", doctor="DR2"))
    await eng.load_session(make_spec("S3", dept="D2", doctor="DR3"))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    dup = await eng.hold("S2", "0800", patient="p1", account="a2")  # another account, same patient
    assert isinstance(dup, Refused) and dup.reason is Reason.DUPLICATE
    assert dup.existing_id == h.hold_id
    assert isinstance(await eng.hold("S3", "0800", patient="p1", account="a1"), Held)
    # After the booking is cancelled the patient may book again.
    b = await eng.confirm(h.hold_id, "pay")
    assert isinstance(b, Booked)
    dup = await eng.hold("S2", "0800", patient="p1", account="a1")
    assert isinstance(dup, Refused) and dup.reason is Reason.DUPLICATE
    assert isinstance(await eng.cancel(b.booking_id), Cancelled)
    assert isinstance(await eng.hold("S2", "0800", patient="p1", account="a1"), Held)


async def test_doctor_day_scope(eng: Engine) -> None:
    await eng.load_session(make_spec("S1", doctor="DR1", scope="doctor"))
    await eng.load_session(make_spec("S2", doctor="DR2", scope="doctor"))
    assert isinstance(await eng.hold("S1", "0800", patient="p1", account="a1"), Held)
    assert isinstance(await eng.hold("S2", "0800", patient="p1", account="a1"), Held)


async def test_rate_limits_gcra_with_retry_after(fresh_redis: Any, redis_url: str) -> None:
    cfg = config(account_rate_per_s=1.0, account_burst=3)
    async with Engine.connect(redis_url, cfg) as eng:
        await eng.load_session(make_spec(caps=(50,)))
        results = [
            await eng.hold("S1", "0800", patient=f"p{i}", account="bot") for i in range(5)
        ]
        assert sum(isinstance(r, Held) for r in results) == 3
        limited = [r for r in results if isinstance(r, Refused)]
        assert all(r.reason is Reason.RATE_LIMITED for r in limited)
        assert all(r.retry_after_ms is not None and 0 < r.retry_after_ms <= 1000 for r in limited)
        # Another account is not affected.
        assert isinstance(await eng.hold("S1", "0800", patient="q", account="human"), Held)
    cfg = config(patient_rate_per_s=1.0, patient_burst=1)
    async with Engine.connect(redis_url, cfg) as eng:
        await eng.load_session(make_spec("S7", dept="D7", caps=(50,)))
        first = await eng.hold("S7", "0800", patient="px", account="a1")
        second = await eng.hold("S7", "0800", patient="px", account="a2")
        assert isinstance(first, Held)
        assert isinstance(second, Refused) and second.reason is Reason.RATE_LIMITED


async def test_hold_reclaims_expired_holds_on_the_way(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(1,), hold_ttl_ms=1000))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    r = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(r, Refused) and r.reason is Reason.SOLD_OUT
    eng.config.clock_offset_ms = 1_500
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h2, Held) and h2.unit == h.unit
    rec = await eng.record(h.hold_id)
    assert rec is not None and rec.state == "x"
    assert (await eng.audit("S1")).ok


async def test_hold_idempotency_key_replays_and_detects_reuse(eng: Engine) -> None:
    await eng.load_session(make_spec())
    first = await eng.hold("S1", "0800", patient="p1", account="a1", idempotency_key="k")
    before = await dump(eng)
    again = await eng.hold("S1", "0800", patient="p1", account="a1", idempotency_key="k")
    assert isinstance(first, Held) and isinstance(again, Held)
    assert again.replay and again.hold_id == first.hold_id and again.unit == first.unit
    assert await dump(eng) == before
    other = await eng.hold("S1", "0830", patient="p1", account="a1", idempotency_key="k")
    assert isinstance(other, Refused) and other.reason is Reason.IDEMPOTENCY_MISMATCH
    assert await dump(eng) == before


async def test_hold_bad_arguments_change_nothing(eng: Engine) -> None:
    await eng.load_session(make_spec())
    before = await dump(eng)
    with pytest.raises(ScriptError):
        await eng.hold("S1", "0800", patient="", account="a1")
    ref = await eng.ref("S1")
    assert ref is not None
    pk = PartitionKeys(ref.partition)
    keys = [*ref.bundle, pk.idempotency("a", "k"), pk.rate_account("a"), pk.rate_patient("p")]
    good = ["S1", "0800", "p", "a", "0", 0, 1, 0, 1, 1000, 3, 0, "1", "0.5", "rq"]
    bads = [(5, "x"), (6, "1.5"), (8, "0"), (9, "-1"), (10, "-1"), (4, ""), (12, "2"), (7, "-5"),
            (4, "9"), (13, "1.5"), (13, "x"), (2, "p|q")]
    for i, bad in bads:
        args = list(good)
        args[i] = bad
        with pytest.raises(ScriptError):
            await eng.runner.run("holdUnit", keys, args)
    with pytest.raises(ValueError):
        await eng.runner.run("holdUnit", keys[:5], good)
    assert await dump(eng) == before


# -- confirm -------------------------------------------------------------------------


async def test_confirm_books_and_appends_outbox_event(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    b = await eng.confirm(h.hold_id, "pay-1")
    assert isinstance(b, Booked) and b.booking_id == h.hold_id and b.unit == h.unit
    assert not b.late
    ref = await eng.ref("S1")
    assert ref is not None
    entries = await eng.client.xrange(PartitionKeys(ref.partition).outbox)
    assert len(entries) == 1
    ev = msgspec.json.decode(entries[0][1][b"e"])
    assert ev["t"] == "booked" and ev["id"] == b.booking_id and ev["pay"] == "pay-1"
    again = await eng.confirm(h.hold_id, "pay-1")
    assert isinstance(again, Booked) and again.replay and again.unit == b.unit
    assert len(await eng.client.xrange(PartitionKeys(ref.partition).outbox)) == 1


async def test_confirm_unknown_and_malformed(eng: Engine) -> None:
    await eng.load_session(make_spec())
    for hid in ["nope", "1.S1.999", "99.S1.1", "1.S1"]:
        r = await eng.confirm(hid, "pay")
        assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    before = await dump(eng)
    with pytest.raises(ScriptError):
        await eng.confirm(h.hold_id, "")
    assert await dump(eng) == before


async def test_confirm_after_expiry_same_unit_free_books_it(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(2,), hold_ttl_ms=1000))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    eng.config.clock_offset_ms = 2_000  # expired, not yet reclaimed
    b = await eng.confirm(h.hold_id, "pay")
    assert isinstance(b, Booked) and b.late and b.unit == h.unit
    assert (await eng.audit("S1")).booked == 1


async def test_confirm_after_expiry_takes_another_unit_or_refunds(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(2,), hold_ttl_ms=1000))
    h1 = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h1, Held) and h1.unit == 1
    eng.config.clock_offset_ms = 2_000
    assert await eng.sweep() == 1
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")  # takes unit 1
    assert isinstance(h2, Held) and h2.unit == 1
    b = await eng.confirm(h1.hold_id, "pay")
    assert isinstance(b, Booked) and b.late and b.unit == 2
    # Now nothing is free: a late payment is refunded.
    h3 = await eng.hold("S1", "0800", patient="p3", account="a3")
    assert isinstance(h3, Refused) and h3.reason is Reason.SOLD_OUT
    await eng.cancel(b.booking_id)
    h3 = await eng.hold("S1", "0800", patient="p3", account="a3")
    assert isinstance(h3, Held)
    eng.config.clock_offset_ms = 4_000
    await eng.sweep()
    h4 = await eng.hold("S1", "0800", patient="p4", account="a4")
    h5 = await eng.hold("S1", "0800", patient="p5", account="a5")
    assert isinstance(h4, Held) and isinstance(h5, Held)
    r = await eng.confirm(h3.hold_id, "pay-3")
    assert isinstance(r, Refused) and r.reason is Reason.EXPIRED and r.refund_due
    again = await eng.confirm(h3.hold_id, "pay-3")
    assert isinstance(again, Refused) and again.reason is Reason.EXPIRED and again.replay
    ref = await eng.ref("S1")
    assert ref is not None
    kinds = [
        msgspec.json.decode(e[b"e"])["t"]
        for _, e in await eng.client.xrange(PartitionKeys(ref.partition).outbox)
    ]
    assert kinds == ["booked", "cancelled", "refund_due"]
    assert (await eng.audit("S1")).ok


async def test_confirm_when_patient_booked_elsewhere_meanwhile_refunds(eng: Engine) -> None:
    await eng.load_session(make_spec("S1", caps=(2,), hold_ttl_ms=1000))
    await eng.load_session(make_spec("S2", doctor="DR2", caps=(2,)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    eng.config.clock_offset_ms = 2_000
    other = await eng.hold("S2", "0800", patient="p1", account="a1")
    assert isinstance(other, Held)
    r = await eng.confirm(h.hold_id, "pay")
    assert isinstance(r, Refused) and r.reason is Reason.EXPIRED


async def test_confirm_on_suspended_session_refunds(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    await eng.suspend("S1", "doctor_stopped")
    r = await eng.confirm(h.hold_id, "pay")
    assert isinstance(r, Refused) and r.reason is Reason.EXPIRED and r.refund_due


# -- release / cancel -------------------------------------------------------------


async def test_release_returns_unit_once_and_is_idempotent(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    r = await eng.release(h.hold_id, account="other")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND
    r1 = await eng.release(h.hold_id, account="a1")
    assert isinstance(r1, Released) and not r1.replay
    before = await dump(eng)
    r2 = await eng.release(h.hold_id, account="a1")
    assert isinstance(r2, Released) and r2.replay
    assert await dump(eng) == before
    assert (await eng.audit("S1")).free == 5


async def test_release_of_booking_is_invalid(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    await eng.confirm(h.hold_id, "pay")
    r = await eng.release(h.hold_id)
    assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE and r.state == "booked"
    c = await eng.cancel("nope.x.1")
    assert isinstance(c, Refused) and c.reason is Reason.NOT_FOUND


async def test_cancel_returns_unit_emits_event_and_is_idempotent(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    r = await eng.cancel(h.hold_id)
    assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE
    await eng.confirm(h.hold_id, "pay")
    r = await eng.cancel(h.hold_id, account="intruder")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND
    c = await eng.cancel(h.hold_id, account="a1", reason="patient")
    assert isinstance(c, Cancelled) and not c.replay
    before = await dump(eng)
    c2 = await eng.cancel(h.hold_id, account="a1")
    assert isinstance(c2, Cancelled) and c2.replay
    assert await dump(eng) == before
    audit = await eng.audit("S1")
    assert audit.ok and audit.free == 5
    with pytest.raises(ScriptError):
        await eng.cancel(h.hold_id, reason="")


async def test_cancel_deadline_and_force(eng: Engine) -> None:
    starts = now_ms() + 10 * 60_000
    await eng.load_session(make_spec(starts_ms=starts, cancel_before_ms=30 * 60_000))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    await eng.confirm(h.hold_id, "pay")
    r = await eng.cancel(h.hold_id, account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.CANCEL_DEADLINE
    assert r.deadline_ms == starts - 30 * 60_000
    assert isinstance(await eng.cancel(h.hold_id, reason="his_rejected", force=True), Cancelled)


# -- sweep / suspend / availability / audit ---------------------------------------------


async def test_sweep_reclaims_every_expired_hold(eng: Engine) -> None:
    for i in range(4):
        await eng.load_session(make_spec(f"S{i}", dept=f"D{i}", caps=(5,), hold_ttl_ms=1000))
    for i in range(4):
        for j in range(5):
            assert isinstance(await eng.hold(f"S{i}", "0800", patient=f"p{j}", account="a"), Held)
    assert await eng.sweep() == 0
    eng.config.clock_offset_ms = 1_500
    assert await eng.sweep() == 20
    for i in range(4):
        a = await eng.audit(f"S{i}")
        assert a.ok and a.free == 5


async def test_suspend_cancels_bookings_with_events_and_releases_holds(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h1 = await eng.hold("S1", "0800", patient="p1", account="a1")
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h1, Held) and isinstance(h2, Held)
    await eng.confirm(h1.hold_id, "pay")
    s = await eng.suspend("S1", "doctor_stopped")
    assert not isinstance(s, Refused) and (s.cancelled, s.released) == (1, 1)
    ref = await eng.ref("S1")
    assert ref is not None
    events = [
        msgspec.json.decode(e[b"e"])
        for _, e in await eng.client.xrange(PartitionKeys(ref.partition).outbox)
    ]
    assert [(e["t"], e["rsn"]) for e in events] == [
        ("booked", ""), ("cancelled", "doctor_stopped")
    ]
    again = await eng.suspend("S1", "doctor_stopped")
    assert not isinstance(again, Refused) and (again.cancelled, again.released) == (0, 0)
    assert (await eng.audit("S1")).ok
    r = await eng.suspend("NOPE")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_FOUND


async def test_availability_per_session_and_department_day(eng: Engine) -> None:
    await eng.load_session(make_spec("S1", caps=(3, 2)))
    await eng.load_session(make_spec("S2", doctor="DR2", caps=(4,)))
    await eng.hold("S1", "0800", patient="p1", account="a1")
    a = await eng.availability("S1")
    assert a is not None and [s.free for s in a.slots] == [2, 2] and a.capacity == 5
    day = await eng.dept_day_availability("D1", "2026-12-01")
    assert [(s.session_id, s.free) for s in day.sessions] == [("S1", 4), ("S2", 4)]
    empty = await eng.dept_day_availability("D404", "2026-12-01")
    assert empty.sessions == []
    assert await eng.availability("NOPE") is None


async def test_audit_reports_a_breach(eng: Engine) -> None:
    await eng.load_session(make_spec())
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    ref = await eng.ref("S1")
    assert ref is not None
    # Corrupt Redis by hand: the held unit also shows as free.
    await eng.client.zadd(ref.keys.free, {str(h.unit): 1_000_000 + h.unit})
    audit = await eng.audit("S1")
    assert not audit.ok and any("both free and in use" in b for b in audit.breaches)


async def test_remember_refusal_stores_a_cached_sold_out_under_the_key(eng: Engine) -> None:
    """A worker answered a keyed hold "sold out" from its cache: the answer is
    stored under the key, so the retry gets it again even when a unit came
    back meanwhile; a key that already has an answer gets that answer."""
    await eng.load_session(make_spec(caps=(1,)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1", idempotency_key="k1")
    assert isinstance(h, Held)
    r = await eng.remember_refusal("S1", "0800", patient="p2", account="a2", idempotency_key="k2")
    assert isinstance(r, Refused) and r.reason is Reason.SOLD_OUT and not r.replay
    assert isinstance(await eng.release(h.hold_id), Released)  # the unit comes back ...
    again = await eng.hold("S1", "0800", patient="p2", account="a2", idempotency_key="k2")
    assert isinstance(again, Refused) and again.reason is Reason.SOLD_OUT and again.replay
    # ... a key that already has an answer (a hold) keeps it
    h3 = await eng.hold("S1", "0800", patient="p3", account="a3", idempotency_key="k3")
    assert isinstance(h3, Held)
    same = await eng.remember_refusal("S1", "0800", patient="p3", account="a3",
                                      idempotency_key="k3")
    assert isinstance(same, Held) and same.hold_id == h3.hold_id and same.replay
    # ... and the key of another request is refused
    other = await eng.remember_refusal("S1", "0830", patient="p3", account="a3",
                                       idempotency_key="k3")
    assert isinstance(other, Refused) and other.reason is Reason.IDEMPOTENCY_MISMATCH
    ref = await eng.ref("S1")
    assert ref is not None
    key = PartitionKeys(ref.partition).idempotency("a9", "k9")
    before = await dump(eng)
    for args in (["S1", "0800", "p", -1, 1000, 0], ["S1", "0800", "p", -2, 0, 0],
                 ["", "0800", "p", -2, 1000, 0], ["S1", "0800", "p", "x", 1000, 0]):
        with pytest.raises(ScriptError):
            await eng.runner.run("rememberRefusal", [key], args)
    assert await dump(eng) == before


async def test_nothing_sells_or_changes_while_the_partition_is_recovering(eng: Engine) -> None:
    """Without its recovery marker a partition answers ``recovering`` to every
    decision that sells or changes a record, and nothing changes; a restore
    (what a rebuild runs) and a suspension still work."""
    await eng.load_session(make_spec("S1", caps=(3,), hold_ttl_ms=1000))
    await eng.load_session(make_spec("S2", doctor="DR2", caps=(3,)))
    ref = await eng.ref("S1")
    assert ref is not None
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    b = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h, Held) and isinstance(b, Held)
    assert isinstance(await eng.confirm(b.hold_id, "pay"), Booked)
    epoch = await eng.partition_epoch(ref.partition)
    assert epoch is not None
    await eng.close_partition(ref.partition)
    before = await dump(eng)
    eng.config.clock_offset_ms = 5_000  # the hold has expired: even the sweeper waits
    outcomes = [
        await eng.hold("S1", "0800", patient="p3", account="a3"),
        await eng.confirm(h.hold_id, "pay"),
        await eng.release(h.hold_id),
        await eng.cancel(b.hold_id),
    ]
    assert all(isinstance(o, Refused) and o.reason is Reason.RECOVERING for o in outcomes), outcomes
    assert await eng.sweep() == 0
    avail = await eng.availability("S1")
    assert avail is not None and avail.status == "recovering"
    assert await dump(eng) == before
    # A reload keeps the partition closed unless asked to open it.
    loaded = await eng.load_session(make_spec("S1", caps=(3,), hold_ttl_ms=1000),
                                    open_partition=False)
    assert not loaded.open and await eng.partition_epoch(ref.partition) is None
    assert isinstance(await eng.suspend("S2"), Suspended)  # closing stays possible
    await eng.open_partition(ref.partition, epoch)
    late = await eng.confirm(h.hold_id, "pay")
    assert isinstance(late, Booked) and late.late


async def test_restore_never_revives_a_record_redis_ended(eng: Engine) -> None:
    """PostgreSQL may lag: a booking it still calls booked that Redis holds as
    cancelled (the cancel's event not yet written) stays cancelled, and its
    unit stays with whoever took it since."""
    await eng.load_session(make_spec(caps=(2,)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    b = await eng.confirm(h.hold_id, "pay")
    assert isinstance(b, Booked)
    assert isinstance(await eng.cancel(b.booking_id), Cancelled)
    other = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(other, Held) and other.unit == b.unit
    before = await dump(eng)
    got = await _restore(eng, b.booking_id, b.unit, pat="p1")
    assert got is Restore.KEPT_CANCELLED
    assert await dump(eng) == before


# -- binding mirror (readBinding / writeBinding) -----------------------------------


async def test_binding_mirror_every_outcome(eng: Engine) -> None:
    assert await eng.binding("a1", "pid-1") is None  # unknown: ask the store
    assert await eng.mirror_binding("a1", "pid-1", "ref1", fill=True)  # filled after a miss
    assert await eng.binding("a1", "pid-1") == "ref1"
    assert not await eng.mirror_binding("a1", "pid-1", "other", fill=True)  # fill never overwrites
    assert await eng.binding("a1", "pid-1") == "ref1"
    assert await eng.mirror_binding("a1", "pid-1", None)  # unbind: tombstone
    assert await eng.binding("a1", "pid-1") == ""
    assert not await eng.mirror_binding("a1", "pid-1", "ref1", fill=True)  # a late fill loses
    assert await eng.binding("a1", "pid-1") == ""
    assert await eng.mirror_binding("a1", "pid-1", "ref1")  # a rebind sets it again
    assert await eng.binding("a1", "pid-1") == "ref1"
    assert await eng.binding("a2", "pid-1") is None  # one mirror per account
    with pytest.raises(ValueError, match="fill needs a ref"):
        await eng.mirror_binding("a1", "pid-2", None, fill=True)


async def test_access_reads_revocations_and_the_binding_in_one_call(eng: Engine) -> None:
    now = int(time.time())
    assert await eng.access("a1", "pid-1", "t1", now + 100) == (False, None)
    await eng.mirror_binding("a1", "pid-1", "ref1")
    assert await eng.access("a1", "pid-1", "t1", now + 100) == (False, "ref1")
    assert await eng.revoke_tokens("a1", "t1", now + 100) == now + 100  # logout
    assert await eng.access("a1", "pid-1", "t1", now + 100) == (True, "ref1")
    assert await eng.access("a1", "", "t2", now + 100) == (False, None)  # another token
    assert await eng.access("a2", "", "t1", now + 100) == (False, None)  # another account
    assert await eng.revoke_tokens("a1", None, now + 50) == now + 50  # every token
    assert (await eng.access("a1", "", "t2", now + 50))[0]
    assert not (await eng.access("a1", "", "t2", now + 51))[0]
    # A second revocation in the same second covers a token minted past the first.
    assert await eng.revoke_tokens("a1", None, now + 50) == now + 51
    assert await eng.revoke_tokens("a1", None, now + 10, restore=True) == now + 51
    assert await eng.tokens_revoked_until("a1") == now + 51
    assert await eng.tokens_revoked_until("a2") == 0
    # Entries of expired tokens are dropped by the next write.
    await eng.revoke_tokens("a1", "gone", now - 5)
    await eng.revoke_tokens("a1", "t3", now + 100)
    fields = set(await eng.client.hkeys("hy:pb:a1"))
    assert b"~t:gone" not in fields and {b"~t:t1", b"~t:t3", b"~all", b"pid-1"} <= fields
    # A binding no longer verified leaves the mirror; a tombstone stays.
    assert await eng.unmirror_binding("a1", "pid-1")
    assert await eng.binding("a1", "pid-1") is None
    await eng.mirror_binding("a1", "pid-2", None)
    assert not await eng.unmirror_binding("a1", "pid-2")
    assert await eng.binding("a1", "pid-2") == ""


async def test_limit_attempts_per_client(eng: Engine) -> None:
    kw: dict[str, Any] = dict(interval_ms=60_000, burst=3)
    for _ in range(10):  # a peek counts nothing
        assert await eng.limit("login", "c1", take=False, **kw) == 0
    for _ in range(3):
        assert await eng.limit("login", "c1", take=True, **kw) == 0
    wait = await eng.limit("login", "c1", take=False, **kw)
    assert 0 < wait <= 60_000
    assert await eng.limit("login", "c1", take=True, **kw) > 0
    assert await eng.limit("login", "c2", take=True, **kw) == 0  # per client
    assert await eng.limit("admin", "c1", take=True, **kw) == 0  # per kind


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("readAccess", ["pid"]),
        ("readAccess", ["pid", "", "1"]),
        ("readAccess", ["~all", "t", "1"]),
        ("readAccess", ["pid", "t", "soon"]),
        ("revokeTokens", ["t", "soon"]),
        ("revokeTokens", ["a b", "1"]),
        ("revokeTokens", ["t", "-1"]),
        ("limitAttempts", ["poke", "1", "1"]),
        ("limitAttempts", ["take", "0", "1"]),
        ("limitAttempts", ["take", "1", "0"]),
        ("writeBinding", ["~all", "ref", "set"]),
        ("readBinding", [""]),
        ("writeBinding", ["", "ref", "set"]),
        ("writeBinding", ["pid", "ref", "upsert"]),
        ("writeBinding", ["pid", "", "fill"]),
        ("writeBinding", ["pid", "a|b", "set"]),
        ("writeBinding", ["pid"]),
    ],
)
async def test_binding_scripts_reject_bad_arguments_without_writing(
    eng: Engine, script: str, args: list[str]
) -> None:
    await eng.mirror_binding("a1", "pid", "ref1")
    before = await dump(eng)
    with pytest.raises(ScriptError):
        await eng.runner.run(script, ["hy:pb:a1"], args)
    assert await dump(eng) == before


@pytest.mark.parametrize("draw", [0.0, 0.4999995, 0.9999996, 0.99999999999])
async def test_random_argument_never_rounds_up_to_one(
    eng: Engine, monkeypatch: pytest.MonkeyPatch, draw: float
) -> None:
    """The anti-scalper draw goes to the scripts as [0, 1) with six decimals:
    a draw that would round to "1.000000" must still be accepted."""
    import engine.engine as engine_module

    monkeypatch.setattr(engine_module.random, "random", lambda: draw)
    await eng.load_session(make_spec(caps=(2,)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    assert isinstance(await eng.release(h.hold_id, account="a1"), Released)
    h = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h, Held)
    assert isinstance(await eng.confirm(h.hold_id, "pay"), Booked)
    assert isinstance(await eng.cancel(h.hold_id), Cancelled)
    assert (await eng.audit("S1")).ok


# -- restoreBooking ------------------------------------------------------------------


async def _restore(eng: Engine, bid: str, unit: int, pat: str = "pX") -> Any:
    return await eng.restore_booking(booking_id=bid, session_id="S1", slot_id="0800", unit=unit,
                                     patient=pat, account="aX", fee=5000, payment_ref="pay")


async def test_restore_booking_every_outcome(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(4,)))
    ref = await eng.ref("S1")
    assert ref is not None
    part = ref.partition
    # A free unit: restored, and new ids stay above the restored one.
    big = f"{part}.S1.{now_ms() * 1000 + 10**9}"
    assert await _restore(eng, big, 4) is Restore.RESTORED
    assert await _restore(eng, big, 4) is Restore.ALREADY  # already there
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held) and int(h.hold_id.rsplit(".", 1)[1]) > int(big.rsplit(".", 1)[1])
    # The unit still held by this very hold (its confirmation lost): booked now.
    assert await _restore(eng, h.hold_id, h.unit, pat="p1") is Restore.RESTORED
    rec = await eng.record(h.hold_id)
    assert rec is not None and rec.state == "b"
    assert await eng.client.zscore(ref.keys.deadlines, h.hold_id) is None  # no expiry now
    # Another hold on the unit, never paid as far as PostgreSQL knows: displaced.
    other = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(other, Held)
    winner = f"{part}.S1.{now_ms() * 1000 + 2 * 10**9}"
    assert await _restore(eng, winner, other.unit, pat="p3") is Restore.RESTORED
    gone = await eng.record(other.hold_id)
    assert gone is not None and gone.state == "x" and gone.reason == "displaced"
    late = await eng.confirm(other.hold_id, "pay-late")  # its payment finds another unit
    assert isinstance(late, Booked) and late.late and late.unit != other.unit
    # A unit booked by another booking: a conflict, nothing changes.
    before = await dump(eng)
    r = await _restore(eng, f"{part}.S1.{now_ms() * 1000 + 3 * 10**9}", late.unit)
    assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE
    assert await dump(eng) == before
    audit = await eng.audit("S1")
    assert audit.ok and audit.booked == 4, audit.breaches


async def test_ids_never_go_below_the_clock(eng: Engine) -> None:
    """A sequence rolled back (a replica promoted before it had the last
    writes) never reissues an id: ids stay at or above server ms x 1000."""
    await eng.load_session(make_spec(caps=(3,)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    part, _, seq = h.hold_id.split(".")
    await eng.client.set(PartitionKeys(int(part)).seq, "5")  # what a stale replica has
    await asyncio.sleep(0.005)
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h2, Held)
    assert int(h2.hold_id.split(".")[2]) >= h2.server_ms * 1000 > int(seq)


async def test_raise_sequence_every_outcome(eng: Engine) -> None:
    await eng.load_session(make_spec(caps=(2,)))
    h = await eng.hold("S1", "0800", patient="p1", account="a1")
    assert isinstance(h, Held)
    part, _, seq = h.hold_id.split(".")
    assert not await eng.raise_sequence(f"{part}.S1.{int(seq) - 1}")  # already above
    # (ahead of the clock's floor, server ms x 1000, by some 1,000 s)
    assert await eng.raise_sequence(f"{part}.S1.{int(seq) + 10**9}")
    h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
    assert isinstance(h2, Held) and int(h2.hold_id.split(".")[2]) == int(seq) + 10**9 + 1
    key = PartitionKeys(int(part)).seq
    before = await dump(eng)
    for bad in ("", "-1", "1.5", "12a", "9" * 19):
        with pytest.raises(ScriptError):
            await eng.runner.run("raiseSequence", [key], [bad])
    assert await dump(eng) == before
