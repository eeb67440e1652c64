"""Statistics (issue 16): a known release morning replayed through the API,
the writer and `haoyuan stats`, every figure compared with the one counted
by hand; the figures survive a Redis wipe and rebuild; the admin route
answers the same; no PostgreSQL write per refusal (demand goes through
Redis and is folded)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import Engine
from engine.writer import OutboxWriter, WriterConfig
from tests.apikit import ADMIN, api, bind, flushed_app, import_sessions, login, next_id, pay
from tests.enginekit import make_spec, now_ms, wipe_and_rebuild

ROOT = Path(__file__).resolve().parent.parent
DATE = "2027-03-01"


async def drain(redis_url: str, db: str) -> None:
    async with Engine.connect(redis_url) as eng:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
        try:
            await OutboxWriter(eng, pool, WriterConfig(block_ms=20, fold_interval_s=0)).run(
                asyncio.Event(), burst=True)
        finally:
            await pool.close()


def stats_cli(redis_url: str, db: str, *extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAOYUAN_")}
    env.update(HAOYUAN_REDIS_URL=redis_url, HAOYUAN_PG_DSN=db)
    got = subprocess.run([sys.executable, "-m", "engine.cli", "stats", "--date", DATE, "--json",
                          *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    out: dict[str, Any] = json.loads(got.stdout)
    return out


@pytest.fixture
async def app(fresh_redis: Any, redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db)


async def test_a_known_morning_counted_by_hand(app: Litestar, redis_url: str, db: str) -> None:
    async with AsyncTestClient(app) as client:
        who = {}
        for name in ("a1", "a2", "a3", "a4", "a5", "a6"):
            h = await login(client, f"stats-{name}-{next_id()}")
            who[name] = (h, await bind(client, h, next_id()))
        release = now_ms() + 1500
        base_a = make_spec("STA", dept="SD", doctor="DR1", date=DATE, caps=(2,),
                           release_at_ms=release, starts_ms=now_ms() + 30 * 86_400_000)
        spec_a = msgspec.structs.replace(base_a, waitlist_ttl_ms=600_000, waitlist_max=5)
        base_b = make_spec("STB", dept="SD", doctor="DR2", date=DATE, caps=(2,),
                           release_at_ms=release)
        spec_b = msgspec.structs.replace(
            base_b, slots=[msgspec.structs.replace(base_b.slots[0], pools={"phone": 1})])
        await import_sessions(client, [spec_a, spec_b])

        async def hold(name: str, sid: str) -> httpx.Response:
            h, pid = who[name]
            return await client.post("/v1/holds", headers=h, json={
                "session_id": sid, "slot_id": "0800", "patient_id": pid})

        # Before the release: not open, and not counted as demand.
        assert (await hold("a1", "STA")).json()["type"] == "/problems/not-open"
        await asyncio.sleep(max(0, release - now_ms()) / 1000 + 0.1)
        h1, h2 = (await hold("a1", "STA")).json(), (await hold("a2", "STA")).json()
        assert "hold_id" in h1 and "hold_id" in h2  # A sold out
        for name in ("a3", "a4", "a4", "a5"):  # a4 twice: one account, once
            assert (await hold(name, "STA")).json()["type"] == "/problems/sold-out"
        r = await client.post("/v1/sessions/STA/waitlist", headers=who["a3"][0],
                              json={"patient_id": who["a3"][1]})
        assert r.status_code == 201, r.text
        h4 = (await hold("a4", "STB")).json()  # B's public unit (its phone unit stays)
        assert "hold_id" in h4
        assert (await hold("a6", "STB")).json()["type"] == "/problems/sold-out"
        for h in (h1, h2, h4):
            assert (await pay(client, h["hold_id"], 5000)).status_code == 200
        # a1 cancels in time: the unit goes to the waitlist's head (a3), who pays.
        r = await client.post(f"/v1/bookings/{h1['hold_id']}/cancel", headers=who["a1"][0])
        assert r.status_code == 200, r.text
        offer = await _offer_of(redis_url, "STA")
        assert (await pay(client, offer, 5000)).status_code == 200
        await drain(redis_url, db)
        # The clinic day: a2 does not come, a3 does.
        for hid, came in ((h2["hold_id"], False), (offer, True)):
            r = await client.post(f"/v1/admin/bookings/{hid}/attendance", headers=ADMIN,
                                  json={"attended": came})
            assert r.status_code == 200, r.text
        await api(app).demand.flush()  # (the API adds demand to Redis once a second)
        # No PostgreSQL write per refusal: demand is in Redis until folded.
        async with asyncpg.create_pool(db, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("SELECT count(*) FROM demand") == 0
        got = stats_cli(redis_url, db)
        by = {s["session_id"]: s for s in got["sessions"]}
        a, b = by["STA"], by["STB"]
        expected_a = {
            "released": 2, "released_by_pool": {"public": 2}, "booked": 2, "bookings": 3,
            "tried": 5, "unmet_demand": 1, "cancelled_in_time": 1, "cancelled_late": 0,
            "cancelled_other": 0, "no_shows": 1, "attended": 1, "no_show_rate": 0.5,
            "waitlist_joins": 1, "waitlist_offers": 1, "waitlist_conversions": 1,
            "rescheduled_in": 0, "rescheduled_out": 0, "refunds": 1, "his_rejections": 0}
        assert {k: a[k] for k in expected_a} == expected_a
        assert a["sold_out_after_release_ms"] is not None
        assert 0 <= a["sold_out_after_release_ms"] < 5000
        expected_b = {
            "released": 2, "released_by_pool": {"public": 1, "phone": 1}, "booked": 1,
            "bookings": 1, "tried": 2, "unmet_demand": 1, "waitlist_offers": 0, "refunds": 0}
        assert {k: b[k] for k in expected_b} == expected_b
        assert b["sold_out_after_release_ms"] is None  # its phone unit is still free
        (dept,) = got["by_department"]
        assert (dept["released"], dept["booked"], dept["tried"], dept["unmet_demand"]) == (
            4, 3, 7, 2)
        assert dept["released_by_pool"] == {"public": 3, "phone": 1}
        assert got["folded"]["demand_rows"] == 5 + 3 + 1 + 2 + 1  # tried, refused, joined

        # The admin route answers the same.
        r = await client.get(f"/v1/admin/stats?from={DATE}", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert {s["session_id"]: s for s in r.json()["sessions"]} == by
        assert (await client.get("/v1/admin/stats?from=2027-03-02&to=2027-03-01",
                                 headers=ADMIN)).status_code == 422

    # Redis loses everything; the rebuild brings the inventory back, and the
    # statistics are PostgreSQL's: the same figures.
    await wipe_and_rebuild(redis_url, db)
    again = stats_cli(redis_url, db)
    assert {s["session_id"]: s for s in again["sessions"]} == by


async def _offer_of(redis_url: str, sid: str) -> str:
    """The waitlist offer the cancel made: the one hold of session ``sid``."""
    async with Engine.connect(redis_url) as eng:
        ref = await eng.ref(sid)
        assert ref is not None
        for raw in (await eng.client.hgetall(ref.keys.units)).values():
            rec = await eng.record(raw.decode())
            if rec is not None and rec.state.value == "h":
                return rec.id
    raise AssertionError("no offer was made")


def test_bad_dates_are_refused() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAOYUAN_")}
    for args in (["--date", "yesterday"], ["--from", "2027-03-02", "--to", "2027-03-01"],
                 ["--date", "2027-03-01", "--from", "2027-03-01"]):
        got = subprocess.run([sys.executable, "-m", "engine.cli", "stats", *args], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and "haoyuan stats" in got.stderr and not got.stdout
