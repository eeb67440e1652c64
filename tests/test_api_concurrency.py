"""2,000 concurrent HTTP hold requests on 100 units from 1,000 accounts:
exactly 100 are 201, the rest 409 (sold out, duplicate) or 429 (shed, rate
limited), never a 5xx; the engine's audit agrees (100 held, 0 free). A
request the waiting room gives a ticket comes back with it when told, as
the mini-program does.

Once in process (one worker, every request in flight at once in one event
loop, a small in-flight limit so that shedding happens) and once through
``python -m api.serve`` (granian, 2 worker processes, real sockets)."""

from __future__ import annotations

import asyncio
import collections
import time

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from api.app import create_app
from api.auth import TokenSigner
from api.settings import Settings, dev_crypto
from engine.engine import Engine
from engine.pii import Crypto
from engine.store import queries as q
from tests.apikit import (
    gather_limited,
    granian,
    import_sessions,
    national_id,
    raw_request,
    server_env,
    settings,
)
from tests.enginekit import make_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ACCOUNTS = 1000
REQUESTS = 2000
UNITS = 100


async def _accounts(dsn: str, crypto: Crypto, token_secret: str,
                    tag: str) -> list[tuple[dict[str, str], str]]:
    """Accounts and patients written straight through the store (the HTTP
    login and bind are tested elsewhere; here they would dominate the run)."""
    signer = TokenSigner(token_secret, 3600)
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)

    async def one(i: int) -> tuple[dict[str, str], str]:
        async with pool.acquire() as conn:
            acct = await q.create_account(conn, crypto.openid_hash(f"{tag}{i}"))
            view = await q.bind_patient(conn, crypto, acct, "张三", "13812345678",
                                        national_id(i), verification="data")
        return {"Authorization": f"Bearer {signer.mint(acct)[0]}"}, view.patient_id

    try:
        return await gather_limited(8, [one(i) for i in range(ACCOUNTS)])
    finally:
        await pool.close()


def _body(sid: str, pid: str) -> bytes:
    return msgspec.json.encode({"session_id": sid, "slot_id": "0800", "patient_id": pid})


def _come_back(status: int, body: bytes) -> tuple[str, float] | None:
    """A 429 waiting-room answer's ticket and wait: the mini-program comes
    back with the ticket when told (the crowd here does, up to 20 times)."""
    if status != 429:
        return None
    got = msgspec.json.decode(body)
    if got.get("type") != "/problems/waiting-room":
        return None
    return got["ticket"], got["retry_after_ms"] / 1000


async def _spike(c: httpx.AsyncClient, accounts: list[tuple[dict[str, str], str]],
                 sid: str) -> collections.Counter[int]:
    async def one(i: int) -> int:
        headers, pid = accounts[i % ACCOUNTS]
        h = {**headers, "Content-Type": "application/json"}
        for _ in range(20):
            r = await c.post("/v1/holds", headers=h, content=_body(sid, pid))
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
            back = _come_back(r.status_code, r.content)
            if back is None:
                break
            h["X-Waiting-Ticket"] = back[0]
            await asyncio.sleep(back[1])
        return r.status_code

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(REQUESTS))))


async def _spike_sockets(base: str, accounts: list[tuple[dict[str, str], str]],
                         sid: str) -> collections.Counter[int]:
    """Every request on its own connection, all 2,000 open at once."""
    async def one(i: int) -> int:
        headers, pid = accounts[i % ACCOUNTS]
        h = {**headers, "Content-Type": "application/json"}
        for _ in range(20):
            status, rh, body = await raw_request(base, "POST", "/v1/holds", h, _body(sid, pid))
            if status == 429:
                assert int(rh["retry-after"]) >= 1
            back = _come_back(status, body)
            if back is None:
                break
            h["X-Waiting-Ticket"] = back[0]
            await asyncio.sleep(back[1])
        return status

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(REQUESTS))))


async def _audit(redis_url: str, sid: str) -> None:
    async with Engine.connect(redis_url) as eng:
        a = await eng.audit(sid)
    assert a.ok, a.breaches
    assert (a.held, a.free, a.capacity) == (UNITS, 0, UNITS)


async def test_spike_in_process(redis_url: str, db: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    s = settings(redis_url, db, max_inflight=64)
    app = create_app(s)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with app.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t",
                                                 timeout=60) as c:
        await import_sessions(c, [make_spec("SPIKE1", dept="DS1", caps=(UNITS,))])
        accounts = await _accounts(db, s.resolved_crypto(), s.token_secret, "spike-a")
        codes = await _spike(c, accounts, "SPIKE1")
    assert codes[201] == UNITS, codes
    assert set(codes) <= {201, 409, 429}, codes
    assert sum(codes.values()) == REQUESTS
    await _audit(redis_url, "SPIKE1")


async def test_spike_through_granian_two_workers(redis_url: str, db: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    with granian(server_env(redis_url, db), workers=2) as base:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            await import_sessions(c, [make_spec("SPIKE2", dept="DS2", caps=(UNITS,))])
        accounts = await _accounts(db, dev_crypto(), Settings(env="development").token_secret,
                                   "spike-b")
        t0 = time.perf_counter()
        codes = await _spike_sockets(base, accounts, "SPIKE2")
        print(f"2,000 holds through granian in {time.perf_counter() - t0:.2f} s")
    assert codes[201] == UNITS, codes
    assert set(codes) <= {201, 409, 429}, codes
    assert sum(codes.values()) == REQUESTS
    await _audit(redis_url, "SPIKE2")
