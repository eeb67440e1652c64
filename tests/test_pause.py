"""Pausing sales (暂停放号, issue 13): a session or a whole department-day
stops selling without cancelling anything, answers a stable ``paused``
refusal that is never remembered under an idempotency key, and reopens as
it was; a suspended session (停诊) cannot be paused; a rebuild keeps the
pause."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import Engine
from tests.apikit import ADMIN, bind, flushed_app, import_sessions, login, next_id, pay, uid
from tests.enginekit import make_spec, wipe_and_rebuild


@pytest.fixture
async def app(fresh_redis: Any, redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db)


def kind(r: httpx.Response) -> str:
    return "held" if r.status_code == 201 else str(r.json()["type"]).rsplit("/", 1)[-1]


async def test_pause_and_resume_a_session_and_a_department_day(
        app: Litestar, redis_url: str, db: str) -> None:
    async with AsyncTestClient(app) as client:
        dept = uid("PD")
        specs = [make_spec(uid("PS"), dept=dept, doctor=f"DR{i}", caps=(3,)) for i in range(2)]
        specs[0] = msgspec.structs.replace(specs[0], waitlist_ttl_ms=60_000, waitlist_max=5)
        await import_sessions(client, specs)
        sid = specs[0].session_id
        who = []
        for _ in range(4):
            h = await login(client, uid("pa"))
            who.append((h, await bind(client, h, next_id())))

        async def hold(i: int, session: str, key: str | None = None) -> httpx.Response:
            h = dict(who[i][0])
            if key:
                h["Idempotency-Key"] = key
            return await client.post("/v1/holds", headers=h, json={
                "session_id": session, "slot_id": "0800", "patient_id": who[i][1]})

        booked = (await hold(0, sid)).json()["hold_id"]
        assert (await pay(client, booked, 5000)).status_code == 200
        held = (await hold(1, sid)).json()["hold_id"]  # taken before the pause
        r = await client.post(f"/v1/admin/sessions/{sid}/pause", headers=ADMIN,
                              json={"reason": "his_maintenance"})
        assert r.status_code == 200 and r.json() == {"sessions": [sid], "status": "paused"}
        paused = await hold(2, sid, key="k-paused")
        assert paused.status_code == 409 and kind(paused) == "paused", paused.text
        join = await client.post(f"/v1/sessions/{sid}/waitlist", headers=who[3][0],
                                 json={"patient_id": who[3][1]})
        assert join.status_code == 409 and kind(join) == "paused"
        # Nothing was cancelled; the hold from before the pause is paid and booked.
        assert (await pay(client, held, 5000)).status_code == 200
        view = (await client.get(f"/v1/holds/{booked}", headers=who[0][0])).json()
        assert view["state"] == "booked"
        avail = (await client.get(f"/v1/sessions/{sid}/availability")).json()["sessions"][0]
        assert avail["status"] == "paused"
        async with asyncpg.create_pool(db, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("SELECT status FROM sessions WHERE id=$1", sid) == "paused"
            trail = await pool.fetch("SELECT action, target FROM staff_audit WHERE target=$1",
                                     sid)
        assert ("session.pause", sid) in [(t["action"], t["target"]) for t in trail]
        # Resumed: the same Idempotency-Key gets a unit (the pause was not remembered).
        r = await client.post(f"/v1/admin/sessions/{sid}/resume", headers=ADMIN)
        assert r.status_code == 200
        again = await hold(2, sid, key="k-paused")
        assert again.status_code == 201, again.text
        # A whole department-day, and back.
        r = await client.post(f"/v1/admin/departments/{dept}/days/{specs[0].date}/pause",
                              headers=ADMIN, json={"reason": "paused"})
        assert r.status_code == 200 and sorted(r.json()["sessions"]) == sorted(
            s.session_id for s in specs)
        assert kind(await hold(3, specs[1].session_id)) == "paused"
        r = await client.post(f"/v1/admin/departments/{dept}/days/{specs[0].date}/resume",
                              headers=ADMIN)
        assert sorted(r.json()["sessions"]) == sorted(s.session_id for s in specs)
        assert kind(await hold(3, specs[1].session_id)) == "held"
        assert (await client.post(f"/v1/admin/departments/NOPE/days/{specs[0].date}/pause",
                                  headers=ADMIN, json={"reason": "x"})).status_code == 404
        # A suspended session is not paused.
        r = await client.post(f"/v1/admin/sessions/{specs[1].session_id}/suspend",
                              headers=ADMIN, json={"reason": "doctor_stopped"})
        assert r.status_code == 200
        r = await client.post(f"/v1/admin/sessions/{specs[1].session_id}/pause",
                              headers=ADMIN, json={"reason": "paused"})
        assert r.status_code == 409 and kind(r) == "invalid-state"
        # Paused again, Redis lost, rebuilt: still paused, the bookings back.
        await client.post(f"/v1/admin/sessions/{sid}/pause", headers=ADMIN,
                          json={"reason": "paused"})
    from tests.test_stats import drain

    await drain(redis_url, db)
    await wipe_and_rebuild(redis_url, db)
    async with Engine.connect(redis_url) as eng:
        assert await eng.session_status(sid) == "paused"
        a = await eng.audit(sid)
        assert a.ok and a.booked == 2, a.breaches  # the two paid before and during the pause
