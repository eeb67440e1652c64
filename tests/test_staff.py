"""Staff identities (issue 10, section 5): per-person staff tokens with roles
from ``haoyuan staff add|list|disable``, the audit trail of who did what in
PostgreSQL, the shared admin token only as the development bootstrap, and
limits per client address on failed admin and login attempts and on new
accounts. Through the real app on the private Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.settings import Settings
from engine.engine import Engine
from tests.apikit import (
    ADMIN,
    ROOT,
    api,
    flushed_app,
    login,
    national_id,
    next_id,
    pay,
    uid,
)
from tests.enginekit import drain, make_spec

pytestmark = pytest.mark.timeout(180)
Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
async def app(redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db)


def problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}", body
    return body


async def cli(db: str, *args: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "staff", *args, "--pg-dsn", db, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    return p.returncode or 0, out.decode()


async def staff(db: str, role: str) -> tuple[str, dict[str, str]]:
    """A new staff member through the CLI: their id and Authorization header."""
    code, out = await cli(db, "add", uid(role), "--role", role)
    assert code == 0, out
    got = json.loads(out)
    assert got["role"] == role and got["token"].startswith("hys_")
    return got["staff_id"], {"Authorization": f"Bearer {got['token']}"}


async def trail(client: Client, headers: dict[str, str], **params: str) -> list[dict[str, Any]]:
    r = await client.get("/v1/admin/audit-trail", headers=headers, params=params)
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()
    return rows


async def written(redis_url: str, db: str) -> None:
    """Drain the outbox into PostgreSQL (the writer, in burst mode)."""
    async with Engine.connect(redis_url) as eng:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
        try:
            await drain(eng, pool)
        finally:
            await pool.close()


async def test_staff_cli_tokens_and_roles(client: Client, db: str) -> None:
    """``haoyuan staff add`` prints a token once (PostgreSQL keeps its hash);
    each role may do its own work only (403 ``role-required``); ``disable``
    stops the token on the next request."""
    op_id, op = await staff(db, "operator")
    clerk_id, clerk = await staff(db, "clerk")
    _, finance = await staff(db, "finance")
    r = await client.get("/v1/admin/whoami", headers=op)
    assert r.json() == {"staff_id": op_id, "username": r.json()["username"], "roles": ["operator"]}
    code, out = await cli(db, "list", "--json")
    listed = {m["id"]: m for m in json.loads(out)}
    assert code == 0 and listed[op_id]["role"] == "operator" and listed[clerk_id]["role"] == "clerk"
    code, out = await cli(db, "add", listed[op_id]["username"], "--role", "clerk")
    assert code == 1  # taken
    code, _ = await cli(db, "add", "Bad Name", "--role", "clerk")
    assert code == 1

    sid = uid("S")
    spec = msgspec.json.encode([make_spec(sid, dept=uid("D"))])
    json_ = {"Content-Type": "application/json"}
    problem(await client.post("/v1/admin/sessions", content=spec, headers={**clerk, **json_}),
            403, "role-required")
    problem(await client.post("/v1/admin/sessions", content=spec, headers={**finance, **json_}),
            403, "role-required")
    assert (await client.post("/v1/admin/sessions", content=spec,
                              headers={**op, **json_})).status_code == 200
    problem(await client.post("/v1/admin/holds", headers=op, json={
        "session_id": sid, "slot_id": "0800", "patient_ref": "ref-1", "channel": "window"}),
        403, "role-required")
    r = await client.post("/v1/admin/holds", headers=clerk, json={
        "session_id": sid, "slot_id": "0800", "patient_ref": "ref-1", "channel": "window"})
    assert r.status_code == 201, r.text
    problem(await client.get("/v1/admin/refunds", headers=clerk), 403, "role-required")
    assert (await client.get("/v1/admin/refunds", headers=finance)).status_code == 200
    assert (await client.post("/v1/admin/audit", headers=finance)).status_code == 200
    problem(await client.post("/v1/admin/audit", headers=clerk), 403, "role-required")
    problem(await client.get("/v1/admin/audit-trail", headers=finance), 403, "role-required")
    for who in (op, clerk, finance):  # every role looks bookings up
        problem(await client.get("/v1/admin/bookings/1.S.1", headers=who), 404, "not-found")

    code, out = await cli(db, "disable", clerk_id)
    assert code == 0 and json.loads(out)["disabled"] is True
    problem(await client.get("/v1/admin/whoami", headers=clerk), 401, "unauthorized")
    assert (await cli(db, "disable", clerk_id))[0] == 1  # already disabled
    forged = {"Authorization": op["Authorization"][:-4] + "AAAA"}
    problem(await client.get("/v1/admin/whoami", headers=forged), 401, "unauthorized")

    pg = await asyncpg.connect(db)
    try:
        stored = await pg.fetch("SELECT * FROM staff")
        secret = op["Authorization"].rsplit("_", 1)[-1]
        assert secret not in str([dict(r) for r in stored])
        rows = await pg.fetch("SELECT actor, action, target FROM staff_audit"
                              " WHERE action LIKE 'staff.%' ORDER BY id")
        assert ("staff.disable", clerk_id) in [(r["action"], r["target"]) for r in rows]
        assert all(r["actor"].startswith("cli:") for r in rows)
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await pg.execute("UPDATE staff_audit SET actor = 'nobody'")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await pg.execute("DELETE FROM staff_audit")
    finally:
        await pg.close()


async def test_audit_trail_says_who_did_what(client: Client, app: Litestar, db: str,
                                             redis_url: str) -> None:
    """Imports, capacity, suspensions, resumes, rules, attendance, ban lifts,
    staff holds, refunds and token revocations each leave one row naming the
    staff member; reads leave none."""
    op_id, op = await staff(db, "operator")
    clerk_id, clerk = await staff(db, "clerk")
    fin_id, finance = await staff(db, "finance")
    sid, dept = uid("S"), uid("D")
    spec = msgspec.json.encode([make_spec(sid, dept=dept, caps=(3,))])
    r = await client.post("/v1/admin/sessions", content=spec,
                          headers={**op, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    r = await client.put(f"/v1/admin/sessions/{sid}/slots/0800/capacity", headers=op,
                         json={"capacity": 2})
    assert r.status_code == 200, r.text
    assert (await client.get("/v1/admin/rules/H1", headers=op)).status_code == 200
    assert (await client.put("/v1/admin/rules/H1", headers=op, json={})).status_code == 200

    # A patient books; the clerk records the no-show; the operator lifts the ban.
    headers = await login(client, uid("u"))
    r = await client.post("/v1/patients", headers=headers, json={
        "name": "张三", "phone": "13812345678", "national_id": national_id(900 + next_id())})
    pid = r.json()["patient_id"]
    r = await client.post("/v1/holds", headers=headers,
                          json={"session_id": sid, "slot_id": "0800", "patient_id": pid})
    hold_id = r.json()["hold_id"]
    assert (await pay(client, hold_id, 5000, ref=uid("pay"))).status_code == 200
    a = api(app)
    await written(redis_url, db)
    r = await client.post(f"/v1/admin/bookings/{hold_id}/attendance", headers=clerk,
                          json={"attended": False})
    assert r.status_code == 200, r.text
    ref = a.crypto.id_hash(national_id(900 + next_id() - 1))
    assert (await client.delete(f"/v1/admin/patients/{ref}/ban", headers=op)).status_code == 200
    r = await client.post(f"/v1/admin/sessions/{sid}/suspend", headers=op, json={})
    assert r.status_code == 200 and r.json()["cancelled"] == 1, r.text
    assert (await client.post(f"/v1/admin/sessions/{sid}/resume",
                              headers=op)).status_code == 200

    # A payment that arrives after its hold was released and the unit taken
    # is due back: finance pays it out, once.
    sid2 = uid("S")
    spec = msgspec.json.encode([make_spec(sid2, dept=uid("D"), caps=(1,))])
    r = await client.post("/v1/admin/sessions", content=spec,
                          headers={**op, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/holds", headers=headers,
                          json={"session_id": sid2, "slot_id": "0800", "patient_id": pid})
    late = r.json()["hold_id"]
    assert (await client.delete(f"/v1/holds/{late}", headers=headers)).status_code == 200
    other = await login(client, uid("u"))
    r = await client.post("/v1/patients", headers=other, json={
        "name": "李四", "phone": "13812345678", "national_id": national_id(950 + next_id())})
    r = await client.post("/v1/holds", headers=other, json={
        "session_id": sid2, "slot_id": "0800", "patient_id": r.json()["patient_id"]})
    assert r.status_code == 201, r.text
    problem(await pay(client, late, 5000, ref=uid("pay")), 409, "expired")
    await written(redis_url, db)
    due = (await client.get("/v1/admin/refunds", headers=finance)).json()
    # The booking the suspension (停诊) cancelled is refunded too (issue 12).
    # (one writer transaction may create both: the same created_at, any order)
    by_id = {x["booking_id"]: x for x in due}
    assert len(due) == 2 and set(by_id) == {hold_id, late}
    assert by_id[hold_id]["cause"] == "suspended" and by_id[late]["cause"] == "expired"
    assert by_id[late]["fee"] == 5000 and by_id[late]["state"] == "due"
    r = await client.post(f"/v1/admin/refunds/{hold_id}/paid", headers=finance,
                          json={"paid_ref": "wx-refund-0"})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/admin/refunds/{late}/paid", headers=finance,
                          json={"paid_ref": "wx-refund-1"})
    assert r.status_code == 200 and r.json()["paid_by"] == fin_id and not r.json()["replay"]
    r = await client.post(f"/v1/admin/refunds/{late}/paid", headers=finance,
                          json={"paid_ref": "wx-refund-1"})
    assert r.status_code == 200 and r.json()["replay"]
    problem(await client.post(f"/v1/admin/refunds/{late}/paid", headers=finance,
                              json={"paid_ref": "wx-refund-2"}), 409, "invalid-state")
    problem(await client.post("/v1/admin/refunds/1.S.1/paid", headers=finance,
                              json={"paid_ref": "x"}), 404, "not-found")
    assert (await client.get("/v1/admin/refunds", headers=finance)).json() == []

    acct = a.tokens.verify(headers["Authorization"][7:])
    assert (await client.post(f"/v1/admin/accounts/{acct}/revoke-tokens",
                              headers=op)).status_code == 200
    r = await client.post("/v1/admin/holds", headers=clerk, json={
        "session_id": sid, "slot_id": "0800", "patient_ref": "ref-9", "channel": "phone"})
    staff_hold = r.json()["hold_id"]

    mine = await trail(client, op, actor=op_id)
    assert [(e["action"], e["target"]) for e in reversed(mine)] == [
        ("sessions.import", None), ("slot.capacity", f"{sid}/0800"), ("rules.put", "H1"),
        ("ban.lift", ref), ("session.suspend", sid), ("session.resume", sid),
        ("sessions.import", None), ("account.revoke_tokens", acct)]
    assert mine[-1]["detail"] == {"sessions": [sid], "apply_rules": False}
    assert all(e["actor"] == op_id and e["role"] == "operator" for e in mine)
    assert [(e["action"], e["target"]) for e in reversed(await trail(client, op,
                                                                    actor=clerk_id))] == [
        ("booking.attendance", hold_id), ("hold.staff", staff_hold)]
    assert [(e["action"], e["detail"]["paid_ref"]) for e in await trail(client, op,
                                                                       actor=fin_id)] == [
        ("refund.paid", "wx-refund-1"), ("refund.paid", "wx-refund-0")]
    assert [e["action"] for e in await trail(client, op, target=late)] == ["refund.paid"]
    problem(await client.get("/v1/admin/audit-trail?limit=0", headers=op), 422, "invalid-input")


async def test_shared_admin_token_is_the_bootstrap_in_development_only(
    client: Client, redis_url: str, db: str
) -> None:
    """In development the shared admin token acts as the bootstrap identity
    (every role, recorded as ``bootstrap``); it can be turned off, and
    production refuses it unless asked for as a break-glass."""
    r = await client.get("/v1/admin/whoami", headers=ADMIN)
    assert r.json() == {"staff_id": "bootstrap", "username": "bootstrap",
                        "roles": ["clerk", "finance", "operator"]}
    assert (await client.post("/v1/admin/audit", headers=ADMIN)).status_code == 200
    pg = await asyncpg.connect(db)
    try:
        assert await pg.fetchval("SELECT actor FROM staff_audit WHERE action = 'audit.run'"
                                 " ORDER BY id DESC LIMIT 1") == "bootstrap"
    finally:
        await pg.close()
    off = await flushed_app(redis_url, db, shared_admin="off")
    async with AsyncTestClient(off) as c:
        problem(await c.get("/v1/admin/whoami", headers=ADMIN), 401, "unauthorized")
        problem(await c.get("/v1/admin/whoami",
                            headers={"Authorization": "Bearer hys_st000000000000_" + "a" * 43}),
                401, "unauthorized")
    from tests.test_secure_defaults import production_env

    prod = production_env()
    assert Settings.from_env(prod).shared_admin_enabled is False
    assert Settings.from_env({**prod, "HAOYUAN_SHARED_ADMIN": "on"}).shared_admin_enabled is True
    assert Settings(env="development").shared_admin_enabled is True
    with pytest.raises(ValueError, match="REALNAME_MODE"):
        Settings.from_env({**prod, "HAOYUAN_REALNAME_MODE": "simulator"})


async def test_limits_per_client_address(redis_url: str, db: str) -> None:
    """Failed admin attempts, failed logins and new accounts are limited per
    client address (``client_ip_header`` names it behind a proxy): 429
    ``too-many-attempts`` with Retry-After, for that address only; existing
    accounts still log in."""
    app = await flushed_app(
        redis_url, db, client_ip_header="x-real-ip",
        admin_failures_burst=3, admin_failures_interval_s=60,
        login_failures_burst=3, login_failures_interval_s=60,
        new_accounts_burst=2, new_accounts_interval_s=60)
    one, two = {"X-Real-IP": "198.51.100.7"}, {"X-Real-IP": "198.51.100.8"}
    async with AsyncTestClient(app) as c:
        bad = {"Authorization": "Bearer guessing", **one}
        for _ in range(3):
            problem(await c.get("/v1/admin/whoami", headers=bad), 401, "unauthorized")
        r = await c.get("/v1/admin/whoami", headers={**ADMIN, **one})  # even a good token waits
        body = problem(r, 429, "too-many-attempts")
        assert int(r.headers["retry-after"]) >= 1 and body["retry_after_ms"] > 0
        assert (await c.get("/v1/admin/whoami", headers={**ADMIN, **two})).status_code == 200

        for _ in range(3):
            problem(await c.post("/v1/auth/wechat", json={"code": "forged"}, headers=one), 401,
                    "invalid-login-code")
        problem(await c.post("/v1/auth/wechat", json={"code": "dev-x1"}, headers=one), 429,
                "too-many-attempts")

        openids = [uid("n") for _ in range(3)]
        for o in openids[:2]:
            assert (await c.post("/v1/auth/wechat", json={"code": f"dev-{o}"},
                                 headers=two)).status_code == 200
        problem(await c.post("/v1/auth/wechat", json={"code": f"dev-{openids[2]}"}, headers=two),
                429, "too-many-attempts")
        assert (await c.post("/v1/auth/wechat", json={"code": f"dev-{openids[0]}"},
                             headers=two)).status_code == 200  # an existing account
        pg = await asyncpg.connect(db)
        try:
            n = await pg.fetchval("SELECT count(*) FROM accounts WHERE openid_hash = $1",
                                  api(app).crypto.openid_hash(openids[2]))
        finally:
            await pg.close()
        assert n == 0  # the refused login created nothing
    async with Engine.connect(redis_url) as eng:
        keys = await eng.client.keys("hy:lim:*")
    assert keys and not any(b"198.51" in k for k in keys)  # addresses are hashed
