"""Hospital rules inside the grab: waitlist (候补), channel pools (号源池),
anti-scalper re-release, night closure, hospital-wide patient limits and
bans. Real Redis; concurrency tests run many tasks against one server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from engine import Booked, Engine, Held, Reason, Refused, Waitlisted
from engine.keys import PartitionKeys, partition_of_patient
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import Restore
from tests.enginekit import config, make_spec, now_ms


@pytest.fixture
def eng(engine_on_fresh_redis: Engine) -> Engine:
    return engine_on_fresh_redis


def spec(sid: str = "S1", **kw: Any) -> SessionSpec:
    base = msgspec.structs.asdict(make_spec(sid, caps=kw.pop("caps", (1,)),
                                            dept=kw.pop("dept", "D1"),
                                            doctor=kw.pop("doctor", "DR1")))
    base.update(kw)
    return SessionSpec(**base)


async def events(eng: Engine, sid: str) -> list[dict[str, Any]]:
    ref = await eng.ref(sid)
    assert ref is not None
    return [msgspec.json.decode(e[b"e"])
            for _, e in await eng.client.xrange(PartitionKeys(ref.partition).outbox)]


async def book(eng: Engine, sid: str, pat: str, slot: str = "0800") -> str:
    h = await eng.hold(sid, slot, patient=pat, account=f"a-{pat}")
    assert isinstance(h, Held), h
    b = await eng.confirm(h.hold_id, "pay")
    assert isinstance(b, Booked)
    return b.booking_id


# -- waitlist ----------------------------------------------------------------------


async def test_waitlist_offers_returned_units_in_order(eng: Engine) -> None:
    await eng.load_session(spec(waitlist_ttl_ms=60_000, waitlist_max=3))
    first = await book(eng, "S1", "p1")
    r = await eng.join_waitlist("S1", patient="p1", account="a-p1")
    assert isinstance(r, Refused) and r.reason is Reason.DUPLICATE
    w2 = await eng.join_waitlist("S1", patient="p2", account="a-p2")
    w3 = await eng.join_waitlist("S1", patient="p3", account="a-p3")
    assert isinstance(w2, Waitlisted) and isinstance(w3, Waitlisted)
    assert (w2.position, w3.position) == (1, 2)
    again = await eng.join_waitlist("S1", patient="p2", account="a-p2")
    assert isinstance(again, Waitlisted) and again.replay and again.position == 1
    await eng.join_waitlist("S1", patient="p4", account="a-p4")
    full = await eng.join_waitlist("S1", patient="p5", account="a-p5")
    assert isinstance(full, Refused) and full.reason is Reason.WAITLIST_FULL

    # The booking is cancelled: the unit goes to p2 as a hold, nobody else.
    assert (await eng.cancel(first, account="a-p1")).ok
    grab = await eng.hold("S1", "0800", patient="p9", account="a-p9")
    assert isinstance(grab, Refused) and grab.reason is Reason.SOLD_OUT
    offers = [e for e in await events(eng, "S1") if e["t"] == "waitlist_offer"]
    assert [e["pat"] for e in offers] == ["p2"]
    offer = await eng.record(offers[0]["id"])
    assert offer is not None and offer.state == "h" and offer.waitlist_offer == 1
    assert offer.deadline_ms - offer.at_ms == 60_000

    # p2 does not pay: the offer passes to p3, who pays.
    eng.config.clock_offset_ms = 61_000
    await eng.sweep()
    offers = [e for e in await events(eng, "S1") if e["t"] == "waitlist_offer"]
    assert [e["pat"] for e in offers] == ["p2", "p3"]
    b = await eng.confirm(offers[1]["id"], "pay-3")
    assert isinstance(b, Booked)
    audit = await eng.audit("S1")
    assert audit.ok and audit.booked == 1
    assert await eng.leave_waitlist("S1", patient="p4", account="a-p4")
    assert not await eng.leave_waitlist("S1", patient="p4", account="a-p4")


async def test_waitlist_refused_while_units_are_free_and_cleared_at_cutoff(eng: Engine) -> None:
    cutoff = now_ms() + 5_000
    await eng.load_session(spec(caps=(2,), waitlist_ttl_ms=3_600_000, waitlist_max=10,
                                cutoff_ms=cutoff))
    r = await eng.join_waitlist("S1", patient="p1", account="a1")
    assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE and r.state == "units_free"
    await book(eng, "S1", "p8")
    await book(eng, "S1", "p9")
    assert isinstance(await eng.join_waitlist("S1", patient="p1", account="a1"), Waitlisted)
    eng.config.clock_offset_ms = 6_000
    late = await eng.join_waitlist("S1", patient="p2", account="a2")
    assert isinstance(late, Refused) and late.reason is Reason.CLOSED
    await eng.sweep()
    closed = [e for e in await events(eng, "S1") if e["t"] == "waitlist_closed"]
    assert [(e["pat"], e["rsn"]) for e in closed] == [("p1", "cutoff")]
    a = await eng.availability("S1")
    assert a is not None and a.waiting == 0


async def test_offer_payment_window_never_passes_the_cutoff(eng: Engine) -> None:
    cutoff = now_ms() + 30_000
    await eng.load_session(spec(waitlist_ttl_ms=3_600_000, waitlist_max=5, cutoff_ms=cutoff))
    b = await book(eng, "S1", "p1")
    await eng.join_waitlist("S1", patient="p2", account="a-p2")
    await eng.cancel(b)
    offer = next(e for e in await events(eng, "S1") if e["t"] == "waitlist_offer")
    assert offer["dl"] <= cutoff


@pytest.mark.timeout(120)
async def test_returned_unit_under_a_storm_goes_to_the_waitlist_head(
    fresh_redis: Any, redis_url: str
) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        await eng.load_session(spec(waitlist_ttl_ms=60_000, waitlist_max=10))
        booking = await book(eng, "S1", "owner")
        assert isinstance(await eng.join_waitlist("S1", patient="head", account="h"), Waitlisted)
        assert isinstance(await eng.join_waitlist("S1", patient="second", account="s"),
                          Waitlisted)
        results: list[Any] = []
        go = asyncio.Event()

        async def grabber(i: int) -> None:
            await go.wait()
            for _ in range(20):
                results.append(await eng.hold("S1", "0800", patient=f"g{i}", account=f"g{i}"))

        async def canceller() -> None:
            await go.wait()
            await asyncio.sleep(0.005)
            assert (await eng.cancel(booking)).ok

        tasks = [asyncio.create_task(grabber(i)) for i in range(100)]
        tasks.append(asyncio.create_task(canceller()))
        go.set()
        await asyncio.gather(*tasks)
        assert all(isinstance(r, Refused) and r.reason is Reason.SOLD_OUT for r in results)
        snap = await eng.snapshot("S1")
        assert snap is not None
        [(_unit, raw, _rid)] = snap["used"]
        assert msgspec.json.decode(raw)["pat"] == "head"
        assert (await eng.audit("S1")).ok


# -- channel pools ------------------------------------------------------------------


def pooled(sid: str = "S1", **kw: Any) -> SessionSpec:
    slot = SlotSpec(slot_id="0800", start="08:00", end="08:30", capacity=10,
                    pools={"referral": 3, "phone": 2})
    return spec(sid, slots=[slot], **kw)


async def test_channels_draw_only_from_their_pools(eng: Engine) -> None:
    await eng.load_session(pooled())
    a = await eng.availability("S1", channel="app")
    assert a is not None and a.free == 5
    r = await eng.availability("S1", channel="referral")
    assert r is not None and r.free == 8
    app = [await eng.hold("S1", "0800", patient=f"a{i}", account=f"a{i}") for i in range(6)]
    assert sum(isinstance(h, Held) for h in app) == 5
    assert isinstance(app[5], Refused) and app[5].reason is Reason.SOLD_OUT
    ref = [await eng.hold("S1", "0800", patient=f"r{i}", account=f"r{i}", channel="referral")
           for i in range(4)]
    assert sum(isinstance(h, Held) for h in ref) == 3
    phone = [await eng.hold("S1", "0800", patient=f"t{i}", account=f"t{i}", channel="phone")
             for i in range(3)]
    assert sum(isinstance(h, Held) for h in phone) == 2
    assert (await eng.audit("S1")).held == 10
    with pytest.raises(Exception, match="unknown channel"):
        await eng.hold("S1", "0800", patient="x", account="x", channel="fax")


async def test_unsold_pool_units_return_to_the_public(eng: Engine) -> None:
    await eng.load_session(pooled(pool_return_ms=now_ms() + 10_000))
    for i in range(5):
        assert isinstance(await eng.hold("S1", "0800", patient=f"a{i}", account=f"a{i}"), Held)
    r = await eng.hold("S1", "0800", patient="late", account="late")
    assert isinstance(r, Refused) and r.reason is Reason.SOLD_OUT
    eng.config.clock_offset_ms = 11_000
    a = await eng.availability("S1", channel="app")
    assert a is not None and a.free == 5
    got = [await eng.hold("S1", "0800", patient=f"b{i}", account=f"b{i}") for i in range(6)]
    assert sum(isinstance(h, Held) for h in got) == 5
    audit = await eng.audit("S1")
    assert audit.ok and audit.held == 10 and audit.free == 0


async def test_returned_pools_hand_out_the_lowest_queue_number_first(eng: Engine) -> None:
    """Once the pools are public, the next hold gets the lowest free queue
    number of the slot, whichever pool it came from (found by the stateful
    test: a unit added later to the public pool went out before a returned
    referral unit with a lower number)."""
    await eng.load_session(pooled(pool_return_ms=now_ms() + 10_000))
    for i in range(5):
        assert isinstance(await eng.hold("S1", "0800", patient=f"a{i}", account=f"a{i}"), Held)
    assert (await eng.set_capacity("S1", "0800", 12)).capacity == 12  # public units 11, 12
    eng.config.clock_offset_ms = 11_000
    got = [await eng.hold("S1", "0800", patient=f"b{i}", account=f"b{i}") for i in range(8)]
    assert [h.unit for h in got if isinstance(h, Held)] == [6, 7, 8, 9, 10, 11, 12]
    assert isinstance(got[7], Refused) and got[7].reason is Reason.SOLD_OUT


@pytest.mark.timeout(120)
async def test_pool_return_under_concurrency_never_oversells(
    fresh_redis: Any, redis_url: str
) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        slots = [SlotSpec(slot_id=f"S{i}", start="08:00", end="08:30", capacity=20,
                          pools={"referral": 6, "window": 4}) for i in range(4)]
        await eng.load_session(spec("P", slots=slots, pool_return_ms=now_ms() + 300))
        held: list[Held] = []

        async def grab(i: int, channel: str) -> None:
            for k in range(30):
                r = await eng.hold("P", f"S{(i + k) % 4}", patient=f"{channel}{i}-{k}",
                                   account=f"{channel}{i}", channel=channel)
                if isinstance(r, Held):
                    held.append(r)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(grab(i, ch) for i in range(20)
                               for ch in ("app", "referral", "window")))
        assert len(held) == 80
        assert len({h.unit for h in held}) == 80
        audit = await eng.audit("P")
        assert audit.ok and audit.held == 80 and audit.free == 0


# -- anti-scalper re-release ------------------------------------------------------------


async def test_cancelled_unit_comes_back_after_a_random_delay(eng: Engine) -> None:
    await eng.load_session(spec(rerelease_ms=5_000))
    b = await book(eng, "S1", "scalper")
    assert (await eng.cancel(b)).ok
    r = await eng.hold("S1", "0800", patient="buyer", account="buyer")
    assert isinstance(r, Refused) and r.reason is Reason.SOLD_OUT
    audit = await eng.audit("S1")
    assert audit.ok and audit.delayed == 1 and audit.free == 0
    eng.config.clock_offset_ms = 5_001
    h = await eng.hold("S1", "0800", patient="buyer", account="buyer")
    assert isinstance(h, Held)
    assert (await eng.audit("S1")).ok


async def test_delayed_units_are_released_by_the_sweeper(eng: Engine) -> None:
    await eng.load_session(spec(caps=(3,), rerelease_ms=2_000))
    ids = [await book(eng, "S1", f"p{i}") for i in range(3)]
    for b in ids:
        await eng.cancel(b)
    assert (await eng.audit("S1")).delayed == 3
    eng.config.clock_offset_ms = 2_001
    await eng.sweep()
    audit = await eng.audit("S1")
    assert audit.ok and audit.free == 3 and audit.delayed == 0


# -- night closure -------------------------------------------------------------------


async def test_booking_closed_at_night_answers_next_opening(eng: Engine) -> None:
    local_min = int(((time.time() + 8 * 3600) % 86400) // 60)
    start, end = (local_min - 5) % 1440, (local_min + 60) % 1440
    await eng.load_session(spec(night_from_min=start, night_to_min=end, tz_min=480))
    r = await eng.hold("S1", "0800", patient="p", account="a")
    assert isinstance(r, Refused) and r.reason is Reason.NOT_OPEN
    assert r.release_at_ms is not None
    assert 55 * 60_000 <= r.release_at_ms - r.server_ms <= 61 * 60_000
    eng.config.clock_offset_ms = 61 * 60_000
    assert isinstance(await eng.hold("S1", "0800", patient="p", account="a"), Held)


# -- hospital-wide patient rules (cross-partition) --------------------------------------


@pytest.mark.timeout(120)
async def test_active_limit_holds_when_a_family_grabs_in_parallel(
    fresh_redis: Any, redis_url: str
) -> None:
    cfg = config(patient_rules=True, max_active_per_patient=2)
    async with Engine.connect(redis_url, cfg) as eng:
        for d in range(8):
            await eng.load_session(spec(f"S{d}", dept=f"D{d}", doctor=f"DR{d}", caps=(50,)))
        results: list[Any] = []

        async def member(m: int) -> None:
            for d in range(8):
                results.append(await eng.hold(f"S{(d + m) % 8}", "0800", patient="grandma",
                                              account=f"family-{m}"))

        await asyncio.gather(*(member(m) for m in range(6)))
        held = [r for r in results if isinstance(r, Held)]
        assert len(held) == 2
        reasons = {r.reason for r in results if isinstance(r, Refused)}
        assert reasons <= {Reason.LIMIT_REACHED, Reason.DUPLICATE}
        # No leak: refused holds took their reservation back.
        assert await eng.active_count("grandma") == 2
        assert (await eng.release(held[0].hold_id)).ok
        assert await eng.active_count("grandma") == 1
        b = await eng.confirm(held[1].hold_id, "pay")
        assert b.ok and await eng.active_count("grandma") == 1
        again = await eng.hold(held[0].session_id, "0800", patient="grandma", account="x")
        assert isinstance(again, Held)
        over = [await eng.hold(f"S{d}", "0800", patient="grandma", account="x")
                for d in range(8)]
        assert all(isinstance(r, Refused) for r in over)
        assert await eng.active_count("grandma") == 2


async def test_banned_patient_is_refused_until_lifted(fresh_redis: Any, redis_url: str) -> None:
    async with Engine.connect(redis_url, config(patient_rules=True)) as eng:
        await eng.load_session(spec(caps=(5,)))
        until = await eng.server_time_ms() + 90 * 86_400_000
        await eng.ban("noshow", until)
        r = await eng.hold("S1", "0800", patient="noshow", account="a")
        assert isinstance(r, Refused) and r.reason is Reason.BANNED and r.until_ms == until
        assert (await eng.audit("S1")).free == 5
        await eng.ban("noshow", 0)
        assert isinstance(await eng.hold("S1", "0800", patient="noshow", account="a"), Held)


async def test_banned_patient_cannot_join_a_waitlist(fresh_redis: Any, redis_url: str) -> None:
    async with Engine.connect(redis_url, config(patient_rules=True)) as eng:
        await eng.load_session(spec(waitlist_ttl_ms=60_000, waitlist_max=5))
        await book(eng, "S1", "p1")
        await eng.ban("p2", await eng.server_time_ms() + 86_400_000)
        r = await eng.join_waitlist("S1", patient="p2", account="a2")
        assert isinstance(r, Refused) and r.reason is Reason.BANNED
        await eng.ban("p2", 0)
        assert isinstance(await eng.join_waitlist("S1", patient="p2", account="a2"), Waitlisted)


async def test_late_payment_after_pool_return_takes_any_pool(eng: Engine) -> None:
    """A payment after its hold expired books another unit of the slot: once
    the pools are public, a returned pool unit too (lowest queue number)."""
    await eng.load_session(pooled(pool_return_ms=now_ms() + 10_000, hold_ttl_ms=5_000))
    held = [await eng.hold("S1", "0800", patient=f"a{i}", account=f"a{i}") for i in range(5)]
    assert all(isinstance(h, Held) for h in held)
    late = held[0]
    assert isinstance(late, Held)
    eng.config.clock_offset_ms = 11_000  # the holds expired, the pools returned
    for i in range(5):  # the public units go again, the late patient's unit too
        assert isinstance(await eng.hold("S1", "0800", patient=f"b{i}", account=f"b{i}"), Held)
    b = await eng.confirm(late.hold_id, "pay-late")
    assert isinstance(b, Booked) and b.late and b.unit == 6  # the lowest returned pool unit
    assert (await eng.audit("S1")).ok


# -- the patient-wide count is settled by every path that ends a record -------------


async def test_every_path_that_ends_a_record_settles_the_patient_wide_count(
        fresh_redis: Any, redis_url: str) -> None:
    """A hospital limit of two active holds and bookings per patient, with
    the engine's defaults (what every CLI worker and the API run): a
    suspension (停诊), a forced cancel, an expiry and a release each give the
    patient's place back at once, and a rebuild's restore counts a booking
    again; a waitlist offer counts against the limit like any hold."""
    from engine import EngineConfig

    cfg = EngineConfig(account_rate_per_s=0, patient_rate_per_s=0)
    assert cfg.patient_rules  # on by default: a configured rule is in force
    async with Engine.connect(redis_url, cfg) as eng:
        for d in range(6):
            await eng.load_session(spec(f"S{d}", dept=f"D{d}", doctor=f"DR{d}", caps=(1,),
                                        max_active_per_patient=2, hold_ttl_ms=1000,
                                        waitlist_ttl_ms=60_000, waitlist_max=5))
        b0 = await book(eng, "S0", "pat")
        await book(eng, "S1", "pat")
        assert await eng.active_count("pat") == 2
        r = await eng.hold("S2", "0800", patient="pat", account="a-pat")
        assert isinstance(r, Refused) and r.reason is Reason.LIMIT_REACHED
        # 停诊: the suspension cancels the booking and frees the place.
        assert (await eng.suspend("S1")).ok
        assert await eng.active_count("pat") == 1
        # A forced cancel (admin, HIS compensation) frees it too.
        assert (await eng.cancel(b0, force=True, reason="his_rejected")).ok
        assert await eng.active_count("pat") == 0
        # Expiry (the sweeper) and release.
        h = await eng.hold("S2", "0800", patient="pat", account="a-pat")
        assert isinstance(h, Held) and await eng.active_count("pat") == 1
        eng.config.clock_offset_ms = 2_000
        assert await eng.sweep() == 1
        assert await eng.active_count("pat") == 0
        eng.config.clock_offset_ms = 0
        # A waitlist offer counts: the waiter gets the returned unit as a hold.
        other = await book(eng, "S3", "someone")
        assert (await eng.join_waitlist("S3", patient="pat", account="a-pat")).ok
        await book(eng, "S4", "pat")
        assert await eng.active_count("pat") == 1
        assert (await eng.cancel(other)).ok  # the unit goes to pat as an offer
        assert await eng.active_count("pat") == 2
        r = await eng.hold("S5", "0800", patient="pat", account="a-pat")
        assert isinstance(r, Refused) and r.reason is Reason.LIMIT_REACHED
        snap = await eng.snapshot("S3")
        assert snap is not None
        offer_id = snap["used"][0][2]
        assert (await eng.release(offer_id)).ok  # the waiter passes: the place is free
        assert await eng.active_count("pat") == 1
        # A restore after Redis lost the count puts the booking back in it.
        pk = PartitionKeys(partition_of_patient("pat"))
        await eng.client.delete(pk.patient_active("pat"))
        assert await eng.active_count("pat") == 0
        ref = await eng.ref("S5")
        assert ref is not None
        restored = await eng.restore_booking(
            booking_id=f"{ref.partition}.S5.{10**16}", session_id="S5", slot_id="0800", unit=1,
            patient="pat", account="a-pat", fee=5000)
        assert restored is Restore.RESTORED
        assert await eng.active_count("pat") == 1
