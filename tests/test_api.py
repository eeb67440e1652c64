"""The HTTP API, every endpoint and documented outcome, through the real app
(Litestar's AsyncTestClient) on the private Redis and a fresh PostgreSQL
database. One app serves the whole module; tests use their own sessions and
accounts so they do not depend on each other's order."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.auth import Code2SessionVerifier, InvalidLoginCode, LoginUnavailable, TokenSigner
from api.logs import configure_logging
from api.problems import REASONS
from api.settings import Settings, SettingsError
from engine import keys as K
from engine.engine import Engine
from engine.outcomes import Reason
from engine.pii import mask_id
from engine.store import queries as q
from engine.writer import OutboxWriter
from tests.apikit import (
    ADMIN,
    ADMIN_TOKEN,
    api,
    bind,
    flushed_app,
    import_sessions,
    login,
    national_id,
    next_id,
    pay,
    payment_headers,
    settings,
    uid,
)
from tests.enginekit import make_spec, now_ms

pytestmark = pytest.mark.timeout(120)
Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
async def app(redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db, patient_rules=True, max_active_per_patient=3)


def is_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}", body
    assert body["status"] == status and body["title"]
    return body


async def session(client: Client, **kw: Any) -> str:
    sid = uid("S")
    kw.setdefault("dept", uid("D"))
    await import_sessions(client, [make_spec(sid, **kw)])
    return sid


async def account(client: Client, i: int | None = None) -> tuple[dict[str, str], str]:
    headers = await login(client, uid("u"))
    pid = await bind(client, headers, next_id() if i is None else i)
    return headers, pid


async def hold(client: Client, headers: dict[str, str], sid: str, pid: str,
               slot: str = "0800", key: str | None = None) -> httpx.Response:
    h = dict(headers)
    if key is not None:
        h["Idempotency-Key"] = key
    return await client.post("/v1/holds", headers=h,
                             json={"session_id": sid, "slot_id": slot, "patient_id": pid})


# ------------------------------------------------------------------ ops


async def test_ops_endpoints(client: Client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["redis"] and r.json()["postgres"]
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200 and "/v1/holds" in r.json()["paths"]
    assert (await client.get("/problems/sold-out")).json()["status"] == 409
    is_problem(await client.get("/problems/nope"), 404, "not-found")
    is_problem(await client.get("/nope"), 404, "not-found")
    r = await client.put("/healthz")
    is_problem(r, 405, "method-not-allowed")
    assert "GET" in r.headers["allow"]
    m = await client.get("/metrics")
    assert m.status_code == 200 and "haoyuan_http_request_duration_seconds" in m.text
    assert "haoyuan_writer_pending_entries" in m.text and "haoyuan_his_pending_bookings" in m.text


def test_every_reason_has_a_problem_type() -> None:
    assert set(REASONS) == set(Reason)
    assert len({k.slug for k in REASONS.values()}) == len(REASONS)


def test_settings_from_env() -> None:
    dev = {"HAOYUAN_ENV": "development"}
    s = Settings.from_env({**dev, "HAOYUAN_MAX_INFLIGHT": "7", "HAOYUAN_ACCESS_LOG": "off",
                           "HAOYUAN_WECHAT_MODE": "dev"})
    assert s.max_inflight == 7 and s.access_log is False
    with pytest.raises(SettingsError):
        Settings.from_env({**dev, "HAOYUAN_MAX_INFLIGHT": "many"})
    with pytest.raises(SettingsError):
        Settings.from_env({**dev, "HAOYUAN_WECHAT_MODE": "other"})
    with pytest.raises(SettingsError):  # production refuses development secrets
        Settings.from_env({"HAOYUAN_ENV": "production"})


# ------------------------------------------------------------------ accounts


async def test_login(client: Client) -> None:
    openid = uid("o")
    a = (await client.post("/v1/auth/wechat", json={"code": f"dev-{openid}"})).json()
    b = (await client.post("/v1/auth/wechat", json={"code": f"dev-{openid}"})).json()
    assert a["account_id"] == b["account_id"] and a["token_type"] == "Bearer"
    assert a["expires_at_ms"] > now_ms()
    is_problem(await client.post("/v1/auth/wechat", json={"code": "forged"}), 401,
               "invalid-login-code")
    is_problem(await client.post("/v1/auth/wechat", json={}), 422, "invalid-input")
    is_problem(await client.post("/v1/auth/wechat", json={"code": "dev-x", "openid": "y"}),
               422, "invalid-input")


async def test_tokens_are_checked(client: Client) -> None:
    headers, _ = await account(client)
    token = headers["Authorization"][7:]
    acct, exp, sig = token.split(".")
    for bad in (None, "Bearer nonsense", f"Bearer {acct}.{exp}.{sig[:-2]}xx",
                f"Bearer other.{exp}.{sig}", f"Bearer {acct}.{int(exp) + 1}.{sig}", "Basic abc"):
        h = {} if bad is None else {"Authorization": bad}
        r = await client.get("/v1/patients", headers=h)
        is_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    signer = TokenSigner("s" * 20, ttl_s=60)
    old, _ = signer.mint("a1", now=time.time() - 120)
    assert signer.verify(old) is None
    fresh, _ = signer.mint("a1")
    assert signer.verify(fresh) == "a1" and TokenSigner("t" * 20, 60).verify(fresh) is None
    # An account token is no admin token, nor a payment signature.
    is_problem(await client.post("/v1/admin/audit", headers=headers), 401, "unauthorized")
    is_problem(await client.post("/v1/holds/1.S.1/confirm", headers=headers,
                                 json={"payment_ref": "p", "amount": 1}), 401, "bad-signature")


async def test_code2session_verifier(client: Client, app: Litestar) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        code = request.url.params["js_code"]
        if code == "good":
            return httpx.Response(200, json={"openid": "wx-open-1", "session_key": "SECRET"})
        if code == "busy":
            return httpx.Response(200, json={"errcode": -1, "errmsg": "system busy"})
        if code == "down":
            raise httpx.ConnectError("down")
        return httpx.Response(200, json={"errcode": 40029, "errmsg": "invalid code"})

    v = Code2SessionVerifier("https://wx.test/sns/jscode2session", "appid", "appsecret",
                             client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    assert await v.openid("good") == "wx-open-1"
    assert seen[0].url.params["appid"] == "appid"
    assert seen[0].url.params["grant_type"] == "authorization_code"
    with pytest.raises(InvalidLoginCode):
        await v.openid("bad")
    with pytest.raises(LoginUnavailable):
        await v.openid("busy")
    with pytest.raises(LoginUnavailable):
        await v.openid("down")
    a = api(app)
    dev, a.verifier = a.verifier, v
    try:
        r = await client.post("/v1/auth/wechat", json={"code": "good"})
        assert r.status_code == 200 and "SECRET" not in r.text and "wx-open-1" not in r.text
        is_problem(await client.post("/v1/auth/wechat", json={"code": "bad"}), 401,
                   "invalid-login-code")
        is_problem(await client.post("/v1/auth/wechat", json={"code": "down"}), 503,
                   "unavailable")
        is_problem(await client.post("/v1/auth/wechat", json={"code": "dev-x"}), 401,
                   "invalid-login-code")
    finally:
        a.verifier = dev


# ------------------------------------------------------------------ patients


async def test_patients_bind_list_unbind(client: Client) -> None:
    headers = await login(client, uid("u"))
    n = next(i for i in itertools.count(10**5 + next_id() * 11) if national_id(i).endswith("X"))
    nid = national_id(n)
    lower_x = nid[:-1] + "x"
    r = await client.post("/v1/patients", headers=headers, json={
        "name": "欧阳娜娜", "phone": "+86 138-1234-5678", "national_id": lower_x})
    assert r.status_code == 201, r.text
    p = r.json()
    assert p == {**p, "name": "欧**娜", "phone": "138****5678", "national_id": mask_id(nid)}
    again = await client.post("/v1/patients", headers=headers, json={
        "name": "欧阳娜娜", "phone": "13812345678", "national_id": nid})
    assert again.status_code == 201 and again.json()["patient_id"] == p["patient_id"]
    listed = (await client.get("/v1/patients", headers=headers)).json()
    assert [x["patient_id"] for x in listed] == [p["patient_id"]]
    assert nid not in r.text + again.text + str(listed) and "13812345678" not in str(listed)
    r = await client.delete(f"/v1/patients/{p['patient_id']}", headers=headers)
    assert r.status_code == 204
    is_problem(await client.delete(f"/v1/patients/{p['patient_id']}", headers=headers), 404,
               "not-found")
    is_problem(await client.delete("/v1/patients/not-a-uuid", headers=headers), 404, "not-found")
    assert (await client.get("/v1/patients", headers=headers)).json() == []


async def test_binding_mirror_serves_holds_and_unbind_tombstones(
    client: Client, app: Litestar, redis_url: str
) -> None:
    """Holds resolve the patient from the Redis binding mirror (the store only
    on a miss, which fills it); an unbind's tombstone wins over a late fill."""
    a = api(app)
    sid = await session(client)
    n = 900_000 + next_id()
    headers, pid = await account(client, n)
    acct = a.tokens.verify(headers["Authorization"][7:])
    assert acct is not None
    ref = a.crypto.id_hash(national_id(n))
    async with Engine.connect(redis_url) as eng:
        assert await eng.binding(acct, pid) == ref  # written by the bind
        await eng.client.delete(K.binding_mirror(acct))  # e.g. Redis lost it
        assert (await hold(client, headers, sid, pid)).status_code == 201  # store, then filled
        assert await eng.binding(acct, pid) == ref
        # The mirror is what holds read: a tombstone makes the patient unknown
        # at once, whatever the store said (no worker caches a ref).
        await eng.mirror_binding(acct, pid, None)
        is_problem(await hold(client, headers, sid, pid, slot="0830"), 404, "not-found")
        await eng.mirror_binding(acct, pid, ref)
        is_problem(await hold(client, headers, sid, pid, slot="0830"), 409, "duplicate")
        assert (await client.delete(f"/v1/patients/{pid}", headers=headers)).status_code == 204
        assert await eng.binding(acct, pid) == ""
        assert not await eng.mirror_binding(acct, pid, ref, fill=True)
        is_problem(await hold(client, headers, sid, pid, slot="0830"), 404, "not-found")
        # Binding the same person again is a new binding with its own id.
        again = await bind(client, headers, n)
        assert again != pid and await eng.binding(acct, again) == ref


async def test_unbind_wins_over_concurrent_fills_of_the_binding_mirror(
    client: Client, app: Litestar, redis_url: str, db: str
) -> None:
    """Many holds that read the store before the unbind and fill the mirror
    after it race with the unbind: none of them brings the binding back."""
    a = api(app)
    sid = await session(client)
    headers, pid = await account(client)
    acct = a.tokens.verify(headers["Authorization"][7:])
    assert acct is not None
    pool = await asyncpg.create_pool(db, min_size=4, max_size=8)
    stop = asyncio.Event()
    fills = 0
    try:
        async with Engine.connect(redis_url) as eng:
            await eng.client.delete(K.binding_mirror(acct))  # every racer misses

            async def racer() -> None:
                nonlocal fills
                while not stop.is_set():
                    ref = await q.get_patient_ref(pool, acct, pid)
                    await asyncio.sleep(0.001)  # the unbind may land in between
                    if ref is not None:
                        await eng.mirror_binding(acct, pid, ref, fill=True)
                        fills += 1
                    await asyncio.sleep(0)

            racers = [asyncio.create_task(racer()) for _ in range(32)]
            await asyncio.sleep(0.2)
            r = await client.delete(f"/v1/patients/{pid}", headers=headers)
            assert r.status_code == 204
            await asyncio.sleep(0.3)  # racers that read the store before the unbind fill now
            stop.set()
            await asyncio.gather(*racers)
            assert fills > 0
            assert await eng.binding(acct, pid) == ""
        for i in range(3):
            is_problem(await hold(client, headers, sid, pid, key=f"after-{i}"), 404, "not-found")
    finally:
        stop.set()
        await pool.close()


@pytest.mark.parametrize(
    ("nid", "slug"),
    [
        ("110101199003071231", "invalid-national-id"),  # check digit
        ("110101900307123", "invalid-national-id"),  # legacy 15 digits
        ("110101199013071235", "invalid-national-id"),  # month 13
        ("abc", "invalid-national-id"),
    ],
)
async def test_patient_bad_id_is_422_without_echo(client: Client, nid: str, slug: str) -> None:
    headers = await login(client, uid("u"))
    r = await client.post("/v1/patients", headers=headers,
                          json={"name": "张三", "phone": "13812345678", "national_id": nid})
    is_problem(r, 422, slug)
    assert nid not in r.text


async def test_patient_full_width_id_is_normalised(client: Client) -> None:
    headers = await login(client, uid("u"))
    nid = national_id(next_id())
    wide = "".join(chr(ord(c) + 0xFEE0) for c in nid)
    r = await client.post("/v1/patients", headers=headers,
                          json={"name": "张三", "phone": "13812345678", "national_id": wide})
    assert r.status_code == 201 and r.json()["national_id"] == mask_id(nid)


async def test_patient_bad_phone_and_limit(client: Client) -> None:
    headers = await login(client, uid("u"))
    r = await client.post("/v1/patients", headers=headers, json={
        "name": "张三", "phone": "12345", "national_id": national_id(next_id())})
    is_problem(r, 422, "invalid-phone")
    for _ in range(5):
        await bind(client, headers, next_id())
    r = await client.post("/v1/patients", headers=headers, json={
        "name": "张三", "phone": "13812345678", "national_id": national_id(next_id())})
    is_problem(r, 409, "patient-limit")
    r = await client.post("/v1/patients", headers=headers, json={
        "name": "张三", "phone": "13812345678", "national_id": national_id(1), "admin": True})
    is_problem(r, 422, "invalid-input")


# ------------------------------------------------------------------ browse


async def test_browse(client: Client) -> None:
    dept = uid("D")
    sid = await session(client, dept=dept, date="2026-12-03")
    hospitals = (await client.get("/v1/hospitals")).json()
    assert {"hospital_id": "H1", "name": "H1"} in hospitals
    depts = (await client.get("/v1/hospitals/H1/departments")).json()
    assert any(d["dept_id"] == dept for d in depts)
    is_problem(await client.get("/v1/hospitals/nope/departments"), 404, "not-found")
    doctors = (await client.get(f"/v1/departments/{dept}/doctors")).json()
    assert doctors == [{"doctor_id": "DR1", "dept_id": dept, "hospital_id": "H1",
                        "name": "DR1", "title": None}] or doctors[0]["doctor_id"] == "DR1"
    is_problem(await client.get("/v1/departments/nope/doctors"), 404, "not-found")
    got = (await client.get("/v1/sessions", params={
        "from": "2026-12-03", "to": "2026-12-03", "dept": dept})).json()
    assert [s["session_id"] for s in got] == [sid]
    assert got[0]["slots"][0] == {"slot_id": "0800", "start": "08:00", "end": "08:30",
                                  "capacity": 3}
    assert got[0]["fee"] == 5000 and got[0]["status"] == "open"
    is_problem(await client.get("/v1/sessions", params={"from": "2026-12-01", "to": "2027-02-01"}),
               422, "invalid-input")
    is_problem(await client.get("/v1/sessions", params={"from": "2026-13-01", "to": "2026-12-01"}),
               422, "invalid-input")
    is_problem(await client.get("/v1/sessions"), 422, "invalid-input")
    one = (await client.get(f"/v1/sessions/{sid}")).json()
    assert one["session_id"] == sid and one["dept_id"] == dept
    is_problem(await client.get("/v1/sessions/nope"), 404, "not-found")
    is_problem(await client.get("/v1/sessions/bad%20id"), 404, "not-found")


async def test_availability(client: Client, app: Litestar) -> None:
    dept = uid("D")
    sid = await session(client, dept=dept, date="2026-12-04", caps=(2, 1))
    a = (await client.get(f"/v1/sessions/{sid}/availability")).json()
    assert a["server_ms"] > 0
    (s,) = a["sessions"]
    assert s["session_id"] == sid and s["status"] == "open"
    assert [(x["slot_id"], x["capacity"], x["free"]) for x in s["slots"]] == [
        ("0800", 2, 2), ("0830", 1, 1)]
    headers, pid = await account(client)
    assert (await hold(client, headers, sid, pid)).status_code == 201
    api(app).availability_cache.clear()
    a = (await client.get(f"/v1/sessions/{sid}/availability")).json()
    assert a["sessions"][0]["slots"][0]["free"] == 1
    d = (await client.get(f"/v1/departments/{dept}/days/2026-12-04/availability")).json()
    assert [x["session_id"] for x in d["sessions"]] == [sid]
    assert (await client.get(f"/v1/departments/{dept}/days/2026-12-05/availability")
            ).json()["sessions"] == []
    is_problem(await client.get("/v1/sessions/nope/availability"), 404, "not-found")
    is_problem(await client.get(f"/v1/departments/{dept}/days/tomorrow/availability"), 404,
               "not-found")
    m = (await client.get("/metrics")).text
    assert f'haoyuan_inventory_free_units{{session="{sid}"' in m or f'session="{sid}"' in m


async def test_availability_is_coalesced_and_shed(client: Client, app: Litestar) -> None:
    sid = await session(client)
    a = api(app)
    a.availability_cache.clear()
    loads = a.availability_cache.loads
    rs = await asyncio.gather(*(client.get(f"/v1/sessions/{sid}/availability") for _ in range(5)))
    assert all(r.status_code == 200 for r in rs)
    assert a.availability_cache.loads - loads == 1  # micro-cached
    a.availability_cache.clear()
    a.admission.limit = 0
    try:
        r = await client.get(f"/v1/sessions/{sid}/availability")
    finally:
        a.admission.limit = a.settings.max_inflight
    body = is_problem(r, 429, "overloaded")
    assert int(r.headers["retry-after"]) >= 1 and body["retry_after_ms"] > 0


# ------------------------------------------------------------------ holds


async def test_hold_and_idempotent_replay(client: Client) -> None:
    sid = await session(client)
    headers, pid = await account(client)
    r = await hold(client, headers, sid, pid, key="k-1")
    assert r.status_code == 201, r.text
    h = r.json()
    assert h["session_id"] == sid and h["slot_id"] == "0800" and h["unit"] == 1
    assert h["expires_at_ms"] > h["server_ms"] and h["replay"] is False
    again = await hold(client, headers, sid, pid, key="k-1")
    assert again.status_code == 201 and again.json()["hold_id"] == h["hold_id"]
    assert again.json()["replay"] is True and again.headers["idempotent-replayed"] == "true"
    is_problem(await hold(client, headers, sid, pid, slot="0830", key="k-1"), 422,
               "idempotency-mismatch")
    body = is_problem(await hold(client, headers, sid, pid, slot="0830", key="k-2"), 409,
                      "duplicate")
    assert body["server_ms"] > 0
    view = (await client.get(f"/v1/holds/{h['hold_id']}", headers=headers)).json()
    assert view["state"] == "held" and view["fee"] == 5000 and view["unit"] == 1


async def test_hold_bad_input(client: Client) -> None:
    sid = await session(client)
    headers, pid = await account(client)
    for body in ({"session_id": sid, "slot_id": "0800"},
                 {"session_id": sid, "slot_id": "0800", "patient_id": pid, "unit": 3},
                 {"session_id": "bad id", "slot_id": "0800", "patient_id": pid},
                 {"session_id": sid, "slot_id": 800, "patient_id": pid}):
        is_problem(await client.post("/v1/holds", headers=headers, json=body), 422,
                   "invalid-input")
    r = await client.post("/v1/holds", headers={**headers, "Content-Type": "application/json"},
                          content=b"{not json")
    is_problem(r, 422, "invalid-input")
    is_problem(await hold(client, headers, sid, pid, key="bad key!"), 422, "invalid-input")
    is_problem(await hold(client, headers, "nope", pid), 404, "not-found")
    is_problem(await hold(client, headers, sid, pid, slot="0900"), 404, "not-found")
    is_problem(await hold(client, headers, sid, "00000000-0000-0000-0000-000000000000"), 404,
               "not-found")
    is_problem(await client.post("/v1/holds", json={"session_id": sid, "slot_id": "0800",
                                                    "patient_id": pid}), 401, "unauthorized")
    big = b'{"session_id":"' + b"x" * 5_000_000 + b'"}'
    r = await client.post("/v1/holds", headers={**headers, "Content-Type": "application/json"},
                          content=big)
    is_problem(r, 413, "too-large")


async def test_sold_out_then_cached(client: Client, app: Litestar) -> None:
    sid = await session(client, caps=(1, 1))
    (h1, p1), (h2, p2), (h3, p3) = [await account(client) for _ in range(3)]
    r1 = await hold(client, h1, sid, p1)
    assert r1.status_code == 201
    body = is_problem(await hold(client, h2, sid, p2), 409, "sold-out")
    assert body["server_ms"] > 0 and body["detail"]
    assert api(app).soldout.hit(sid, "0800")
    is_problem(await hold(client, h3, sid, p3), 409, "sold-out")  # from the cache
    m = (await client.get("/metrics")).text
    assert re.search(r'haoyuan_decisions_total\{op="hold",outcome="sold-out-cached"', m)
    # A new keyed request is answered from the cache too, and its answer is
    # stored under the key: once a unit comes back, the retry still gets it...
    is_problem(await hold(client, h3, sid, p3, key="k3"), 409, "sold-out")
    released = await client.delete(f"/v1/holds/{r1.json()['hold_id']}", headers=h1)
    assert released.status_code == 200 and not api(app).soldout.hit(sid, "0800")
    is_problem(await hold(client, h3, sid, p3, key="k3"), 409, "sold-out")  # the first answer
    assert (await hold(client, h2, sid, p2, key="k2-new")).status_code == 201  # a unit was free
    # ...and the retry of a hold whose 201 was lost replays its first answer.
    h4, p4 = await account(client)
    first = await hold(client, h4, sid, p4, slot="0830", key="k4")
    assert first.status_code == 201
    api(app).soldout.mark(sid, "0830")
    again = await hold(client, h4, sid, p4, slot="0830", key="k4")
    assert again.status_code == 201 and again.json()["replay"] is True
    m = (await client.get("/metrics")).text
    cached = re.search(r'haoyuan_decisions_total\{op="hold",outcome="sold-out-cached"[^}]*\} '
                       r'([0-9.]+)', m)
    assert cached is not None and float(cached.group(1)) >= 1
    keyed = re.search(r'haoyuan_decisions_total\{op="hold",outcome="sold-out-cached-keyed"'
                      r'[^}]*\} ([0-9.]+)', m)
    assert keyed is not None and float(keyed.group(1)) >= 1


async def test_not_open_with_release_instant_and_local_answer(
    client: Client, app: Litestar
) -> None:
    release = now_ms() + 3_600_000
    sid = await session(client, release_at_ms=release)
    headers, pid = await account(client)
    body = is_problem(await hold(client, headers, sid, pid), 409, "not-open")
    assert body["release_at_ms"] == release and abs(body["server_ms"] - now_ms()) < 5000
    body = is_problem(await hold(client, headers, sid, pid, key="k"), 409, "not-open")
    assert body["release_at_ms"] == release
    m = (await client.get("/metrics")).text
    assert re.search(r'outcome="not-open-cached"', m)


async def test_suspended_closed_rate_limited_and_shed(client: Client, app: Litestar) -> None:
    sid = await session(client)
    r = await client.post(f"/v1/admin/sessions/{sid}/suspend", headers=ADMIN, json={})
    assert r.status_code == 200
    headers, pid = await account(client)
    is_problem(await hold(client, headers, sid, pid), 409, "suspended")
    closed = await session(client, cutoff_ms=now_ms() - 1000)
    body = is_problem(await hold(client, headers, closed, pid), 409, "closed")
    assert body["cutoff_ms"] > 0
    # Rate limit: the account's burst (10) of decisions, then 429 with Retry-After.
    open_ = await session(client)
    codes = [(await hold(client, headers, open_, pid, key=f"r{i}")) for i in range(14)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    body = is_problem(limited[0], 429, "rate-limited")
    assert int(limited[0].headers["retry-after"]) >= 1 and body["retry_after_ms"] > 0
    a = api(app)
    a.admission.limit = 0
    rate = a.waiting.rate
    try:
        h2, p2 = await account(client)
        # Shed with the waiting room on (the default): a ticket and a place.
        r = await hold(client, h2, open_, p2)
        body = is_problem(r, 429, "waiting-room")
        assert body["ticket"].startswith("wr1.") and body["position"] >= 1
        assert int(r.headers["retry-after"]) >= 1 and body["retry_after_ms"] >= 100
        # ... and with it off: a plain 429.
        a.waiting.rate = 0
        r = await hold(client, h2, open_, p2)
    finally:
        a.admission.limit = a.settings.max_inflight
        a.waiting.rate = rate
    is_problem(r, 429, "overloaded")
    assert int(r.headers["retry-after"]) >= 1


async def test_banned_and_limit_reached(client: Client, app: Litestar, redis_url: str) -> None:
    headers = await login(client, uid("u"))
    n = next_id()
    pid = await bind(client, headers, n)
    ref = api(app).crypto.id_hash(national_id(n))
    async with Engine.connect(redis_url) as eng:
        await eng.ban(ref, now_ms() + 60_000)
        body = is_problem(await hold(client, headers, await session(client), pid), 403, "banned")
        assert body["until_ms"] > now_ms()
        await eng.ban(ref, 0)
    for _ in range(3):  # three departments, one hold each: the hospital's limit
        assert (await hold(client, headers, await session(client), pid)).status_code == 201
    is_problem(await hold(client, headers, await session(client), pid), 409, "limit-reached")


async def test_release(client: Client) -> None:
    sid = await session(client, caps=(1,))
    headers, pid = await account(client)
    other, opid = await account(client)
    hid = (await hold(client, headers, sid, pid)).json()["hold_id"]
    is_problem(await client.delete(f"/v1/holds/{hid}", headers=other), 404, "not-found")
    r = await client.delete(f"/v1/holds/{hid}", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "released" and not r.json()["replay"]
    r = await client.delete(f"/v1/holds/{hid}", headers=headers)
    assert r.status_code == 200 and r.json()["replay"] is True
    assert (await client.get(f"/v1/holds/{hid}", headers=headers)).json()["state"] == "released"
    is_problem(await client.delete("/v1/holds/garbage", headers=headers), 404, "not-found")
    assert (await hold(client, other, sid, opid)).status_code == 201  # the unit came back


# ------------------------------------------------------------------ payment, bookings


async def test_confirm_signed_callback(client: Client) -> None:
    sid = await session(client)
    headers, pid = await account(client)
    hid = (await hold(client, headers, sid, pid)).json()["hold_id"]
    body = msgspec.json.encode({"payment_ref": "wx-pay-1", "amount": 5000})
    path = f"/v1/holds/{hid}/confirm"
    stale = payment_headers(body, path=path, ts=int(time.time()) - 600)
    is_problem(await client.post(f"/v1/holds/{hid}/confirm", content=body, headers=stale), 401,
               "bad-signature")
    forged = payment_headers(body, path=path, secret="not-the-secret")
    is_problem(await client.post(f"/v1/holds/{hid}/confirm", content=body, headers=forged), 401,
               "bad-signature")
    is_problem(await pay(client, hid, 4999), 422, "amount-mismatch")
    is_problem(await pay(client, "9.nope.1", 5000), 404, "not-found")
    bad = msgspec.json.encode({"payment_ref": "wx pay", "amount": 5000})
    is_problem(await client.post(f"/v1/holds/{hid}/confirm", content=bad,
                                 headers=payment_headers(bad, path=path)), 422, "invalid-input")
    r = await pay(client, hid, 5000, "wx-pay-1")
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["booking_id"] == hid and b["status"] == "booked" and b["replay"] is False
    r = await pay(client, hid, 5000, "wx-pay-1")
    assert r.status_code == 200 and r.json()["replay"] is True


async def test_expired_payment_is_refund_due(client: Client) -> None:
    sid = await session(client, caps=(1,), hold_ttl_ms=1000)
    (h1, p1), (h2, p2) = await account(client), await account(client)
    hid = (await hold(client, h1, sid, p1)).json()["hold_id"]
    await asyncio.sleep(1.2)
    assert (await client.get(f"/v1/holds/{hid}", headers=h1)).json()["state"] in (
        "held", "expired")
    assert (await hold(client, h2, sid, p2)).status_code == 201  # takes the expired unit
    body = is_problem(await pay(client, hid, 5000), 409, "expired")
    assert body["refund_due"] is True


async def test_bookings_list_view_cancel(client: Client, app: Litestar, redis_url: str,
                                         db: str) -> None:
    sid = await session(client)
    headers, pid = await account(client)
    other, _ = await account(client)
    hid = (await hold(client, headers, sid, pid)).json()["hold_id"]
    is_problem(await client.get(f"/v1/bookings/{hid}", headers=headers), 404, "not-found")
    assert (await pay(client, hid, 5000)).status_code == 200
    await drain_outbox(redis_url, db)
    listed = (await client.get("/v1/bookings", headers=headers)).json()
    assert [b["booking_id"] for b in listed] == [hid]
    assert listed[0]["status"] == "booked" and listed[0]["his_status"] == "pending"
    assert (await client.get("/v1/bookings", headers=other)).json() == []
    one = (await client.get(f"/v1/bookings/{hid}", headers=headers)).json()
    assert one["status"] == "booked" and one["his_status"] == "pending" and one["unit"] == 1
    is_problem(await client.get(f"/v1/bookings/{hid}", headers=other), 404, "not-found")
    is_problem(await client.post(f"/v1/bookings/{hid}/cancel", headers=other), 404, "not-found")
    r = await client.post(f"/v1/bookings/{hid}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and not r.json()["replay"]
    r = await client.post(f"/v1/bookings/{hid}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["replay"] is True
    assert (await client.get(f"/v1/bookings/{hid}", headers=headers)).json()["status"] == (
        "cancelled")
    # Another payment for the cancelled booking is refused for refund; the
    # first payment's callback, replayed, finds the booking cancelled.
    assert is_problem(await pay(client, hid, 5000, "again"), 409, "already-paid")["refund_due"]
    is_problem(await pay(client, hid, 5000), 409, "invalid-state")
    is_problem(await client.post("/v1/bookings/x.y/cancel", headers=headers), 404, "not-found")


async def test_cancel_deadline(client: Client) -> None:
    sid = await session(client, starts_ms=now_ms() + 3_600_000, cancel_before_ms=7_200_000)
    headers, pid = await account(client)
    hid = (await hold(client, headers, sid, pid)).json()["hold_id"]
    assert (await pay(client, hid, 5000)).status_code == 200
    body = is_problem(await client.post(f"/v1/bookings/{hid}/cancel", headers=headers), 409,
                      "cancel-deadline")
    assert body["server_ms"] > 0


async def drain_outbox(redis_url: str, db: str) -> None:
    import asyncpg

    async with Engine.connect(redis_url) as eng:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
        try:
            await OutboxWriter(eng, pool).run(asyncio.Event(), burst=True)
        finally:
            await pool.close()


# ------------------------------------------------------------------ admin


async def test_admin(client: Client, redis_url: str, db: str) -> None:
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
        is_problem(await client.post("/v1/admin/audit", headers=h), 401, "unauthorized")
    sid = await session(client, caps=(2, 1))
    bad = msgspec.json.encode([{**msgspec.to_builtins(make_spec("X1")), "extra": 1}])
    r = await client.post("/v1/admin/sessions", content=bad,
                          headers={**ADMIN, "Content-Type": "application/json"})
    is_problem(r, 422, "invalid-input")
    is_problem(await client.post("/v1/admin/sessions", json=[], headers=ADMIN), 422,
               "invalid-input")
    moved = msgspec.json.encode([make_spec(sid, dept="elsewhere")])
    r = await client.post("/v1/admin/sessions", content=moved,
                          headers={**ADMIN, "Content-Type": "application/json"})
    is_problem(r, 409, "schedule-conflict")

    r = await client.put(f"/v1/admin/sessions/{sid}/slots/0800/capacity", headers=ADMIN,
                         json={"capacity": 5})
    assert r.status_code == 200 and r.json()["capacity"] == 5, r.text
    assert (await client.get(f"/v1/sessions/{sid}")).json()["slots"][0]["capacity"] == 5
    is_problem(await client.put("/v1/admin/sessions/nope/slots/0800/capacity", headers=ADMIN,
                                json={"capacity": 5}), 404, "not-found")
    is_problem(await client.put(f"/v1/admin/sessions/{sid}/slots/0800/capacity", headers=ADMIN,
                                json={"capacity": -1}), 422, "invalid-input")

    headers, pid = await account(client)
    hid = (await hold(client, headers, sid, pid)).json()["hold_id"]
    assert (await pay(client, hid, 5000)).status_code == 200
    b = (await client.get(f"/v1/admin/bookings/{hid}", headers=ADMIN)).json()
    assert b["state"] == "booked" and b["payment_ref"] == f"pay-{hid}" and b["persisted"] is False
    await drain_outbox(redis_url, db)
    b = (await client.get(f"/v1/admin/bookings/{hid}", headers=ADMIN)).json()
    assert b["persisted"] is True and b["his_status"] == "pending"
    is_problem(await client.get("/v1/admin/bookings/0.nope.1", headers=ADMIN), 404, "not-found")
    is_problem(await client.get("/v1/admin/bookings/junk", headers=ADMIN), 404, "not-found")

    r = await client.post(f"/v1/admin/sessions/{sid}/suspend", headers=ADMIN,
                          json={"reason": "doctor_ill"})
    assert r.status_code == 200 and r.json()["cancelled"] == 1, r.text
    assert (await client.get(f"/v1/sessions/{sid}")).json()["status"] == "suspended"
    is_problem(await client.post("/v1/admin/sessions/nope/suspend", headers=ADMIN, json={}), 404,
               "not-found")
    is_problem(await client.post(f"/v1/admin/sessions/{sid}/suspend", headers=ADMIN,
                                 json={"reason": "Bad Reason"}), 422, "invalid-input")
    r = await client.post(f"/v1/admin/sessions/{sid}/resume", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "open"
    is_problem(await client.post("/v1/admin/sessions/nope/resume", headers=ADMIN), 404,
               "not-found")
    r = await client.post("/v1/admin/audit", headers=ADMIN)
    assert r.status_code == 200, r.text
    audit = r.json()
    assert audit["ok"] is True and audit["sessions"] >= 1 and audit["breaches"] == []


# ------------------------------------------------------------------ logs


async def test_logs_are_json_with_request_id_and_nothing_personal(
    redis_url: str, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(settings(redis_url, db, log_level="info", access_log=True))
    nid = national_id(next_id())
    try:
        async with AsyncTestClient(app) as c:
            sid = await session(c)
            headers = await login(c, uid("u"))
            r = await c.post("/v1/patients", headers=headers, json={
                "name": "李四光", "phone": "13912345678", "national_id": nid})
            pid = r.json()["patient_id"]
            h = await c.post("/v1/holds", headers={**headers, "X-Request-ID": "trace-abc-123"},
                             json={"session_id": sid, "slot_id": "0800", "patient_id": pid})
            assert h.headers["x-request-id"] == "trace-abc-123"
            bad = await c.post("/v1/patients", headers=headers, json={
                "name": "李四光", "phone": "13912345678", "national_id": nid[:-1] + "0"})
            assert bad.status_code == 422
    finally:
        configure_logging("warning")
    out = capsys.readouterr().out
    lines = [msgspec.json.decode(x) for x in out.splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("event") == "request"]
    assert any(x["request_id"] == "trace-abc-123" and x["route"] == "/v1/holds" for x in access)
    assert all("request_id" in x and "level" in x for x in access)
    assert nid not in out and nid[:-1] not in out and "13912345678" not in out
    assert "李四光" not in out


# ------------------------------------------------------------------ authorization (BOLA)


async def test_one_account_can_touch_nothing_of_another(client: Client, redis_url: str,
                                                        db: str) -> None:
    """Two accounts swap ids on every route: every answer is 404 (or 401 on the
    payment callback, which no account may call)."""
    sid = await session(client, caps=(3, 3))
    (ha, pa), (hb, pb) = await account(client), await account(client)
    hold_a = (await hold(client, ha, sid, pa)).json()["hold_id"]
    sid2 = await session(client)
    book_a = (await hold(client, ha, sid2, pa)).json()["hold_id"]
    assert (await pay(client, book_a, 5000)).status_code == 200
    await drain_outbox(redis_url, db)

    # b uses a's patient id to hold: 404, and nothing was taken.
    is_problem(await hold(client, hb, sid, pa), 404, "not-found")
    is_problem(await client.delete(f"/v1/patients/{pa}", headers=hb), 404, "not-found")
    assert pa not in (await client.get("/v1/patients", headers=hb)).text
    for path in (f"/v1/holds/{hold_a}", f"/v1/bookings/{book_a}", f"/v1/holds/{book_a}"):
        is_problem(await client.get(path, headers=hb), 404, "not-found")
    is_problem(await client.delete(f"/v1/holds/{hold_a}", headers=hb), 404, "not-found")
    is_problem(await client.post(f"/v1/bookings/{book_a}/cancel", headers=hb), 404, "not-found")
    is_problem(await client.post(f"/v1/holds/{hold_a}/confirm", headers=hb,
                                 json={"payment_ref": "x", "amount": 5000}), 401, "bad-signature")
    assert (await client.get("/v1/bookings", headers=hb)).json() == []
    # a's things are untouched.
    assert (await client.get(f"/v1/holds/{hold_a}", headers=ha)).json()["state"] == "held"
    assert (await client.get(f"/v1/bookings/{book_a}", headers=ha)).json()["status"] == "booked"
    assert len((await client.get("/v1/patients", headers=ha)).json()) == 1
    _ = pb


# ------------------------------------------------------------------ degraded


async def test_not_ready_when_writer_lags(client: Client, app: Litestar) -> None:
    a = api(app)
    kept = a.settings
    a.settings = kept.replace(writer_lag_max_ms=-1)
    a._ops.clear()
    try:
        body = is_problem(await client.get("/readyz"), 503, "not-ready")
        assert "writer lag" in body["detail"]
    finally:
        a.settings = kept
        a._ops.clear()
    assert (await client.get("/readyz")).status_code == 200


@pytest.mark.slow
async def test_redis_down_is_503_not_500(db: str) -> None:
    dead = create_app(settings("redis://127.0.0.1:9/0", db, socket_timeout_s=0.5))
    t0 = time.monotonic()
    async with AsyncTestClient(dead) as c:
        headers = await login(c, uid("u"))  # PostgreSQL only
        # A token's revocation lives in Redis: account routes fail closed.
        is_problem(await c.post("/v1/patients", headers=headers, json={
            "name": "张三", "phone": "13812345678", "national_id": national_id(1)}),
            503, "unavailable")
        r = await hold(c, headers, "S1", "00000000-0000-0000-0000-000000000000")
        body = is_problem(r, 503, "unavailable")
        assert int(r.headers["retry-after"]) >= 1 and body["retry_after_ms"] > 0
        is_problem(await c.get("/v1/sessions/S1/availability"), 503, "unavailable")
        is_problem(await c.get("/readyz"), 503, "not-ready")
        assert (await c.get("/healthz")).status_code == 200
    assert time.monotonic() - t0 < 30


async def test_invalid_input_never_echoes_the_value(client: Client) -> None:
    nid = national_id(next_id())
    r = await client.get("/v1/sessions", params={"from": nid, "to": "2026-12-01"})
    body = is_problem(r, 422, "invalid-input")
    assert nid not in r.text and body["errors"]
    headers = await login(client, uid("u"))
    r = await client.post("/v1/patients", headers=headers,
                          json={"name": "张三", "phone": nid, "national_id": nid})
    assert r.status_code == 422 and nid not in r.text
