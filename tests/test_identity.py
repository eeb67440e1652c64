"""Patients who are who they say (issue 10, section 4) and revocable tokens
(section 5): through the real app on the private Redis and PostgreSQL, with
the real-name simulator as the authority (engine.identity.simulator).

- An ID number bound by strangers cannot block its patient: a binding holds
  only once verified, an ID is bound to a few accounts, and the patient sees
  and revokes the others.
- A logout, an operator's revocation, an unbind and a revoked binding take
  effect on every API worker at once (granian, two workers).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import keys as K
from engine.engine import Engine
from engine.identity import Claim, RealNameUnavailable
from engine.identity.http import HttpRealNameVerifier
from engine.identity.simulator import SimulatedRealName, simulator_app
from engine.pii import Crypto, mask_id
from engine.store import queries as q
from engine.store.migrate import migrate
from tests.apikit import (
    ADMIN,
    api,
    flushed_app,
    granian,
    import_sessions,
    login,
    national_id,
    next_id,
    raw_request,
    server_env,
    uid,
)
from tests.enginekit import make_spec

pytestmark = pytest.mark.timeout(180)
Client = AsyncTestClient[Litestar]
NAME, PHONE = "张三丰", "13812345678"


@pytest.fixture(scope="module")
async def app(redis_url: str, db: str) -> Litestar:
    return await flushed_app(redis_url, db, max_accounts_per_patient=3)


def sim(app: Litestar) -> SimulatedRealName:
    s = api(app).realname
    assert isinstance(s, SimulatedRealName)
    return s


def problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}", body
    return body


async def session(client: httpx.AsyncClient, **kw: Any) -> str:
    sid = uid("S")
    kw.setdefault("dept", uid("D"))
    await import_sessions(client, [make_spec(sid, **kw)])
    return sid


async def bind(client: httpx.AsyncClient, headers: dict[str, str], nid: str, name: str = NAME,
               phone: str = PHONE, ticket: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"name": name, "phone": phone, "national_id": nid}
    if ticket is not None:
        body["ticket"] = ticket
    return await client.post("/v1/patients", headers=headers, json=body)


async def hold(client: httpx.AsyncClient, headers: dict[str, str], sid: str, pid: str,
               slot: str = "0800") -> httpx.Response:
    return await client.post("/v1/holds", headers=headers,
                             json={"session_id": sid, "slot_id": slot, "patient_id": pid})


def account_of(app: Litestar, headers: dict[str, str]) -> str:
    acct = api(app).tokens.verify(headers["Authorization"][7:])
    assert acct is not None
    return acct


# ------------------------------------------------------------------ section 4


async def test_eight_accounts_cannot_block_the_real_patient(client: Client, app: Litestar,
                                                            db: str) -> None:
    """The issue's attack: eight unrelated accounts bind one ID number with
    other names and phones and try to hold that patient's department-day.
    None can hold (unverified), at most three bindings exist at a time, and
    the real patient binds, holds and books."""
    nid = national_id(500_000 + next_id())
    sim(app).register(nid, NAME, PHONE)
    sid = await session(client)
    attackers = []
    for i in range(8):
        h = await login(client, uid("attacker"))
        r = await bind(client, h, nid, name=f"李{'四五六七八九十百'[i]}", phone=f"1390000{i:04d}")
        if i < 3:
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["verified"] is False and body["verification"] == "mismatch"
            attackers.append((h, body["patient_id"]))
            problem(await hold(client, h, sid, body["patient_id"]), 403, "patient-unverified")
        else:  # three unverified bindings: no place left for another unverified one
            problem(r, 409, "id-account-limit")
    # Nothing of the attackers reached the engine: the day is free.
    real = await login(client, uid("patient"))
    r = await bind(client, real, nid)
    assert r.status_code == 201 and r.json()["verified"] is True, r.text
    assert r.json()["verification"] == "data"
    pid = r.json()["patient_id"]
    r = await hold(client, real, sid, pid)
    assert r.status_code == 201, r.text
    # The real patient took the place of the oldest unverified binding.
    h0, p0 = attackers[0]
    assert (await client.get("/v1/patients", headers=h0)).json() == []
    problem(await hold(client, h0, sid, p0, slot="0830"), 404, "not-found")
    pool = await asyncpg.connect(db)
    try:
        rows = await pool.fetch(
            "SELECT verification, unbound_reason FROM patients WHERE id_hash = $1"
            " ORDER BY created_at", api(app).crypto.id_hash(nid))
    finally:
        await pool.close()
    assert [(r["verification"], r["unbound_reason"]) for r in rows] == [
        ("mismatch", "displaced"), ("mismatch", None), ("mismatch", None), ("data", None)]


async def test_an_id_is_bound_to_a_few_accounts(client: Client, app: Litestar) -> None:
    """At most three verified accounts per ID (family members who know the
    data); the person themself (face-check ticket) is never refused; an
    unverified binding gets only a free place."""
    nid = national_id(510_000 + next_id())
    family = [await login(client, uid("family")) for _ in range(3)]
    for h in family:
        r = await bind(client, h, nid)
        assert r.status_code == 201 and r.json()["verification"] == "data", r.text
    fourth = await login(client, uid("family"))
    problem(await bind(client, fourth, nid), 409, "id-account-limit")
    sim(app).down = True
    try:
        problem(await bind(client, fourth, nid), 409, "id-account-limit")  # unverified
    finally:
        sim(app).down = False
    me = await login(client, uid("me"))
    ticket = SimulatedRealName.ticket(account_of(app, me), nid)
    r = await bind(client, me, nid, ticket=ticket)
    assert r.status_code == 201 and r.json()["verification"] == "self", r.text
    # A ticket proves the person only for the account that took the check.
    other = await login(client, uid("other"))
    r = await bind(client, other, national_id(520_000 + next_id()), ticket=ticket)
    assert r.status_code == 201 and r.json()["verification"] == "mismatch"


async def test_concurrent_binds_of_one_id_respect_the_limit(fresh_pg_dsn: str) -> None:
    """Twelve accounts bind one ID number at once, each on its own
    connection: exactly three bindings stay (the ID's advisory lock); the
    others are refused, verified or not."""
    await migrate(fresh_pg_dsn)
    crypto = Crypto.generate_dev()
    nid = national_id(515_000 + next_id())
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=12, max_size=12)
    try:
        accounts = [await q.create_account(pool, uid("crowd")) for _ in range(12)]

        async def one(i: int, acct: str) -> str:
            async with pool.acquire() as conn:
                try:
                    await q.bind_patient(conn, crypto, acct, NAME, PHONE, nid,
                                         verification="data" if i % 2 else "mismatch",
                                         max_accounts=3)
                    return "ok"
                except q.IdAccountLimit:
                    return "limit"

        for wave in range(2):  # the second wave finds the ID full of verified bindings
            got = await asyncio.gather(*(one(i, a) for i, a in enumerate(accounts)))
            n = await pool.fetchval("SELECT count(*) FROM patients WHERE id_hash = $1"
                                    " AND unbound_at IS NULL", crypto.id_hash(nid))
            assert n == 3 and got.count("ok") >= (3 if wave == 0 else 0)
            accounts = [await q.create_account(pool, uid("crowd")) for _ in range(12)]
        assert got.count("ok") == 0
        verified = await pool.fetchval(
            "SELECT count(*) FROM patients WHERE id_hash = $1 AND unbound_at IS NULL"
            " AND verification = 'data'", crypto.id_hash(nid))
        assert verified == 3  # verified ones displaced every unverified one
    finally:
        await pool.close()


async def test_unverified_binding_cannot_hold_until_verified(client: Client, app: Litestar,
                                                             redis_url: str) -> None:
    """The authority is down at bind time: the binding is kept unverified,
    cannot hold nor join a waitlist (problem ``patient-unverified``), has no
    entry in Redis's binding mirror, and holds once verified again."""
    sid = await session(client)
    h = await login(client, uid("u"))
    nid = national_id(530_000 + next_id())
    s = sim(app)
    s.down = True
    try:
        r = await bind(client, h, nid)
        assert r.status_code == 201, r.text
        assert r.json()["verified"] is False and r.json()["verification"] == "unavailable"
        pid = r.json()["patient_id"]
        for _ in range(2):  # the store answers each time; nothing is cached as verified
            problem(await hold(client, h, sid, pid), 403, "patient-unverified")
        problem(await client.post(f"/v1/sessions/{sid}/waitlist", headers=h,
                                  json={"patient_id": pid}), 403, "patient-unverified")
        problem(await client.get(f"/v1/patients/{pid}/bindings", headers=h), 403,
                "patient-unverified")
        async with Engine.connect(redis_url) as eng:
            assert await eng.binding(account_of(app, h), pid) is None
        r = await client.post(f"/v1/patients/{pid}/verify", headers=h, json={})
        problem(r, 503, "unavailable")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        s.down = False
    calls = s.calls
    r = await client.post(f"/v1/patients/{pid}/verify", headers=h)  # the body is optional
    assert r.status_code == 200 and r.json()["verified"] is True, r.text
    assert s.calls == calls + 1
    r = await bind(client, h, nid)  # binding again: the existing binding, no new check
    assert r.status_code == 201 and r.json()["patient_id"] == pid and s.calls == calls + 1
    r = await client.post(f"/v1/patients/{pid}/verify", headers=h, json={})  # nothing to do
    assert r.status_code == 200 and s.calls == calls + 1
    assert (await hold(client, h, sid, pid)).status_code == 201
    problem(await client.post(f"/v1/patients/{pid}/verify", headers=h,
                              json={"ticket": "not a ticket!"}), 422, "invalid-input")
    problem(await client.post("/v1/patients/nope/verify", headers=h, json={}), 404,
            "not-found")


async def test_patient_sees_and_revokes_the_accounts_that_bound_them(
    client: Client, app: Litestar, redis_url: str
) -> None:
    """The person (face-check ticket) sees every other binding of the ID,
    masked, and revokes any; a family member's data-verified binding revokes
    only unverified ones; an unverified binding sees and revokes nothing. A
    revoked binding stops holding at once."""
    nid = national_id(540_000 + next_id())
    sim(app).register(nid, NAME, PHONE)
    sid = await session(client)
    me = await login(client, uid("me"))
    r = await bind(client, me, nid, ticket=SimulatedRealName.ticket(account_of(app, me), nid))
    mine = r.json()["patient_id"]
    stranger = await login(client, uid("stranger"))
    r = await bind(client, stranger, nid, name="王五", phone="13900001111")
    theirs = r.json()["patient_id"]
    assert r.json()["verification"] == "mismatch"
    relative = await login(client, uid("relative"))
    r = await bind(client, relative, nid)
    kin = r.json()["patient_id"]
    assert r.json()["verification"] == "data"

    r = await client.get(f"/v1/patients/{mine}/bindings", headers=me)
    assert r.status_code == 200, r.text
    seen = r.json()
    assert [(b["binding_id"], b["name"], b["phone"], b["verified"]) for b in seen] == [
        (theirs, "王*", "139****1111", False), (kin, "张*丰", "138****5678", True)]
    assert nid not in r.text and mask_id(nid) not in r.text and "13900001111" not in r.text

    problem(await client.get(f"/v1/patients/{theirs}/bindings", headers=stranger), 403,
            "patient-unverified")
    problem(await client.delete(f"/v1/patients/{theirs}/bindings/{mine}", headers=stranger),
            403, "patient-unverified")
    problem(await client.delete(f"/v1/patients/{kin}/bindings/{mine}", headers=relative), 403,
            "not-revocable")
    problem(await client.delete(f"/v1/patients/{mine}/bindings/{mine}", headers=me), 404,
            "not-found")
    problem(await client.delete(f"/v1/patients/{mine}/bindings/nope", headers=me), 404,
            "not-found")
    # Someone else's binding id through the wrong patient: nothing changes.
    problem(await client.delete(f"/v1/patients/{kin}/bindings/{theirs}", headers=me), 404,
            "not-found")
    assert len((await client.get(f"/v1/patients/{mine}/bindings", headers=me)).json()) == 2

    r = await client.delete(f"/v1/patients/{kin}/bindings/{theirs}", headers=relative)
    assert r.status_code == 204, r.text
    assert (await client.get("/v1/patients", headers=stranger)).json() == []

    assert (await hold(client, relative, sid, kin)).status_code == 201
    r = await client.delete(f"/v1/patients/{mine}/bindings/{kin}", headers=me)
    assert r.status_code == 204, r.text
    problem(await hold(client, relative, sid, kin, slot="0830"), 404, "not-found")
    async with Engine.connect(redis_url) as eng:
        assert await eng.binding(account_of(app, relative), kin) == ""  # a tombstone
    assert (await client.get(f"/v1/patients/{mine}/bindings", headers=me)).json() == []
    # The relative's hold stays; the patient's own day is taken by it until it ends.
    problem(await hold(client, me, sid, mine, slot="0830"), 409, "duplicate")


async def test_http_gateway_contract_against_the_simulator() -> None:
    """``HttpRealNameVerifier`` speaks the wire contract the simulator serves:
    every outcome, and anything unreadable or refused is "unavailable"."""
    s = SimulatedRealName(unknown_ids="unknown")
    nid = national_id(550_000)
    s.register(nid, NAME, PHONE)
    app = simulator_app(s, "gateway-key-0123456789")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as hc:
        v = HttpRealNameVerifier("http://gw/verify", "gateway-key-0123456789", client=hc)
        claim = Claim(national_id=nid, name=NAME, phone=PHONE, account="a1")
        assert (await v.verify(claim)).level == "data"
        got = await v.verify(Claim(national_id=nid, name=NAME, phone=PHONE, account="a1",
                                   ticket=SimulatedRealName.ticket("a1", nid)))
        assert got.level == "self" and got.reference
        assert (await v.verify(Claim(national_id=nid, name="李四", phone=PHONE,
                                     account="a1"))).outcome == "mismatch"
        assert (await v.verify(Claim(national_id=national_id(550_001), name=NAME, phone=PHONE,
                                     account="a1"))).outcome == "unknown"
        assert "national_id" not in repr(claim) and nid not in repr(claim)
        s.down = True
        with pytest.raises(RealNameUnavailable):
            await v.verify(claim)
        s.down = False
        wrong = HttpRealNameVerifier("http://gw/verify", "another-key", client=hc)
        with pytest.raises(RealNameUnavailable):
            await wrong.verify(claim)
        nowhere = HttpRealNameVerifier("http://gw/nothing-here", "gateway-key-0123456789",
                                       client=hc)
        with pytest.raises(RealNameUnavailable):
            await nowhere.verify(claim)


# ------------------------------------------------------------------ tokens


async def test_logout_and_revocation(client: Client, app: Litestar) -> None:
    """A logout revokes this token (holds too, on the fast path); ``everywhere``
    every token of the account; an operator revokes an account's tokens. A
    new login gets a working token at once."""
    sid = await session(client)
    openid = uid("o")
    a = await login(client, openid)
    await asyncio.sleep(1.05)  # tokens of one account minted in one second are one token
    b = await login(client, openid)
    assert a != b
    pid = (await bind(client, a, national_id(560_000 + next_id()))).json()["patient_id"]
    r = await client.post("/v1/auth/logout", headers=a)
    assert r.status_code == 204, r.text
    for resp in (await client.get("/v1/patients", headers=a), await hold(client, a, sid, pid),
                 await client.post("/v1/auth/logout", headers=a)):
        body = problem(resp, 401, "unauthorized")
        assert "revoked" in body["detail"] and resp.headers["www-authenticate"]
    assert (await client.get("/v1/patients", headers=b)).status_code == 200
    assert (await client.post("/v1/auth/logout?everywhere=true", headers=b)).status_code == 204
    problem(await hold(client, b, sid, pid), 401, "unauthorized")
    c = await login(client, openid)  # in the same second as the revocation
    assert (await hold(client, c, sid, pid)).status_code == 201
    acct = account_of(app, c)
    r = await client.post(f"/v1/admin/accounts/{acct}/revoke-tokens", headers=ADMIN)
    assert r.status_code == 200 and r.json()["account_id"] == acct, r.text
    problem(await client.get("/v1/bookings", headers=c), 401, "unauthorized")
    problem(await client.post("/v1/admin/accounts/nobody/revoke-tokens", headers=ADMIN), 404,
            "not-found")
    assert (await client.get("/v1/patients", headers=await login(client, openid))).json()


async def test_revocations_and_unbinds_reach_every_worker_at_once(
    redis_url: str, fresh_pg_dsn: str, fresh_redis: Any
) -> None:
    """Two granian workers, every request on its own connection (so both
    workers answer): a logout, an unbind and a revoked binding fail at once
    on every worker, with no time for a per-worker cache to expire. (A
    database of its own: Redis was just emptied, and partitions the module's
    database knows would rightly stay closed as "recovering".)"""
    env = server_env(redis_url, fresh_pg_dsn, HAOYUAN_PATIENT_RATE_PER_S="0",
                     HAOYUAN_ACCOUNT_RATE_PER_S="0")
    with granian(env, workers=2) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as hc:
            sid, sid2 = uid("S"), uid("S")
            await import_sessions(hc, [make_spec(sid, dept=uid("D"), caps=(40,)),
                                       make_spec(sid2, dept=uid("D"), caps=(40,))])
            headers = await login(hc, uid("w"))
            nid = national_id(570_000 + next_id())
            pid = (await bind(hc, headers, nid)).json()["patient_id"]

            async def many(sid: str, n: int = 16) -> list[int]:
                body = msgspec.json.encode({"session_id": sid, "slot_id": "0800",
                                            "patient_id": pid})
                got = await asyncio.gather(*(raw_request(
                    base, "POST", "/v1/holds", {**headers, "Content-Type": "application/json"},
                    body) for _ in range(n)))
                return [status for status, _, _ in got]

            # Warm both workers: each has served this account and patient.
            assert set(await many(sid)) <= {201, 409}
            assert (await hc.delete(f"/v1/patients/{pid}", headers=headers)).status_code == 204
            assert set(await many(sid2)) == {404}

            pid = (await bind(hc, headers, nid)).json()["patient_id"]
            assert 201 in await many(sid2)
            r = await hc.post("/v1/auth/wechat", json={"code": f"dev-{uid('me')}"})
            me = {"Authorization": f"Bearer {r.json()['token']}"}
            tok = SimulatedRealName.ticket(r.json()["account_id"], nid)
            mine = (await bind(hc, me, nid, ticket=tok)).json()
            assert mine["verification"] == "self"
            r = await hc.delete(f"/v1/patients/{mine['patient_id']}/bindings/{pid}", headers=me)
            assert r.status_code == 204, r.text
            assert set(await many(sid2)) == {404}

            assert (await hc.post("/v1/auth/logout", headers=headers)).status_code == 204
            assert set(await many(sid2)) == {401}
            got = await asyncio.gather(*(raw_request(base, "GET", "/v1/patients", headers)
                                         for _ in range(16)))
            assert {status for status, _, _ in got} == {401}


async def test_account_hash_fields_are_not_patient_ids(client: Client, app: Litestar,
                                                       redis_url: str) -> None:
    """The revocation fields share the account's hash with the binding
    mirror: a patient id that names one is just an unknown patient."""
    sid = await session(client)
    h = await login(client, uid("u"))
    await bind(client, h, national_id(580_000 + next_id()))
    async with Engine.connect(redis_url) as eng:
        await eng.revoke_tokens(account_of(app, h), None, int(time.time()) - 10)
        fields = await eng.client.hkeys(K.binding_mirror(account_of(app, h)))
    assert b"~all" in fields
    for pid in ("~all", "~t:x", "-"):
        problem(await hold(client, h, sid, pid), 404, "not-found")
    assert (await client.get("/v1/patients", headers=h)).status_code == 200
