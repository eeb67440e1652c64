"""A hypothesis state machine drives the scripts on a real Redis and checks
them against a small Python model, plus conservation after every step.
Time is controlled (the engine's clock offset), so expiry is exercised; the
session has a referral pool (号源池) that returns to the public after a
while, and a waitlist (候补) that takes every returned public unit."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import (
    Booked,
    Cancelled,
    Engine,
    Held,
    Reason,
    Refused,
    Released,
    Rescheduled,
    Waitlisted,
)
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import decode_record
from tests.enginekit import config

pytestmark = pytest.mark.slow

TTL = 60_000  # far beyond a test's real duration: only the clock offset expires holds
WL_TTL = 90_000
SLOTS = ("0800", "0830")
SLOT_BASE, POOL_BASE = 1_000_000, 100_000
PATIENTS = [f"p{i}" for i in range(6)]
CHANNELS = {"app": {0}, "referral": {3, 0}}


@dataclass
class Rec:
    id: str
    slot: str
    unit: int
    pat: str
    st: str  # h b x v c r
    dl: int


@dataclass
class Model:
    caps: dict[str, int]
    free: dict[str, dict[int, int]]  # slot -> unit -> pool
    pool_of: dict[int, int]
    nextno: int
    pool_return: int
    now: int = 0
    status: str = "open"
    recs: dict[str, Rec] = field(default_factory=dict)
    rule: dict[str, str] = field(default_factory=dict)
    units: dict[int, str] = field(default_factory=dict)
    waitlist: list[str] = field(default_factory=list)
    offers: int = 0

    @property
    def all_pools(self) -> bool:
        return self.now >= self.pool_return

    def active(self, rid: str) -> bool:
        r = self.recs.get(rid)
        return r is not None and (r.st == "b" or (r.st == "h" and r.dl > self.now))

    def drop_rule(self, r: Rec) -> None:
        if self.rule.get(r.pat) == r.id:
            del self.rule[r.pat]

    def offer(self, unit: int, slot: str) -> bool:
        if self.status != "open":
            return False
        for _ in range(8):
            if not self.waitlist:
                return False
            pat = self.waitlist.pop(0)
            prior = self.rule.get(pat)
            if not (prior and self.active(prior)):
                self.offers += 1
                rid = f"offer:{self.offers}"
                self.units[unit] = rid
                self.rule[pat] = rid
                self.recs[rid] = Rec(rid, slot, unit, pat, "h", self.now + WL_TTL)
                return True
        return False

    def give_back(self, r: Rec) -> None:
        if self.units.get(r.unit) != r.id:
            return
        del self.units[r.unit]
        pool = self.pool_of[r.unit]
        if (pool == 0 or self.all_pools) and self.offer(r.unit, r.slot):
            return
        self.free[r.slot][r.unit] = pool

    def expire_one(self, r: Rec) -> None:
        r.st = "x"
        self.drop_rule(r)
        self.give_back(r)

    def expire_all(self) -> int:
        n = 0
        for r in sorted(self.recs.values(), key=lambda r: (r.dl, r.id)):
            if r.st == "h" and r.dl <= self.now:
                self.expire_one(r)
                n += 1
        return n

    def take(self, slot: str, unit: int) -> None:
        del self.free[slot][unit]


def session(release_ms: int, pool_return_ms: int) -> SessionSpec:
    return SessionSpec(
        session_id="S1", hospital="H1", dept="D1", doctor="DR1", date="2026-12-01",
        period="AM", fee=5000, release_at_ms=release_ms, hold_ttl_ms=TTL,
        waitlist_ttl_ms=WL_TTL, waitlist_max=3, pool_return_ms=pool_return_ms,
        slots=[SlotSpec(slot_id="0800", start="08:00", end="08:30", capacity=3,
                        pools={"referral": 1}),
               SlotSpec(slot_id="0830", start="08:30", end="09:00", capacity=2)],
    )


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        url = os.environ["HAOYUAN_STATEFUL_REDIS_URL"]
        self.eng = Engine.connect(url, config(reclaim_per_hold=1000, batch=False))
        self.run(self.eng.client.flushall())
        self.run(self.eng.__aenter__())
        now = self.run(self.eng.server_time_ms())
        pool_return = now + 3 * TTL + 20_000
        self.run(self.eng.load_session(session(now - 60_000, pool_return)))
        self.m = Model(caps={"0800": 3, "0830": 2},
                       free={"0800": {1: 0, 2: 0, 3: 3}, "0830": {4: 0, 5: 0}},
                       pool_of={1: 0, 2: 0, 3: 3, 4: 0, 5: 0}, nextno=5,
                       pool_return=pool_return, now=now)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        if os.environ.get("HAOYUAN_STATEFUL_STATS"):
            kinds = {r.st for r in self.m.recs.values()}
            print(f"offers={self.m.offers} pools_returned={self.m.all_pools} states={kinds}")
        self.run(self.eng.aclose())
        self.loop.close()

    def _now(self, server_ms: int) -> None:
        self.m.now = server_ms  # the model follows the clock the scripts saw

    def _sync_offers(self) -> None:
        """Offers are holds the engine made: learn their ids and deadlines."""
        snap = self.run(self.eng.snapshot("S1"))
        used = {int(u): (rid, decode_record(raw)) for u, raw, rid in snap["used"]}
        for unit, rid in list(self.m.units.items()):
            if not rid.startswith("offer:"):
                continue
            real, rec = used[unit]
            mrec = self.m.recs.pop(rid)
            assert rec.patient == mrec.pat and rec.waitlist_offer == 1
            mrec.id, mrec.dl = real, rec.deadline_ms
            self.m.recs[real] = mrec
            self.m.units[unit] = real
            if self.m.rule.get(mrec.pat) == rid:
                self.m.rule[mrec.pat] = real

    # -- rules ---------------------------------------------------------------
    @rule(pat=st.sampled_from(PATIENTS), slot=st.sampled_from(SLOTS),
          channel=st.sampled_from(sorted(CHANNELS)))
    def hold(self, pat: str, slot: str, channel: str) -> None:
        self._hold(pat, slot, channel)

    @rule()
    def crowd(self) -> None:
        """Every patient presses (one after another here), on every slot: sells
        out; then everyone left joins the waitlist."""
        for pat in PATIENTS:
            for slot in SLOTS:
                self._hold(pat, slot, "app")
        for pat in PATIENTS:
            self._join(pat, "app")

    @rule(data=st.data())
    def pay_all(self, data: st.DataObject) -> None:
        for rid in sorted(self.m.recs):
            if self.m.recs[rid].st == "h" and data.draw(st.booleans()):
                self._confirm(rid)

    def _hold(self, pat: str, slot: str, channel: str) -> None:
        r = self.run(self.eng.hold("S1", slot, patient=pat, account="acct", channel=channel))
        self._now(r.server_ms)
        m = self.m
        if m.status != "open":
            want = Reason.PAUSED if m.status == "paused" else Reason.SUSPENDED
            assert isinstance(r, Refused) and r.reason is want, r
            return
        m.expire_all()
        prior = m.rule.get(pat)
        if prior is not None and m.active(prior):
            assert isinstance(r, Refused) and r.reason is Reason.DUPLICATE, r
            self._sync_offers()
            return
        allowed = [u for u, p in m.free[slot].items() if m.all_pools or p in CHANNELS[channel]]
        if not allowed:
            assert isinstance(r, Refused) and r.reason is Reason.SOLD_OUT, r
            self._sync_offers()
            return
        assert isinstance(r, Held), r
        unit = min(allowed)
        assert r.unit == unit
        m.take(slot, unit)
        m.units[unit] = r.hold_id
        m.rule[pat] = r.hold_id
        m.recs[r.hold_id] = Rec(r.hold_id, slot, unit, pat, "h", r.expires_at_ms)
        self._sync_offers()

    @rule(pat=st.sampled_from(PATIENTS), channel=st.sampled_from(sorted(CHANNELS)))
    def join_waitlist(self, pat: str, channel: str) -> None:
        self._join(pat, channel)

    def _join(self, pat: str, channel: str) -> None:
        r = self.run(self.eng.join_waitlist("S1", patient=pat, account="acct", channel=channel))
        self._now(r.server_ms)
        m = self.m
        if m.status != "open":
            want = Reason.PAUSED if m.status == "paused" else Reason.SUSPENDED
            assert isinstance(r, Refused) and r.reason is want, r
        elif pat in m.waitlist:
            assert isinstance(r, Waitlisted) and r.replay
            assert r.position == m.waitlist.index(pat) + 1
        elif (prior := m.rule.get(pat)) is not None and m.active(prior):
            assert isinstance(r, Refused) and r.reason is Reason.DUPLICATE, r
        elif any(m.all_pools or p in CHANNELS[channel]
                 for s in SLOTS for p in m.free[s].values()):
            assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE, r
        elif len(m.waitlist) >= 3:
            assert isinstance(r, Refused) and r.reason is Reason.WAITLIST_FULL, r
        else:
            assert isinstance(r, Waitlisted) and not r.replay, r
            m.waitlist.append(pat)

    @precondition(lambda self: bool(self.m.recs))
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        self._confirm(data.draw(st.sampled_from(sorted(self.m.recs))))

    def _confirm(self, rid: str) -> None:
        r = self.run(self.eng.confirm(rid, "pay"))
        self._now(r.server_ms)
        m, rec = self.m, self.m.recs[rid]
        try:
            if rec.st == "b":
                assert isinstance(r, Booked) and r.replay and r.unit == rec.unit
                return
            if rec.st == "r":
                assert isinstance(r, Refused) and r.reason is Reason.EXPIRED
                return
            if rec.st == "c":
                assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE
                return
            if rec.st == "h" and rec.dl > m.now:
                if m.status in ("open", "paused"):  # a hold from before a pause is booked
                    assert isinstance(r, Booked) and not r.late and r.unit == rec.unit, r
                    rec.st = "b"
                    return
                m.drop_rule(rec)
                del m.units[rec.unit]
                m.free[rec.slot][rec.unit] = m.pool_of[rec.unit]
                rec.st = "r"
                assert isinstance(r, Refused) and r.reason is Reason.EXPIRED
                return
            if rec.st == "h":
                m.expire_one(rec)
            if m.status != "open":
                rec.st = "r"
                assert isinstance(r, Refused) and r.reason is Reason.EXPIRED
                return
            prior = m.rule.get(rec.pat)
            if prior is not None and prior != rid and m.active(prior):
                rec.st = "r"
                assert isinstance(r, Refused) and r.reason is Reason.EXPIRED, r
                return
            pool = m.pool_of[rec.unit]
            others = [u for u, p in m.free[rec.slot].items() if m.all_pools or p == pool]
            if rec.unit in m.free[rec.slot]:
                unit = rec.unit
            elif others:
                unit = min(others)
            else:
                rec.st = "r"
                assert isinstance(r, Refused) and r.reason is Reason.EXPIRED, r
                return
            assert isinstance(r, Booked) and r.late and r.unit == unit, r
            m.take(rec.slot, unit)
            rec.unit, rec.st = unit, "b"
            m.units[unit] = rid
            m.rule[rec.pat] = rid
        finally:
            self._sync_offers()

    @precondition(lambda self: bool(self.m.recs))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.m.recs)))
        r = self.run(self.eng.release(rid))
        self._now(r.server_ms)
        rec = self.m.recs[rid]
        if rec.st in ("x", "v"):
            assert isinstance(r, Released) and r.replay
        elif rec.st == "h":
            assert isinstance(r, Released) and not r.replay
            rec.st = "v"
            self.m.drop_rule(rec)
            self.m.give_back(rec)
        else:
            assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE
        self._sync_offers()

    @precondition(lambda self: bool(self.m.recs))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.m.recs)))
        r = self.run(self.eng.cancel(rid))
        self._now(r.server_ms)
        rec = self.m.recs[rid]
        if rec.st == "c":
            assert isinstance(r, Cancelled) and r.replay
        elif rec.st == "b":
            assert isinstance(r, Cancelled) and not r.replay
            rec.st = "c"
            self.m.drop_rule(rec)
            self.m.give_back(rec)
        else:
            assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE
        self._sync_offers()

    @rule(steps=st.integers(min_value=0, max_value=2))
    def advance(self, steps: int) -> None:
        # +7 ms keeps every hold clear of the exact deadline instant.
        self.eng.config.clock_offset_ms += steps * TTL + 7

    @rule()
    def sweep(self) -> None:
        n = self.run(self.eng.sweep())
        self.m.now = self.run(self.eng.server_time_ms())
        assert n == self.m.expire_all()
        self._sync_offers()

    @precondition(lambda self: sum(r.st == "b" for r in self.m.recs.values()) >= 2)
    @rule()
    def suspend(self) -> None:
        r = self.run(self.eng.suspend("S1", "doctor_stopped"))
        m = self.m
        cancelled = released = 0
        m.waitlist.clear()
        for unit, rid in list(m.units.items()):
            rec = m.recs[rid]
            del m.units[unit]
            m.free[rec.slot][unit] = m.pool_of[unit]
            m.drop_rule(rec)
            if rec.st == "b":
                rec.st, cancelled = "c", cancelled + 1
            elif rec.st == "h":
                rec.st, released = "v", released + 1
        m.status = "suspended"
        assert (r.cancelled, r.released) == (cancelled, released)

    @rule()
    def resume(self) -> None:
        assert self.run(self.eng.resume("S1"))
        self.m.status = "open"

    @precondition(lambda self: any(r.st == "b" for r in self.m.recs.values()))
    @rule(data=st.data(), slot=st.sampled_from(SLOTS))
    def reschedule(self, data: st.DataObject, slot: str) -> None:
        """改约 within the session: the lowest free app unit of the other slot,
        or a refusal that changes nothing."""
        booked = sorted(rid for rid, r in self.m.recs.items() if r.st == "b")
        rid = data.draw(st.sampled_from(booked))
        r = self.run(self.eng.reschedule(rid, account="acct", session_id="S1", slot_id=slot))
        self._now(r.server_ms)
        m, rec = self.m, self.m.recs[rid]
        try:
            if slot == rec.slot:
                assert isinstance(r, Refused) and r.state == "same_slot", r
                return
            if m.status != "open":
                want = Reason.PAUSED if m.status == "paused" else Reason.SUSPENDED
                assert isinstance(r, Refused) and r.reason is want, r
                return
            allowed = [u for u, p in m.free[slot].items() if m.all_pools or p in CHANNELS["app"]]
            if not allowed:
                assert isinstance(r, Refused) and r.reason is Reason.SOLD_OUT, r
                return
            assert isinstance(r, Rescheduled) and r.previous_id == rid, r
            unit = min(allowed)
            assert r.unit == unit
            m.take(slot, unit)
            m.units[unit] = r.booking_id
            m.recs[r.booking_id] = Rec(r.booking_id, slot, unit, rec.pat, "b", 0)
            rec.st = "c"
            m.drop_rule(rec)
            m.rule[rec.pat] = r.booking_id
            m.give_back(rec)
        finally:
            self._sync_offers()

    @rule()
    def pause(self) -> None:
        """暂停放号: no new holds, joins or offers; bookings and holds stand."""
        r = self.run(self.eng.pause("S1", "paused"))
        if self.m.status == "suspended":
            assert isinstance(r, Refused) and r.reason is Reason.INVALID_STATE, r
        else:
            assert r is None
            self.m.status = "paused"

    @rule(slot=st.sampled_from(SLOTS), cap=st.integers(min_value=0, max_value=4))
    def capacity(self, slot: str, cap: int) -> None:
        r = self.run(self.eng.set_capacity("S1", slot, cap))
        m = self.m
        cur = m.caps[slot]
        if cap > cur:
            for _ in range(cap - cur):
                m.nextno += 1
                m.free[slot][m.nextno] = 0
                m.pool_of[m.nextno] = 0
            cur = cap
        elif cap < cur:
            order = sorted(m.free[slot].items(), key=lambda up: (up[1], up[0]), reverse=True)
            for unit, _pool in order[: cur - cap]:
                del m.free[slot][unit]
            cur -= min(len(order), cur - cap)
        m.caps[slot] = cur
        assert r.capacity == cur

    # -- invariants ------------------------------------------------------------
    @invariant()
    def conservation_and_model(self) -> None:
        audit = self.run(self.eng.audit("S1"))
        assert audit.ok, audit.breaches
        snap = self.run(self.eng.snapshot("S1"))
        free: dict[str, dict[int, int]] = {s: {} for s in SLOTS}
        index = {int(snap["meta"][f"i:{s}"]): s for s in SLOTS}
        for unit, score in snap["free"]:
            free[index[int(score) // SLOT_BASE]][int(unit)] = (int(score) % SLOT_BASE) // POOL_BASE
        assert free == self.m.free
        used = {int(u): rid for u, _, rid in snap["used"]}
        assert used == self.m.units
        assert snap["waiting"] == len(self.m.waitlist)
        for s in SLOTS:
            assert audit.slots[SLOTS.index(s)].capacity == self.m.caps[s]


EngineMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("HAOYUAN_STATEFUL_EXAMPLES", "60")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_engine_state_machine(redis_url: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("HAOYUAN_STATEFUL_REDIS_URL", redis_url)
    EngineMachine.TestCase().runTest()
