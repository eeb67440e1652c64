"""What a patient can see (issue 13): GET /v1/holds lists the account's
live holds, the waitlist offers made for it (after the writer recorded
them) and its waitlist places with their positions; what ended leaves."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.apikit import bind, flushed_app, import_sessions, login, next_id, pay, uid
from tests.enginekit import make_spec
from tests.test_stats import drain


@pytest.fixture
async def app(fresh_redis: Any, redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db)


async def test_holds_offers_and_places(app: Litestar, redis_url: str, db: str) -> None:
    async with AsyncTestClient(app) as client:
        one = make_spec(uid("MS"), dept=uid("MD"), caps=(1,))
        spec = msgspec.structs.replace(one, waitlist_ttl_ms=60_000, waitlist_max=5)
        other = make_spec(uid("MO"), dept=uid("ME"), caps=(2,))
        await import_sessions(client, [spec, other])
        who = []
        for _ in range(3):
            h = await login(client, uid("me"))
            who.append((h, await bind(client, h, next_id())))

        async def hold(i: int, sid: str) -> Any:
            h, pid = who[i]
            return (await client.post("/v1/holds", headers=h, json={
                "session_id": sid, "slot_id": "0800", "patient_id": pid})).json()

        async def mine(i: int) -> Any:
            r = await client.get("/v1/holds", headers=who[i][0])
            assert r.status_code == 200, r.text
            return r.json()

        empty = await mine(0)
        assert empty["holds"] == [] and empty["waitlist"] == [] and empty["server_ms"] > 0
        first = await hold(0, spec.session_id)  # the one unit
        elsewhere = await hold(1, other.session_id)
        for i in (1, 2):  # both wait for the sold-out session
            r = await client.post(f"/v1/sessions/{spec.session_id}/waitlist",
                                  headers=who[i][0], json={"patient_id": who[i][1]})
            assert r.status_code == 201, r.text
        got = await mine(0)
        assert [h["hold_id"] for h in got["holds"]] == [first["hold_id"]]
        h0 = got["holds"][0]
        assert h0["expires_at_ms"] == first["expires_at_ms"] and h0["offer"] is False
        assert h0["patient_id"] == who[0][1] and got["waitlist"] == []
        got1 = await mine(1)
        assert [h["hold_id"] for h in got1["holds"]] == [elsewhere["hold_id"]]
        assert got1["waitlist"] == [{"session_id": spec.session_id, "position": 1,
                                     "patient_id": who[1][1]}]
        assert (await mine(2))["waitlist"][0]["position"] == 2
        # The first holder lets the unit go: the waitlist's head gets it as an offer.
        r = await client.delete(f"/v1/holds/{first['hold_id']}", headers=who[0][0])
        assert r.status_code == 200
        assert (await mine(0))["holds"] == []
        await drain(redis_url, db)  # the writer records the offer for its account
        got1 = await mine(1)
        offers = [h for h in got1["holds"] if h["offer"]]
        assert len(offers) == 1 and offers[0]["session_id"] == spec.session_id
        assert got1["waitlist"] == []  # offered: no longer waiting
        assert (await mine(2))["waitlist"][0]["position"] == 1
        # Paid: a booking now, not a hold.
        assert (await pay(client, offers[0]["hold_id"], 5000)).status_code == 200
        await asyncio.sleep(0)
        assert [h["hold_id"] for h in (await mine(1))["holds"]] == [elsewhere["hold_id"]]
        assert (await client.get("/v1/holds")).status_code == 401
