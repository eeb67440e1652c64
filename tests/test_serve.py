"""``haoyuan serve`` as ops run it: the API and the workers as children of one
supervisor on private servers; a child killed -9 comes back by itself,
bookings keep reaching PostgreSQL, one scrape of /metrics sees every API
worker, and SIGTERM stops everything cleanly with nothing left unacknowledged."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from engine.store.migrate import migrate
from engine.testing.servers import RedisServer, free_port
from engine.writer import outbox_lag
from tests.apikit import ROOT, bind, import_sessions, login, pay, server_env
from tests.enginekit import make_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def wait_http(url: str, within_s: float = 60) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(int(within_s * 10)):
            try:
                if (await c.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def status(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


async def test_serve_keeps_the_service_up_and_stops_cleanly(fresh_pg_dsn: str,
                                                            tmp_path: Path) -> None:
    await migrate(fresh_pg_dsn)
    redis = RedisServer(appendonly=True, appendfsync="always").start()
    port = free_port()
    status_file = tmp_path / "status.json"
    env = server_env(redis.url, fresh_pg_dsn, HAOYUAN_OPS_TOKEN="")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--workers", "2",
        "--no-forwarder", "--status-file", str(status_file), "--grace", "20",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=2)
    try:
        await wait_http(base + "/healthz")
        await asyncio.sleep(1.0)  # every API worker's lifespan
        st = status(status_file)
        assert set(st["children"]) == {"api", "writer-0", "sweeper"}
        writer_pid = st["children"]["writer-0"]["pid"]
        os.kill(writer_pid, signal.SIGKILL)
        for _ in range(100):
            st = status(status_file)
            if st["children"]["writer-0"]["restarts"] == 1:
                break
            await asyncio.sleep(0.1)
        assert st["children"]["writer-0"]["restarts"] == 1
        assert st["children"]["writer-0"]["pid"] != writer_pid
        # A new connection per request: the kernel spreads them over the workers.
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(
                max_keepalive_connections=0)) as c:
            spec = make_spec("SV1", caps=(20,))
            await import_sessions(c, [spec])
            booked = []
            for i in range(10):
                h = await login(c, f"sv{i}")
                pid = await bind(c, h, 3000 + i)
                r = await c.post("/v1/holds", headers=h, json={
                    "session_id": "SV1", "slot_id": "0800", "patient_id": pid})
                assert r.status_code == 201, r.text
                p = await pay(c, r.json()["hold_id"], spec.fee, ref=f"sv-pay-{i}")
                assert p.status_code == 200, p.text
                booked.append(p.json()["booking_id"])
            # One scrape sees both API workers' decisions.
            # Whichever worker answers the scrape, it counts every worker's holds.
            for _ in range(4):
                text = (await c.get("/metrics")).text
                holds = sum(float(v) for v in re.findall(
                    r'haoyuan_decisions_total\{[^}]*op="hold",outcome="held"[^}]*\} ([0-9.]+)',
                    text))
                assert holds == 10, text[:2000]
            served = set(re.findall(r'haoyuan_http_request_duration_seconds_count\{[^}]*'
                                    r'worker="(\d+)"', text))
            assert len(served) == 2, served  # both workers answered, one scrape shows both
        for _ in range(100):  # the restarted writer carries on
            n = await pool.fetchval("SELECT count(*) FROM bookings WHERE status = 'booked'")
            if n == 10:
                break
            await asyncio.sleep(0.1)
        assert n == 10
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 60)
        assert rc == 0
        st = status(status_file)
        assert st["stopping"] and all(ch["exits"] for ch in st["children"].values())
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis.url)
        try:
            lag = await outbox_lag(client)
            assert lag.pending == 0 and lag.undelivered == 0
        finally:
            await client.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await pool.close()
        redis.cleanup()
