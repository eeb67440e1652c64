"""Issue 10, found by probing the API as an attacker and as a careless client:
payment callbacks bound to their hold, one booking per payment reference,
no 5xx for any input (deep JSON, non-ASCII credentials, NUL bytes, numbers
out of range), strict input (415, duplicate keys, strings for numbers),
response headers, and an unbind that every worker honours at once.

Every test here failed before its fix. One app serves the module (development
mode, explicitly); tests use their own sessions and accounts."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.auth import sign_payment
from engine.rules import Rules, record_attendance
from engine.store.migrate import migrate
from tests.apikit import (
    ADMIN,
    PAYMENT_SECRET,
    bind,
    flushed_app,
    granian,
    import_sessions,
    login,
    next_id,
    pay,
    payment_headers,
    server_env,
    settings,
    uid,
)
from tests.asgikit import Answer, asgi_request
from tests.enginekit import make_spec, new_database

pytestmark = pytest.mark.timeout(120)
Client = AsyncTestClient[Litestar]
DEEP_ARRAY = b"[" * 1000 + b"]" * 1000
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000


@pytest.fixture(scope="module")
async def app(redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db)


def is_problem(r: httpx.Response, status: int | tuple[int, ...], slug: str | None = None
               ) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    if slug is not None:
        assert body["type"] == f"/problems/{slug}", body
    return body


def raw(client: Client, method: str, path: str, **kw: Any) -> Answer:
    """Exact bytes into the app, on the event loop that runs it (the client's portal)."""
    return client.blocking_portal.call(functools.partial(asgi_request, client.app, method,
                                                         path, **kw))


def is_raw_problem(a: Answer, statuses: tuple[int, ...], slug: str | None = None) -> None:
    assert a.status in statuses, a
    assert (a.header(b"content-type") or b"").startswith(b"application/problem+json"), a
    if slug is not None:
        assert msgspec.json.decode(a.body)["type"] == f"/problems/{slug}", a


async def session(client: Client, **kw: Any) -> str:
    sid = uid("S")
    kw.setdefault("dept", uid("D"))
    await import_sessions(client, [make_spec(sid, **kw)])
    return sid


async def account(client: Client) -> tuple[dict[str, str], str]:
    headers = await login(client, uid("u"))
    return headers, await bind(client, headers, 700_000 + next_id())


async def held(client: Client, headers: dict[str, str], sid: str, pid: str) -> str:
    r = await client.post("/v1/holds", headers=headers,
                          json={"session_id": sid, "slot_id": "0800", "patient_id": pid})
    assert r.status_code == 201, r.text
    hold_id: str = r.json()["hold_id"]
    return hold_id


async def row_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {t: int(await conn.fetchval(f'SELECT count(*) FROM "{t}"')) for t in tables}
    finally:
        await conn.close()


# ------------------------------------------------------------------ payment callbacks


async def test_payment_signature_binds_the_hold(client: Client) -> None:
    """One signed callback (headers and body) replayed to other holds of the
    same fee confirmed them all; now the signature covers method and path."""
    sid = await session(client, caps=(5,))
    holds = []
    for _ in range(3):
        headers, pid = await account(client)
        holds.append(await held(client, headers, sid, pid))
    body = msgspec.json.encode({"payment_ref": "wx-pay-777", "amount": 5000})
    signed = payment_headers(body, path=f"/v1/holds/{holds[0]}/confirm")
    r = await client.post(f"/v1/holds/{holds[0]}/confirm", content=body, headers=signed)
    assert r.status_code == 200, r.text
    for other in holds[1:]:
        is_problem(await client.post(f"/v1/holds/{other}/confirm", content=body,
                                     headers=signed), 401, "bad-signature")
    # The old scheme (timestamp and body only) is refused.
    ts = int(time.time())
    old = hmac.new(PAYMENT_SECRET.encode(), str(ts).encode() + b"." + body,
                   hashlib.sha256).hexdigest()
    is_problem(await client.post(
        f"/v1/holds/{holds[1]}/confirm", content=body,
        headers={"X-Payment-Timestamp": str(ts), "X-Payment-Signature": old,
                 "Content-Type": "application/json"}), 401, "bad-signature")


async def test_a_payment_reference_books_one_hold_ever(client: Client, db: str) -> None:
    sid = await session(client, caps=(5,))
    other_sid = await session(client, caps=(5,))
    h1, p1 = await account(client)
    h2, p2 = await account(client)
    a = await held(client, h1, sid, p1)
    b = await held(client, h2, other_sid, p2)
    first = await pay(client, a, 5000, "wx-pay-888")
    assert first.status_code == 200, first.text
    # A replay (same hold, same reference, same amount) answers the first booking.
    again = await pay(client, a, 5000, "wx-pay-888")
    assert again.status_code == 200 and again.json()["replay"] is True
    assert again.json()["booking_id"] == first.json()["booking_id"]
    # The same reference, correctly signed for another hold: refused, recorded for refund.
    body = is_problem(await pay(client, b, 5000, "wx-pay-888"), 409, "payment-reused")
    assert body["refund_due"] is True
    is_problem(await pay(client, b, 5000, "wx-pay-888"), 409, "payment-reused")
    view = (await client.get(f"/v1/holds/{b}", headers=h2)).json()
    assert view["state"] == "held"  # untouched: it can still be paid properly
    # A second payment for a hold already paid is refused and recorded for refund too.
    is_problem(await pay(client, a, 5000, "wx-pay-889"), 409, "already-paid")
    assert (await pay(client, b, 5000, "wx-pay-890")).status_code == 200
    conn = await asyncpg.connect(db)
    try:
        claims = {r["payment_ref"]: r["hold_id"] for r in await conn.fetch(
            "SELECT payment_ref, hold_id FROM payment_refs")}
        refunds = {(r["payment_ref"], r["hold_id"], r["reason"]) for r in await conn.fetch(
            "SELECT payment_ref, hold_id, reason FROM payment_refunds")}
        # The constraint itself: a second claim of a reference cannot be inserted.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO payment_refs (payment_ref, hold_id, amount)"
                               " VALUES ('wx-pay-888', $1, 5000)", b)
    finally:
        await conn.close()
    assert claims["wx-pay-888"] == a and claims["wx-pay-890"] == b
    assert ("wx-pay-888", b, "payment-reused") in refunds
    assert ("wx-pay-889", a, "already-paid") in refunds


async def test_confirm_script_refuses_a_second_payment_reference(client: Client,
                                                                 redis_url: str) -> None:
    """Inside Redis too: a booked hold answers its own reference only."""
    from engine.engine import Engine
    from engine.outcomes import Booked, Reason, Refused

    sid = await session(client)
    headers, pid = await account(client)
    hid = await held(client, headers, sid, pid)
    async with Engine.connect(redis_url) as eng:
        assert isinstance(await eng.confirm(hid, "ref-one"), Booked)
        replay = await eng.confirm(hid, "ref-one")
        assert isinstance(replay, Booked) and replay.replay
        other = await eng.confirm(hid, "ref-two")
    assert isinstance(other, Refused) and other.reason is Reason.INVALID_STATE
    assert other.state == "paid"


# ------------------------------------------------------------------ no 5xx for any input


async def test_deep_json_on_every_body_route(client: Client) -> None:
    headers, pid = await account(client)
    sid = await session(client)
    hid = await held(client, headers, sid, pid)
    routes: list[tuple[str, str, dict[str, str]]] = [
        ("POST", "/v1/auth/wechat", {}),
        ("POST", "/v1/patients", headers),
        ("POST", "/v1/holds", headers),
        ("POST", f"/v1/sessions/{sid}/waitlist", headers),
        ("POST", "/v1/admin/sessions", ADMIN),
        ("PUT", f"/v1/admin/sessions/{sid}/slots/0800/capacity", ADMIN),
        ("POST", f"/v1/admin/sessions/{sid}/suspend", ADMIN),
        ("PUT", "/v1/admin/rules/H1", ADMIN),
        ("POST", f"/v1/admin/bookings/{hid}/attendance", ADMIN),
        ("POST", "/v1/admin/holds", ADMIN),
    ]
    for body in (DEEP_ARRAY, DEEP_OBJECT):
        for method, path, h in routes:
            r = await client.request(method, path, content=body,
                                     headers={**h, "Content-Type": "application/json"})
            is_problem(r, (400, 422))
        path = f"/v1/holds/{hid}/confirm"
        r = await client.post(path, content=body, headers=payment_headers(body, path=path))
        is_problem(r, (400, 422))
    assert (await client.get(f"/v1/holds/{hid}", headers=headers)).json()["state"] == "held"


async def test_rules_nested_5000_deep(client: Client) -> None:
    deep = b'{"departments":{"D1":{"pools":' + b"[" * 5000 + b"]" * 5000 + b"}}}"
    r = await client.put("/v1/admin/rules/H1", content=deep,
                         headers={**ADMIN, "Content-Type": "application/json"})
    is_problem(r, (400, 422))


@pytest.mark.parametrize("token", [
    b"Bearer acct1.9999999999.\xc3\xa9\xc3\xa9\xc3\xa9",
    b"Bearer acct1.9999999999.\xe9\xff",
    b"Bearer acct1.\xb2\xb3.abc",
    b"Bearer acct1.\xb2\xb3.\xe9",
])
async def test_non_ascii_bearer_token_is_401(client: Client, token: bytes,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    body = b'{"session_id":"S","slot_id":"0800","patient_id":"p"}'
    for method, path in (("GET", "/v1/patients"), ("GET", "/v1/bookings"),
                         ("POST", "/v1/holds"), ("GET", "/v1/admin/rules/H1")):
        a = raw(client, method, path, body=body if method == "POST" else b"", headers=[
            (b"authorization", token), (b"content-type", b"application/json")])
        is_raw_problem(a, (401,), "unauthorized")
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out


@pytest.mark.parametrize("ts", [b"\xb2", b"1\xb2", b"\xb9\xb2\xb3", "١٢٣".encode(),
                                b"17000000000000000000000", b"-1", b" 1"])
async def test_non_ascii_payment_timestamp_is_401(client: Client, ts: bytes) -> None:
    body = b'{"payment_ref":"p-1","amount":5000}'
    a = raw(client, "POST", "/v1/holds/1.S1.1/confirm", body=body, headers=[
        (b"x-payment-timestamp", ts), (b"x-payment-signature", b"00"),
        (b"content-type", b"application/json")])
    is_raw_problem(a, (401, 422))


async def test_nul_bytes_in_path_and_query(client: Client) -> None:
    headers, _ = await account(client)
    for path in ("/v1/hospitals/%00/departments", "/v1/departments/%00/doctors",
                 "/v1/sessions/%00", "/v1/sessions/%00/availability",
                 "/v1/departments/%00/days/2026-12-01/availability"):
        is_problem(await client.get(path), (404, 422))
    for q in ("hospital", "dept", "doctor"):
        r = await client.get("/v1/sessions", params={
            "from": "2026-12-01", "to": "2026-12-02", q: "a\x00b"})
        is_problem(r, (404, 422))
    is_problem(await client.delete("/v1/patients/%00", headers=headers), (404, 422))
    is_problem(await client.get("/v1/admin/rules/%00", headers=ADMIN), (404, 422))
    is_problem(await client.delete("/v1/admin/patients/%00/ban", headers=ADMIN), (404, 422))
    is_problem(await client.get("/v1/admin/bookings/%00", headers=ADMIN), (404, 422))
    # What a server puts in the scope: NUL and undecodable bytes, decoded.
    for path in ("/v1/hospitals/\x00/departments", "/v1/hospitals/\udcff/departments",
                 "/v1/hospitals/\xff/departments", "/v1/sessions/a\x00b"):
        is_raw_problem(raw(client, "GET", path), (404, 422))
    is_raw_problem(raw(client, "GET", "/v1/sessions",
                       query=b"from=2026-12-01&to=2026-12-02&dept=%ff%00"), (404, 422))


async def test_admin_import_values_out_of_range(client: Client, db: str) -> None:
    before = await row_counts(db)
    base = msgspec.to_builtins(make_spec(uid("S"), dept=uid("D")))
    for change in ({"fee": 2**31}, {"fee": 2**63}, {"release_at_ms": 2**53},
                   {"cutoff_ms": 2**53}, {"starts_ms": 2**53}, {"pool_return_ms": 2**53},
                   {"hospital": "H\x001"}, {"dept": "D\x00"}, {"doctor": "a\x00b"},
                   {"kind": "k\x00"}, {"session_id": "S\x00"}):
        r = await client.post("/v1/admin/sessions", json=[{**base, **change}], headers=ADMIN)
        is_problem(r, 422, "invalid-input")
    assert await row_counts(db) == before


async def test_rules_values_out_of_range(client: Client, db: str) -> None:
    before = await row_counts(db)
    for doc in ({"default": {"no_show_window_days": 2**40}},
                {"default": {"ban_days": 2**40}},
                {"default": {"no_show_limit": 2**40}},
                {"default": {"cancel_before_ms": {"expert": 2**62}}},
                {"default": {"pool_return_before_ms": 2**62}},
                {"departments": {"D1": {"no_show_window_days": 2**40}}},
                {"departments": {"D\x001": {}}}):
        r = await client.put("/v1/admin/rules/H1", json=doc, headers=ADMIN)
        is_problem(r, 422, "invalid-input")
    assert await row_counts(db) == before


async def test_attendance_write_is_atomic(client: Client, db: str, redis_url: str) -> None:
    """A failure while counting strikes leaves the attendance unrecorded."""
    from engine.engine import Engine
    from tests.enginekit import drain

    sid = await session(client)
    headers, pid = await account(client)
    hid = await held(client, headers, sid, pid)
    assert (await pay(client, hid, 5000)).status_code == 200
    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    try:
        async with Engine.connect(redis_url) as eng:
            await drain(eng, pool)
            bad = Rules(no_show_window_days=2**40)  # constructed without validation
            with pytest.raises(asyncpg.PostgresError):
                await record_attendance(pool, eng, hid, False, bad)
        assert await pool.fetchval("SELECT attendance FROM bookings WHERE id = $1", hid) is None
    finally:
        await pool.close()


# ------------------------------------------------------------------ strict input


async def test_json_body_with_another_content_type_is_415(client: Client) -> None:
    headers, pid = await account(client)
    sid = await session(client)
    hold_body = msgspec.json.encode({"session_id": sid, "slot_id": "0800", "patient_id": pid})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/jsonp"):
        r = await client.post("/v1/holds", content=hold_body,
                              headers={**headers, "Content-Type": ctype})
        is_problem(r, 415, "unsupported-media-type")
        r = await client.post("/v1/auth/wechat", content=b'{"code":"dev-x"}',
                              headers={"Content-Type": ctype})
        is_problem(r, 415, "unsupported-media-type")
    r = await client.post("/v1/holds", content=hold_body, headers=headers)  # no content type
    is_problem(r, 415, "unsupported-media-type")
    r = await client.post("/v1/holds", content=hold_body, headers={
        **headers, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text


async def test_duplicate_keys_and_strings_for_numbers_are_422(client: Client) -> None:
    headers, pid = await account(client)
    sid = await session(client)
    json_h = {**headers, "Content-Type": "application/json"}
    dup = (f'{{"session_id":"{sid}","slot_id":"0800","patient_id":"{pid}",'
           f'"session_id":"{sid}"}}').encode()
    is_problem(await client.post("/v1/holds", content=dup, headers=json_h), 422, "invalid-input")
    dup2 = (f'{{"session_id":"nope","slot_id":"0800","patient_id":"{pid}",'
            f'"session_id":"{sid}"}}').encode()
    is_problem(await client.post("/v1/holds", content=dup2, headers=json_h), 422,
               "invalid-input")
    hid = await held(client, headers, sid, pid)
    path = f"/v1/holds/{hid}/confirm"
    for body in (b'{"payment_ref":"p-s1","amount":"5000"}',
                 b'{"payment_ref":"p-s2","amount":1,"amount":5000}',
                 b'{"payment_ref":"p-s3","amount":5000.0}'):
        r = await client.post(path, content=body, headers=payment_headers(body, path=path))
        is_problem(r, 422, "invalid-input")
    r = await client.put(f"/v1/admin/sessions/{sid}/slots/0800/capacity",
                         content=b'{"capacity":"9"}',
                         headers={**ADMIN, "Content-Type": "application/json"})
    is_problem(r, 422, "invalid-input")
    r = await client.put(f"/v1/admin/sessions/{sid}/slots/0800/capacity",
                         content=b'{"capacity":9,"capacity":1}',
                         headers={**ADMIN, "Content-Type": "application/json"})
    is_problem(r, 422, "invalid-input")
    avail = (await client.get(f"/v1/sessions/{sid}/availability")).json()
    assert avail["sessions"][0]["slots"][0]["capacity"] == 3
    assert (await client.get(f"/v1/holds/{hid}", headers=headers)).json()["state"] == "held"


# ------------------------------------------------------------------ headers, ops


async def test_security_headers(client: Client) -> None:
    r = await client.post("/v1/auth/wechat", json={"code": f"dev-{uid('o')}"})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    pid = await bind(client, headers, 800_000 + next_id())
    for resp in (await client.get("/v1/patients", headers=headers),
                 await client.delete(f"/v1/patients/{pid}", headers=headers),
                 await client.get("/v1/patients", headers={"Authorization": "Bearer x"}),
                 await client.get("/v1/hospitals")):
        assert resp.headers["cache-control"] == "no-store", resp.headers
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers.get("server", "") == ""  # no banner


async def test_ops_endpoints_need_the_ops_token(redis_url: str, db: str) -> None:
    app = create_app(settings(redis_url, db, ops_token="ops-token-0123456789abcdef-XYZ"))
    async with AsyncTestClient(app) as c:
        r = await c.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "mode": "development",
                            "warning": r.json()["warning"]}
        assert "development" in r.json()["warning"]
        is_problem(await c.get("/metrics"), 401, "unauthorized")
        is_problem(await c.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401,
                   "unauthorized")
        ops = {"Authorization": "Bearer ops-token-0123456789abcdef-XYZ"}
        m = await c.get("/metrics", headers=ops)
        assert m.status_code == 200 and "haoyuan_http_request_duration_seconds" in m.text
        detail = (await c.get("/readyz", headers=ops)).json()
        assert detail["redis"] and detail["postgres"] and detail["mode"] == "development"
        is_problem(await c.get("/metrics", headers=ADMIN), 401, "unauthorized")


async def test_docs_ui_is_off_unless_asked_for(redis_url: str, db: str) -> None:
    app = create_app(settings(redis_url, db, docs_ui=False))
    async with AsyncTestClient(app) as c:
        assert (await c.get("/schema/openapi.json")).status_code == 200
        for ui in ("/schema/swagger", "/schema/scalar", "/schema/redoc", "/schema/elements"):
            r = await c.get(ui)
            assert r.status_code == 404, (ui, r.status_code)
            assert "cdn" not in r.text
        r = await c.get("/schema")  # the document itself, no page that loads scripts
        assert "html" not in r.headers["content-type"] and "cdn" not in r.text


# ------------------------------------------------------------------ unbind, every worker


async def test_unbind_takes_effect_on_every_worker_at_once(client: Client, redis_url: str,
                                                           db: str) -> None:
    """Two workers (two apps, one Redis, one PostgreSQL): a hold on worker A
    fills its caches; an unbind on worker B must stop A's next hold."""
    sid = await session(client, caps=(5,))
    other_sid = await session(client, caps=(5,))
    headers, pid = await account(client)
    assert (await client.post("/v1/holds", headers=headers, json={
        "session_id": sid, "slot_id": "0800", "patient_id": pid})).status_code == 201
    worker_b = create_app(settings(redis_url, db, migrate=False))
    async with AsyncTestClient(worker_b) as b:
        assert (await b.delete(f"/v1/patients/{pid}", headers=headers)).status_code == 204
    r = await client.post("/v1/holds", headers=headers, json={
        "session_id": other_sid, "slot_id": "0800", "patient_id": pid})
    is_problem(r, 404, "not-found")


# ------------------------------------------------------------------ the migration


async def test_payment_refs_migration_applies_on_its_own(pg_dsn: str) -> None:
    async with new_database(pg_dsn) as dsn:
        applied = await migrate(dsn)
        assert "0004_payments_unique" in applied
        assert await migrate(dsn) == []


def test_signature_covers_method_and_path() -> None:
    body = b'{"payment_ref":"p","amount":1}'
    a = sign_payment("k", 1, body, method="POST", path="/v1/holds/1.S.1/confirm")
    assert a != sign_payment("k", 1, body, method="POST", path="/v1/holds/1.S.2/confirm")
    assert a != sign_payment("k", 1, body, method="PUT", path="/v1/holds/1.S.1/confirm")
    assert a != sign_payment("k", 2, body, method="POST", path="/v1/holds/1.S.1/confirm")
    assert a != sign_payment("k", 1, body + b" ", method="POST", path="/v1/holds/1.S.1/confirm")


# ------------------------------------------------------------------ through granian


async def _slow_request(base: str, body: bytes, *, gap_s: float) -> tuple[bytes, float]:
    """A POST whose body trickles in one byte every ``gap_s``; the raw answer
    and how long until the server closed the connection."""
    u = urlsplit(base)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    t0 = time.monotonic()
    writer.write((f"POST /v1/auth/wechat HTTP/1.1\r\nHost: {u.netloc}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  ).encode())
    await writer.drain()

    async def trickle() -> None:
        for b in body:
            try:
                writer.write(bytes([b]))
                await writer.drain()
            except (ConnectionError, OSError):
                return
            await asyncio.sleep(gap_s)

    task = asyncio.create_task(trickle())
    try:
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        task.cancel()
        writer.close()
    return raw, time.monotonic() - t0


async def test_slow_bodies_time_out_and_no_server_banner(redis_url: str, db: str) -> None:
    """8 connections sending 1 byte/s stayed open 43 s; now 408 after the
    body deadline, and the connection is closed."""
    env = server_env(redis_url, db, HAOYUAN_BODY_TIMEOUT_S="1.5", HAOYUAN_MIGRATE="0")
    with granian(env, workers=1) as base:
        async with httpx.AsyncClient() as c:
            r = await c.get(base + "/healthz")
        assert r.status_code == 200 and r.headers.get("server", "") == "", r.headers
        assert r.headers["x-content-type-options"] == "nosniff"
        body = b'{"code":"dev-slowloris-0123456789"}'
        answers = await asyncio.gather(*(_slow_request(base, body, gap_s=1.0) for _ in range(8)))
        for raw, took in answers:
            assert raw.startswith(b"HTTP/1.1 408"), raw[:200]
            assert b"/problems/request-timeout" in raw
            assert took < 10, took
