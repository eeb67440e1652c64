"""Hospital rules through the HTTP API: the waitlist (候补), the rules per
hospital, import with the rules applied, attendance and bans, late cancels,
and staff-channel holds (号源池). Real app (Litestar's AsyncTestClient) on
the private Redis and a fresh PostgreSQL database, patient rules on."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine.engine import Engine
from engine.model import SessionSpec, SlotSpec
from engine.rules import local_instant_ms
from engine.writer import OutboxWriter
from tests.apikit import (
    ADMIN,
    api,
    bind,
    flushed_app,
    import_sessions,
    login,
    national_id,
    pay,
)
from tests.enginekit import make_spec, now_ms

pytestmark = pytest.mark.timeout(120)
_ids = itertools.count(500_001)
Client = AsyncTestClient[Litestar]


def uid(prefix: str) -> str:
    return f"{prefix}r{next(_ids)}"


@pytest.fixture(scope="module")
async def app(redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db, patient_rules=True)


def is_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}", body
    return body


class Patient(msgspec.Struct):
    headers: dict[str, str]
    pid: str
    ref: str


async def patient(client: Client, app: Litestar) -> Patient:
    headers = await login(client, uid("u"))
    n = next(_ids)
    pid = await bind(client, headers, n)
    return Patient(headers, pid, api(app).crypto.id_hash(national_id(n)))


def spec(**kw: Any) -> SessionSpec:
    base = make_spec(uid("S"), dept=kw.pop("dept", uid("D")), caps=kw.pop("caps", (1,)),
                     starts_ms=kw.pop("starts_ms", 0))
    return msgspec.structs.replace(base, **kw)


async def hold(client: Client, p: Patient, sid: str, slot: str = "0800") -> httpx.Response:
    return await client.post("/v1/holds", headers=p.headers,
                             json={"session_id": sid, "slot_id": slot, "patient_id": p.pid})


async def book(client: Client, p: Patient, sid: str) -> str:
    r = await hold(client, p, sid)
    assert r.status_code == 201, r.text
    hid: str = r.json()["hold_id"]
    assert (await pay(client, hid, 5000, f"pay-{hid}")).status_code == 200
    return hid


async def drain_outbox(redis_url: str, db: str) -> None:
    async with Engine.connect(redis_url) as eng:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
        try:
            await OutboxWriter(eng, pool).run(asyncio.Event(), burst=True)
        finally:
            await pool.close()


async def put_rules(client: Client, hospital: str, doc: Any) -> httpx.Response:
    return await client.put(f"/v1/admin/rules/{hospital}", json=doc, headers=ADMIN)


# ------------------------------------------------------------------ waitlist


async def test_waitlist_join_replay_leave_and_offer(client: Client, app: Litestar,
                                                    redis_url: str) -> None:
    s = spec(waitlist_max=5, waitlist_ttl_ms=60_000)
    await import_sessions(client, [s])
    sid = s.session_id
    owner, waiter, other, third = [await patient(client, app) for _ in range(4)]
    url = f"/v1/sessions/{sid}/waitlist"

    is_problem(await client.post(url, headers=waiter.headers, json={"patient_id": waiter.pid}),
               409, "units-free")
    hid = await book(client, owner, sid)
    is_problem(await client.post(url, headers=owner.headers, json={"patient_id": owner.pid}),
               409, "duplicate")
    r = await client.post(url, headers=waiter.headers, json={"patient_id": waiter.pid})
    assert r.status_code == 201, r.text
    assert r.json()["position"] == 1 and r.json()["session_id"] == sid
    r = await client.post(url, headers=waiter.headers, json={"patient_id": waiter.pid})
    assert r.status_code == 200 and r.json()["position"] == 1 and r.json()["replay"] is True
    r = await client.post(url, headers=third.headers, json={"patient_id": third.pid})
    assert r.status_code == 201 and r.json()["position"] == 2

    # Only one's own patients; unknown sessions and bodies with extra fields.
    is_problem(await client.post(url, headers=other.headers, json={"patient_id": waiter.pid}),
               404, "not-found")
    is_problem(await client.post("/v1/sessions/nope/waitlist", headers=waiter.headers,
                                 json={"patient_id": waiter.pid}), 404, "not-found")
    is_problem(await client.post(url, headers=waiter.headers,
                                 json={"patient_id": waiter.pid, "x": 1}), 422, "invalid-input")
    is_problem(await client.post(url, json={"patient_id": waiter.pid}), 401, "unauthorized")
    is_problem(await client.delete(f"{url}/{third.pid}", headers=other.headers), 404,
               "not-found")

    avail = (await client.get(f"/v1/sessions/{sid}/availability")).json()
    assert avail["sessions"][0]["waiting"] == 2
    assert (await client.delete(f"{url}/{third.pid}", headers=third.headers)).status_code == 204
    assert (await client.delete(f"{url}/{third.pid}", headers=third.headers)).status_code == 204
    assert (await client.get(f"/v1/sessions/{sid}/availability")).json()[
        "sessions"][0]["waiting"] == 1

    # The owner cancels: the unit goes to the waiting patient as a hold.
    assert (await client.post(f"/v1/bookings/{hid}/cancel", headers=owner.headers)
            ).status_code == 200
    is_problem(await hold(client, other, sid), 409, "sold-out")
    async with Engine.connect(redis_url) as eng:
        snap = await eng.snapshot(sid)
    assert snap is not None
    recs = [msgspec.json.decode(rec) if isinstance(rec, str | bytes) else rec
            for _, rec, _ in snap["used"]]
    offers = [r for r in recs if r and r.get("st") == "h"]
    assert [o["pat"] for o in offers] == [waiter.ref]
    offer_id = offers[0]["id"]
    view = (await client.get(f"/v1/holds/{offer_id}", headers=waiter.headers)).json()
    assert view["state"] == "held" and view["session_id"] == sid
    assert (await pay(client, offer_id, 5000, "pay-offer")).json()["status"] == "booked"


# ------------------------------------------------------------------ rules


async def test_rules_round_trip_and_invalid(client: Client) -> None:
    hospital = uid("H")
    got = (await client.get(f"/v1/admin/rules/{hospital}", headers=ADMIN)).json()
    assert got["default"]["release_days_ahead"] == 7 and got["departments"] == {}
    doc = {"default": {"release_days_ahead": 3, "release_time": "08:00", "waitlist_max": 5},
           "departments": {"D1": {"cutoff_time": "12:00"}}}
    r = await put_rules(client, hospital, doc)
    assert r.status_code == 200, r.text
    got = (await client.get(f"/v1/admin/rules/{hospital}", headers=ADMIN)).json()
    assert got == r.json()
    assert got["default"]["release_days_ahead"] == 3 and got["default"]["waitlist_max"] == 5
    assert got["departments"] == {"D1": {"cutoff_time": "12:00"}}

    for bad in ({"default": {"release_time": "25:00"}},
                {"default": {"nope": 1}},
                {"departments": {"D1": {"nope": 1}}},
                {"departments": {"D1": {"waitlist_max": -1}}},
                {"default": {}, "extra": True}):
        is_problem(await put_rules(client, hospital, bad), 422, "invalid-input")
    assert (await client.get(f"/v1/admin/rules/{hospital}", headers=ADMIN)).json() == got
    is_problem(await client.get(f"/v1/admin/rules/{hospital}"), 401, "unauthorized")
    is_problem(await client.put(f"/v1/admin/rules/{hospital}", json=doc), 401, "unauthorized")


async def test_import_applies_the_stored_rules(client: Client) -> None:
    hospital, dept = uid("H"), uid("D")
    assert (await put_rules(client, hospital, {
        "default": {"release_days_ahead": 3, "release_time": "08:00", "tz_min": 480,
                    "waitlist_max": 4},
        "departments": {dept: {"release_time": "09:30"}}})).status_code == 200
    plain = spec(hospital=hospital, date="2026-12-01")
    ruled = spec(hospital=hospital, date="2026-12-01")
    override = spec(hospital=hospital, dept=dept, date="2026-12-01")
    await import_sessions(client, [plain])
    r = await client.post("/v1/admin/sessions?apply_rules=true",
                          content=msgspec.json.encode([ruled, override]),
                          headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text

    async def release_at(sid: str) -> int:
        a = (await client.get(f"/v1/sessions/{sid}/availability")).json()
        at: int = a["sessions"][0]["release_at_ms"]
        return at

    assert await release_at(plain.session_id) == plain.release_at_ms
    assert await release_at(ruled.session_id) == local_instant_ms("2026-12-01", "08:00", 480, 3)
    assert await release_at(override.session_id) == local_instant_ms("2026-12-01", "09:30",
                                                                     480, 3)


# ------------------------------------------------------------------ no-shows and bans


async def test_no_shows_ban_then_admin_lifts(client: Client, app: Litestar, redis_url: str,
                                             db: str) -> None:
    hospital = uid("H")
    assert (await put_rules(client, hospital, {
        "default": {"no_show_limit": 3, "no_show_window_days": 30, "ban_days": 14}})
    ).status_code == 200
    p = await patient(client, app)
    sessions = [spec(hospital=hospital) for _ in range(4)]
    await import_sessions(client, sessions)
    booked = [await book(client, p, s.session_id) for s in sessions[:3]]

    url = "/v1/admin/bookings/{}/attendance"
    # Not in the record yet (the outbox writer has not run): 404.
    is_problem(await client.post(url.format(booked[0]), json={"attended": False},
                                 headers=ADMIN), 404, "not-found")
    await drain_outbox(redis_url, db)
    is_problem(await client.post(url.format("1.nope.1"), json={"attended": False},
                                 headers=ADMIN), 404, "not-found")
    is_problem(await client.post(url.format(booked[0]), json={"attended": "no"},
                                 headers=ADMIN), 422, "invalid-input")
    is_problem(await client.post(url.format(booked[0]), json={"attended": False}), 401,
               "unauthorized")
    answers = []
    for b in booked:
        r = await client.post(url.format(b), json={"attended": False}, headers=ADMIN)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert [a["strikes"] for a in answers] == [1, 2, 3]
    assert [a["attendance"] for a in answers] == ["no_show"] * 3
    assert answers[0]["banned_until_ms"] is None
    until = answers[2]["banned_until_ms"]
    assert until > now_ms() + 13 * 86_400_000

    body = is_problem(await hold(client, p, sessions[3].session_id), 403, "banned")
    assert body["until_ms"] == until and body["detail"]

    r = await client.delete(f"/v1/admin/patients/{p.ref}/ban", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"patient_ref": p.ref, "lifted": 1}
    assert (await hold(client, p, sessions[3].session_id)).status_code == 201
    r = await client.delete(f"/v1/admin/patients/{p.ref}/ban", headers=ADMIN)
    assert r.status_code == 200 and r.json()["lifted"] == 0


async def test_late_cancel_counts_toward_a_ban(client: Client, app: Litestar, redis_url: str,
                                               db: str) -> None:
    hospital = uid("H")
    assert (await put_rules(client, hospital, {
        "default": {"no_show_limit": 1, "late_cancels_count": True}})).status_code == 200
    p = await patient(client, app)
    soon = spec(hospital=hospital, starts_ms=now_ms() + 3_600_000)
    later = spec(hospital=hospital)
    await import_sessions(client, [soon, later])
    hid = await book(client, p, soon.session_id)
    await drain_outbox(redis_url, db)
    r = await client.post(f"/v1/bookings/{hid}/cancel", headers=p.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # The outbox writer records the late cancel and applies the policy: one
    # home for the rule (the API used to apply it too, and could ban twice).
    await drain_outbox(redis_url, db)
    is_problem(await hold(client, p, later.session_id), 403, "banned")
    assert (await client.delete(f"/v1/admin/patients/{p.ref}/ban", headers=ADMIN)
            ).json()["lifted"] == 1
    pool = await asyncpg.connect(db)
    try:
        assert await pool.fetchval("SELECT count(*) FROM patient_bans WHERE patient_ref = $1",
                                   p.ref) == 1
    finally:
        await pool.close()


# ------------------------------------------------------------------ staff channels


async def test_staff_channel_hold_draws_from_its_pool(client: Client, app: Litestar) -> None:
    slot = SlotSpec(slot_id="0800", start="08:00", end="08:30", capacity=2,
                    pools={"referral": 2})
    s = spec(slots=[slot])
    await import_sessions(client, [s])
    sid = s.session_id
    p = await patient(client, app)
    a = (await client.get(f"/v1/sessions/{sid}/availability")).json()
    assert a["sessions"][0]["slots"][0]["free"] == 0
    is_problem(await hold(client, p, sid), 409, "sold-out")

    def staff(ref: str, channel: str = "referral", key: str = "") -> Any:
        h = dict(ADMIN)
        if key:
            h["Idempotency-Key"] = key
        return client.post("/v1/admin/holds", headers=h, json={
            "session_id": sid, "slot_id": "0800", "patient_ref": ref, "channel": channel})

    r = await staff("ref-a", key="k-a")
    assert r.status_code == 201, r.text
    first = r.json()
    again = await staff("ref-a", key="k-a")
    assert again.status_code == 201 and again.json()["hold_id"] == first["hold_id"]
    assert again.json()["replay"] is True and again.headers["idempotent-replayed"] == "true"
    is_problem(await staff("ref-p", channel="phone"), 409, "sold-out")
    assert (await staff("ref-b")).status_code == 201
    is_problem(await staff("ref-c"), 409, "sold-out")
    is_problem(await staff("ref-d", channel="fax"), 422, "invalid-input")
    is_problem(await client.post("/v1/admin/holds", headers=p.headers, json={
        "session_id": sid, "slot_id": "0800", "patient_ref": "x", "channel": "phone"}),
        401, "unauthorized")
    r = await pay(client, first["hold_id"], 5000, "pay-staff")
    assert r.status_code == 200 and r.json()["status"] == "booked"
    # At the window the clerk reads the ID card: the server finds the patient.
    window = make_spec(f"W{next(_ids)}", dept=f"WD{next(_ids)}", caps=(2,))
    window = msgspec.structs.replace(window, slots=[msgspec.structs.replace(
        window.slots[0], pools={"window": 2})])
    await import_sessions(client, [window])
    nid = national_id(next(_ids))
    by_card = await client.post("/v1/admin/holds", headers=ADMIN, json={
        "session_id": window.session_id, "slot_id": "0800", "national_id": nid,
        "channel": "window"})
    assert by_card.status_code == 201, by_card.text
    with client.portal() as portal:  # the app's engine lives in the app's loop
        rec = portal.call(api(app).engine.record, by_card.json()["hold_id"])
    assert rec is not None and rec.patient == api(app).crypto.id_hash(nid)
    for bad in ({"national_id": "110101199003071230"}, {},
                {"national_id": nid, "patient_ref": "ref-z"}):
        r = await client.post("/v1/admin/holds", headers=ADMIN, json={
            "session_id": window.session_id, "slot_id": "0800", "channel": "window", **bad})
        assert r.status_code == 422, (bad, r.text)
