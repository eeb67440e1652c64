"""Recovery and idempotency from outside, as operators and clients meet them:
real processes (Redis with AOF, the API under granian with two workers, the
writer and `haoyuan rebuild` / `audit` as commands), every request and answer
recorded, and the history judged against the final state of Redis and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from engine import Engine
from engine.store.migrate import migrate
from engine.testing.servers import RedisServer
from tests.apikit import (
    ROOT,
    bind,
    gather_limited,
    granian,
    import_sessions,
    login,
    pay,
    server_env,
)
from tests.enginekit import config, make_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class History:
    """Every request and its answer, in the order the answers came."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, op: str, r: httpx.Response, **info: Any) -> httpx.Response:
        try:
            body = r.json()
        except ValueError:
            body = {"raw": r.text[:200]}
        self.events.append({"op": op, "status": r.status_code, "body": body, **info})
        return r

    def of(self, op: str, status: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events
                if e["op"] == op and (status is None or e["status"] == status)]


async def cli(*args: str, redis_url: str, pg_dsn: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", *args, "--redis-url", redis_url, "--pg-dsn", pg_dsn,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 120)
    return p.returncode or 0, out.decode(), err.decode()


async def start_writer(redis_url: str, pg_dsn: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "writer", "--redis-url", redis_url,
        "--pg-dsn", pg_dsn, "--block-ms", "20", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def wait_for(pred: Any, within_s: float = 30.0) -> None:
    for _ in range(int(within_s * 10)):
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


async def booked_in_pg(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT id, unit FROM bookings WHERE status = 'booked'")
    return {r["id"]: r["unit"] for r in rows}


async def test_cancels_acknowledged_while_the_writer_lags_survive_the_rebuild(
        fresh_pg_dsn: str) -> None:
    """The reproduction of the report: 12 units sold out and written; Redis
    and the writer killed -9, Redis back on its AOF (nothing lost); four
    owners cancel (200) while the writer is down, three others hold the freed
    units; `haoyuan rebuild`. The cancels stand, the three holds stay theirs
    and their payments book, the audit is clean, Redis = PostgreSQL."""
    await migrate(fresh_pg_dsn)
    redis = RedisServer(appendonly=True, appendfsync="always")
    redis.start()
    hist = History()
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=2)
    writer: asyncio.subprocess.Process | None = None
    try:
        with granian(server_env(redis.url, fresh_pg_dsn)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                spec = make_spec("S1", caps=(12,))
                await import_sessions(c, [spec])
                people = []
                for i in range(15):
                    h = await login(c, f"rb{i}")
                    people.append((h, await bind(c, h, 900 + i)))
                writer = await start_writer(redis.url, fresh_pg_dsn)
                booking_of_unit: dict[int, tuple[int, str]] = {}
                for i in range(12):
                    h, pid = people[i]
                    r = hist.add("hold", await c.post("/v1/holds", headers=h, json={
                        "session_id": "S1", "slot_id": "0800", "patient_id": pid}), who=i)
                    assert r.status_code == 201, r.text
                    p = hist.add("pay", await pay(c, r.json()["hold_id"], spec.fee,
                                                  ref=f"pay-{i}"), who=i)
                    assert p.status_code == 200, p.text
                    booking_of_unit[p.json()["unit"]] = (i, p.json()["booking_id"])

                async def all_written() -> bool:
                    return len(await booked_in_pg(pool)) == 12

                await wait_for(all_written)
                writer.send_signal(signal.SIGKILL)
                await writer.wait()
                writer = None
                await asyncio.to_thread(redis.kill)
                await asyncio.to_thread(redis.restart)
                # Four owners cancel while no writer runs (units 1-4).
                for unit in (1, 2, 3, 4):
                    i, bid = booking_of_unit[unit]
                    r = hist.add("cancel", await c.post(f"/v1/bookings/{bid}/cancel",
                                                        headers=people[i][0]), who=i, id=bid)
                    assert r.status_code == 200, r.text
                # Three other accounts hold the freed units, 60 s to pay.
                new_holds = []
                for i in (12, 13, 14):
                    h, pid = people[i]
                    r = hist.add("hold", await c.post("/v1/holds", headers=h, json={
                        "session_id": "S1", "slot_id": "0800", "patient_id": pid}), who=i)
                    assert r.status_code == 201, r.text
                    new_holds.append(r.json())
                assert sorted(x["unit"] for x in new_holds) == [1, 2, 3]
                # The operator follows the README: rebuild.
                rc, out, err = await cli("rebuild", redis_url=redis.url, pg_dsn=fresh_pg_dsn)
                assert rc == 0, err
                report = json.loads(out)
                assert [(x["session_id"], x["restored"], x["already"]) for x in report] == [
                    ("S1", 0, 8)]
                for x, i in zip(new_holds, (12, 13, 14), strict=True):
                    p = hist.add("pay", await pay(c, x["hold_id"], spec.fee, ref=f"pay-n{i}"),
                                 who=i)
                    assert p.status_code == 200, p.text
                    assert p.json()["unit"] == x["unit"] and not p.json()["late"]
        rc, out, err = await cli("writer", "--burst", redis_url=redis.url, pg_dsn=fresh_pg_dsn)
        assert rc == 0, err
        rc, out, err = await cli("audit", "--json", redis_url=redis.url, pg_dsn=fresh_pg_dsn)
        doc = json.loads(out)
        assert rc == 0 and doc["ok"] and doc["rebuild_needed"] is False, doc["breaches"]
        # Judge the history against the final state.
        pg = await booked_in_pg(pool)
        async with Engine.connect(redis.url, config()) as eng:
            audit = await eng.audit("S1")
        assert audit.ok and audit.booked_units == pg and audit.free == 1
        paid = {e["body"]["booking_id"] for e in hist.of("pay", 200)}
        cancelled = {e["id"] for e in hist.of("cancel", 200)}
        assert set(pg) == paid - cancelled and len(pg) == 11
        assert len(set(pg.values())) == len(pg)  # no unit twice
        cancelled_rows = await pool.fetch(
            "SELECT id FROM bookings WHERE status = 'cancelled'")
        assert {r["id"] for r in cancelled_rows} == cancelled
    finally:
        if writer is not None and writer.returncode is None:
            writer.kill()
            await writer.wait()
        await pool.close()
        redis.cleanup()


async def test_a_crowd_during_a_rebuild_is_told_recovering_and_no_unit_goes_twice(
        fresh_pg_dsn: str) -> None:
    """Redis lost everything mid-morning. While `haoyuan rebuild` runs, a
    crowd keeps pressing: every answer is a 503 `recovering` with
    Retry-After or, once the partition reopened, a hold on a unit no
    booking PostgreSQL has; never a 500, never a unit twice."""
    await migrate(fresh_pg_dsn)
    redis = RedisServer(appendonly=True, appendfsync="always")
    redis.start()
    hist = History()
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=2)
    try:
        with granian(server_env(redis.url, fresh_pg_dsn)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as c:
                spec = make_spec("S1", caps=(40,))
                await import_sessions(c, [spec])
                people = []
                for i in range(60):
                    h = await login(c, f"cr{i}")
                    people.append((h, await bind(c, h, 1000 + i)))
                for i in range(25):
                    h, pid = people[i]
                    r = await c.post("/v1/holds", headers=h, json={
                        "session_id": "S1", "slot_id": "0800", "patient_id": pid})
                    assert r.status_code == 201, r.text
                    assert (await pay(c, r.json()["hold_id"], spec.fee, ref=f"p{i}")
                            ).status_code == 200
                rc, _, err = await cli("writer", "--burst", redis_url=redis.url,
                                       pg_dsn=fresh_pg_dsn)
                assert rc == 0, err
                booked_before = await booked_in_pg(pool)
                assert len(booked_before) == 25
                async with Engine.connect(redis.url, config()) as eng:
                    await eng.client.flushall()  # Redis lost its data
                crowd = people[25:]
                stop = asyncio.Event()

                async def press(k: int) -> None:
                    h, pid = crowd[k]
                    while not stop.is_set():
                        r = hist.add("hold", await c.post("/v1/holds", headers=h, json={
                            "session_id": "S1", "slot_id": "0800", "patient_id": pid}), who=k)
                        if r.status_code in (201, 409):
                            return
                        await asyncio.sleep(0.02)

                presses = [asyncio.create_task(press(k)) for k in range(len(crowd))]
                await asyncio.sleep(0.5)
                rc, _, err = await cli("rebuild", redis_url=redis.url, pg_dsn=fresh_pg_dsn)
                assert rc == 0, err
                await asyncio.wait_for(asyncio.gather(*presses), 60)
                stop.set()
        statuses = defaultdict(int)
        for e in hist.events:
            statuses[e["status"]] += 1
        assert set(statuses) <= {201, 409, 503}, dict(statuses)
        recovering = hist.of("hold", 503)
        assert recovering, "the crowd pressed while the partition was closed"
        assert all(e["body"]["type"] == "/problems/recovering" for e in recovering)
        held = [e["body"]["unit"] for e in hist.of("hold", 201)]
        assert len(held) == len(set(held)) == 15  # the 15 units left, each once
        assert not set(held) & set(booked_before.values())
        async with Engine.connect(redis.url, config()) as eng:
            audit = await eng.audit("S1")
        assert audit.ok and audit.booked_units == booked_before and audit.held == 15
    finally:
        await pool.close()
        redis.cleanup()


async def test_one_idempotency_key_one_answer_across_workers_while_units_come_and_go(
        fresh_pg_dsn: str) -> None:
    """Keyed holds sent twice at once and again later, to two workers, while
    holders release units and the sold-out caches fill and clear: every key
    gets one answer (a hold or a refusal) however often it is sent."""
    await migrate(fresh_pg_dsn)
    redis = RedisServer()
    redis.start()
    hist = History()
    try:
        with granian(server_env(redis.url, fresh_pg_dsn)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30,
                                         limits=httpx.Limits(max_connections=64)) as c:
                spec = make_spec("S1", caps=(3,))
                await import_sessions(c, [spec])
                people = []
                for i in range(40):
                    h = await login(c, f"ik{i}")
                    people.append((h, await bind(c, h, 2000 + i)))
                body = {"session_id": "S1", "slot_id": "0800"}

                async def send(i: int, key: str) -> None:
                    h, pid = people[i]
                    r = await c.post("/v1/holds", json={**body, "patient_id": pid},
                                     headers={**h, "Idempotency-Key": key})
                    hist.add("hold", r, key=key, who=i)

                async def churn() -> None:
                    # Holders give their units back now and then.
                    for _ in range(6):
                        await asyncio.sleep(0.15)
                        for e in hist.of("hold", 201):
                            h = people[e["who"]][0]
                            r = await c.delete(f"/v1/holds/{e['body']['hold_id']}", headers=h)
                            hist.add("release", r, who=e["who"])

                rounds = []
                for wave in range(3):
                    keys = [(i, f"k-{i}-w{wave}") for i in range(wave, 40, 3)]
                    first = [send(i, k) for i, k in keys] + [send(i, k) for i, k in keys]
                    rounds.append(asyncio.gather(gather_limited(32, first), churn()))
                    await asyncio.sleep(0.3)
                await asyncio.gather(*rounds)
                # Late replays of every key, after the units moved again.
                all_keys = {(e["who"], e["key"]) for e in hist.of("hold")}
                await gather_limited(16, [send(i, k) for i, k in all_keys])
        answers: dict[str, set[str]] = defaultdict(set)
        transient = {429, 503}
        for e in hist.of("hold"):
            if e["status"] in transient:
                continue
            b = e["body"]
            answers[e["key"]].add(f"{e['status']}:{b.get('hold_id') or b.get('type')}")
        assert answers and all(len(v) == 1 for v in answers.values()), {
            k: v for k, v in answers.items() if len(v) > 1}
        kinds = {next(iter(v)).split(":")[0] for v in answers.values()}
        assert kinds == {"201", "409"}, kinds  # both holds and refusals were replayed
    finally:
        redis.cleanup()


def test_history_helper_sees_every_answer() -> None:
    """The recorder keeps the body of non-JSON answers too (a proxy's 502)."""
    h = History()
    h.add("x", httpx.Response(502, text="bad gateway"))
    h.add("x", httpx.Response(201, content=msgspec.json.encode({"hold_id": "1.S.1"})))
    assert [e["status"] for e in h.of("x")] == [502, 201]
    assert h.of("x", 502)[0]["body"] == {"raw": "bad gateway"}
