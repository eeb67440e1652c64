"""A release spike booked through the FHIR facade and /v1 at once, with real
processes: the API under granian (2 workers), the crowd over HTTP.

340 people want 40 units of one session released a few seconds ahead: 150
/v1 patients, 150 backend patients through /fhir/r4 (half through a
``trusted`` client, half through a ``verify`` client whose patients the
real-name authority checks), and 40 people who try both ways with the same
resident ID. Before the release both answer not-open (the facade with the
release instant as an extension); at the release each person holds a
slot (/v1 patients prefer the first, the backend's the second), falls back
on the other when it is sold out, retries after a 429/503, and pays (/v1's
signed callback, the facade's ``$book``). Both ways book, and both contest
each slot once its favourites are gone.

What must hold: no 5xx; every unit booked exactly once (40 bookings, no
(slot, unit) twice in the answers, the engine's audit, and PostgreSQL's
one-booked-row-per-unit after the writer drained); nobody booked twice,
however many ways they tried (one per patient per department-day); every
refusal of the facade an OperationOutcome with a stable code.
"""

from __future__ import annotations

import asyncio
import collections
import random
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from api.auth import TokenSigner
from api.settings import Settings, dev_crypto
from engine.engine import Engine
from engine.store import queries as q
from engine.store.migrate import migrate
from tests import fhirkit as fk
from tests.apikit import (
    ADMIN,
    gather_limited,
    granian,
    national_id,
    payment_headers,
    raw_request,
    server_env,
)
from tests.enginekit import drain, make_spec, new_database, now_ms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

V1, FHIR, BOTH = 150, 150, 40
CAPS = (20, 20)
SID = "RT1"
_dec = msgspec.json.decode


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[str]:
    async with new_database(pg_dsn) as dsn:
        yield dsn


class Crowd:
    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency: dict[str, list[float]] = {"v1": [], "fhir": []}
        self.booked: list[tuple[str, str, int]] = []  # (person, slot, unit)
        self.ways: collections.Counter[str] = collections.Counter()  # bookings per way

    async def call(self, way: str, method: str, path: str, headers: dict[str, str],
                   body: bytes) -> tuple[int, dict[str, str], bytes]:
        t0 = time.perf_counter()
        status, h, payload = await raw_request(self.base, method, path, headers, body)
        if path.endswith(("$hold", "/v1/holds")):
            self.latency[way].append(time.perf_counter() - t0)
        self.statuses[(way, status)] += 1
        if status >= 400:
            if way == "fhir":
                assert h["content-type"].startswith(fk.FHIR), (status, payload)
                oo = fk.validate(_dec(payload))
                self.codes[(way, oo["issue"][0]["details"]["coding"][0]["code"])] += 1
            else:
                self.codes[(way, _dec(payload)["type"].rsplit("/", 1)[1])] += 1
        return status, h, payload

    async def v1(self, person: str, headers: dict[str, str], pid: str) -> None:
        for slot in ("0800", "0830"):
            for _ in range(8):
                body = msgspec.json.encode({"session_id": SID, "slot_id": slot,
                                            "patient_id": pid})
                st, _, payload = await self.call("v1", "POST", "/v1/holds", {
                    **headers, "Content-Type": "application/json"}, body)
                if st in (429, 503):
                    await asyncio.sleep(0.2)
                    continue
                if st != 201:
                    kind = _dec(payload)["type"]
                    if kind.endswith("sold-out"):
                        break
                    return
                hold = _dec(payload)
                pay = msgspec.json.encode({"payment_ref": f"rt-{hold['hold_id']}",
                                           "amount": 5000})
                path = f"/v1/holds/{hold['hold_id']}/confirm"
                for _ in range(20):
                    st, _, payload = await self.call("v1", "POST", path,
                                                     payment_headers(pay, path=path), pay)
                    if st not in (429, 503):
                        break
                    await asyncio.sleep(0.2)
                assert st == 200, payload
                b = _dec(payload)
                self.booked.append((person, b["slot_id"], b["unit"]))
                self.ways["v1"] += 1
                return

    async def fhir(self, person: str, auth: dict[str, str], nid: str) -> None:
        for slot in ("0830", "0800"):  # the backend's patients prefer the later slot
            for _ in range(8):
                body = msgspec.json.encode(fk.hold_body(SID, slot, nid))
                st, _, payload = await self.call("fhir", "POST", "/fhir/r4/Appointment/$hold",
                                                 fk.headers(auth), body)
                if st in (429, 503):
                    await asyncio.sleep(0.2)
                    continue
                if st != 200:
                    code = _dec(payload)["issue"][0]["details"]["coding"][0]["code"]
                    if code == "sold-out":
                        break
                    return
                appt = fk.appointment_of(fk.validate(_dec(payload)))
                book = msgspec.json.encode(fk.book_body(appt["id"], f"rt-f-{appt['id']}"))
                for _ in range(20):
                    st, _, payload = await self.call("fhir", "POST",
                                                     "/fhir/r4/Appointment/$book",
                                                     fk.headers(auth), book)
                    if st not in (429, 503):
                        break
                    await asyncio.sleep(0.2)
                assert st in (200, 201), payload
                done = fk.appointment_of(fk.validate(_dec(payload)))
                assert done["status"] == "booked"
                self.booked.append((person, done["slot"][0]["reference"].rsplit(".", 1)[1],
                                    fk.ext(done, "urn:haoyuan:queue-number")))
                self.ways["fhir"] += 1
                return


async def _accounts(dsn: str, people: list[int]) -> dict[int, tuple[dict[str, str], str]]:
    """/v1 accounts with a verified patient each, straight through the store."""
    crypto = dev_crypto()
    signer = TokenSigner(Settings(env="development").token_secret, 3600)
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)

    async def one(i: int) -> tuple[int, tuple[dict[str, str], str]]:
        async with pool.acquire() as conn:
            acct = await q.create_account(conn, crypto.openid_hash(f"rt-{i}"))
            view = await q.bind_patient(conn, crypto, acct, "张三", "13812345678",
                                        national_id(i), verification="data")
        return i, ({"Authorization": f"Bearer {signer.mint(acct)[0]}"}, view.patient_id)

    try:
        return dict(await gather_limited(4, [one(i) for i in people]))
    finally:
        await pool.close()


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else 0.0


async def test_a_spike_through_the_facade_and_v1_sells_each_unit_once(
        redis_url: str, db: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    await migrate(db)
    trusted = await fk.add_client(db, "rt-trusted", identity="trusted", rate_per_s=5000,
                                  burst=5000)
    verify = await fk.add_client(db, "rt-verify", identity="verify", rate_per_s=5000,
                                 burst=5000)
    base_id = 820_000
    v1_people = [base_id + i for i in range(V1)]
    fhir_people = [base_id + V1 + i for i in range(FHIR)]
    both = [base_id + V1 + FHIR + i for i in range(BOTH)]
    accounts = await _accounts(db, v1_people + both)
    with granian(server_env(redis_url, db), workers=2) as base:
        release = now_ms() + 4000
        spec = make_spec(SID, dept="RTD", date="2026-12-20", caps=CAPS, release_at_ms=release)
        st, _, payload = await raw_request(base, "POST", "/v1/admin/sessions", {
            **ADMIN, "Content-Type": "application/json"}, msgspec.json.encode([spec]))
        assert st == 200, payload
        crowd = Crowd(base)
        # Before the release: not open, both ways (the facade with the instant).
        st, _, payload = await raw_request(
            base, "POST", "/fhir/r4/Appointment/$hold", fk.headers(trusted),
            msgspec.json.encode(fk.hold_body(SID, "0800", national_id(fhir_people[0]))))
        oo = fk.validate(_dec(payload))
        assert st == 409 and oo["issue"][0]["details"]["coding"][0]["code"] == "not-open"
        assert oo["issue"][0]["extension"][0]["valueInstant"]
        hdr, pid = accounts[v1_people[0]]
        st, _, payload = await raw_request(base, "POST", "/v1/holds", {
            **hdr, "Content-Type": "application/json"}, msgspec.json.encode(
            {"session_id": SID, "slot_id": "0800", "patient_id": pid}))
        assert st == 409 and _dec(payload)["type"] == "/problems/not-open"
        await asyncio.sleep(max(0.0, (release - now_ms()) / 1000) + 0.05)

        jobs: list[Any] = []
        for i in v1_people:
            jobs.append(crowd.v1(f"p{i}", *accounts[i]))
        for k, i in enumerate(fhir_people):
            jobs.append(crowd.fhir(f"p{i}", trusted if k % 2 else verify, national_id(i)))
        for k, i in enumerate(both):
            jobs.append(crowd.v1(f"p{i}", *accounts[i]))
            jobs.append(crowd.fhir(f"p{i}", trusted if k % 2 else verify, national_id(i)))
        random.Random(17).shuffle(jobs)  # the two ways interleaved
        t0 = time.perf_counter()
        await asyncio.gather(*jobs)
        spent = time.perf_counter() - t0
    assert not [s for s in crowd.statuses if s[1] >= 500], crowd.statuses
    units = [(slot, unit) for _, slot, unit in crowd.booked]
    assert len(units) == sum(CAPS), (len(units), crowd.codes)
    assert len(set(units)) == len(units), "a unit was sold twice"
    people = collections.Counter(p for p, _, _ in crowd.booked)
    assert max(people.values()) == 1, "someone booked twice"
    assert crowd.ways["fhir"] > 0 and crowd.ways["v1"] > 0, crowd.ways
    assert crowd.codes[("fhir", "sold-out")] > 0 and crowd.codes[("v1", "sold-out")] > 0
    async with Engine.connect(redis_url) as eng:
        audit = await eng.audit(SID)
        assert audit.ok and audit.booked == sum(CAPS) and audit.free == 0, audit.breaches
        pool = await asyncpg.create_pool(db, min_size=1, max_size=4)
        try:
            await drain(eng, pool)
            rows = await pool.fetch("SELECT slot_id, unit FROM bookings"
                                    " WHERE session_id = $1 AND status = 'booked'", SID)
        finally:
            await pool.close()
    assert sorted((r["slot_id"], r["unit"]) for r in rows) == sorted(units)
    print(f"\nspike: {len(jobs)} people, {sum(crowd.statuses.values())} requests in"
          f" {spent:.2f} s; booked by way {dict(crowd.ways)}; codes {dict(crowd.codes)}")
    for way, xs in crowd.latency.items():
        print(f"{way} holds: n={len(xs)} p50={_p(xs, 0.5):.1f} ms p99={_p(xs, 0.99):.1f} ms"
              f" mean={statistics.fmean(xs) * 1000:.1f} ms")
