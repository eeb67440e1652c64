"""Crashes on the money and HIS paths, with real processes: kill -9 of the
refund worker and of the HIS forwarder in the middle of a batch, and a
provider that refunds and then times out. No refund twice, none lost; no
Appointment or Patient twice, none lost."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from engine import Engine
from engine.payments.wechat import WechatPay
from engine.pii import Crypto
from engine.refunds import RefundConfig, RefundWorker
from engine.store import payments as store
from engine.store.migrate import migrate
from engine.testing.his_simulator import SimConfig, SimulatorProcess
from engine.testing.payment_simulator import PaymentSimulatorProcess, PaySimConfig, wxpay_env
from tests.apikit import bind, flushed_app, import_sessions, login, pay
from tests.enginekit import config, drain, make_spec, new_database

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[str]:
    async with new_database(pg_dsn) as dsn:
        await migrate(dsn)
        yield dsn


def haoyuan(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


async def wait_for(pool: asyncpg.Pool, query: str, at_least: int, within_s: float = 60) -> int:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        n: int = await pool.fetchval(query)
        if n >= at_least:
            return n
        await asyncio.sleep(0.05)
    raise AssertionError(f"{query} stayed below {at_least}")


async def finish(proc: subprocess.Popen[bytes], within_s: float = 120) -> None:
    code = await asyncio.to_thread(proc.wait, within_s)
    assert code == 0, proc.stderr.read().decode()[-3000:] if proc.stderr else code


async def test_refund_worker_killed_mid_batch_and_a_provider_that_times_out_after_refunding(
        db: str) -> None:
    n = 40
    with PaymentSimulatorProcess(PaySimConfig(seed=9, latency_ms=150)) as sim:
        cfg = sim.wechat_config(timeout_s=0.5)
        pool = await asyncpg.create_pool(db, min_size=1, max_size=4)
        try:
            async with httpx.AsyncClient(base_url=sim.url, timeout=30) as http:
                for i in range(n):
                    got = (await http.post("/_sim/pay", json={
                        "hold_id": f"5.R{i}.1", "amount": 100 + i, "deliver": False})).json()
                    await store.record_payment(
                        pool, provider="wechat", transaction_id=got["transaction_id"],
                        hold_id=f"5.R{i}.1", payment_ref=got["transaction_id"], amount=100 + i,
                        paid_at=dt.datetime.now(dt.UTC), verification="ok")
                    assert await store.ensure_refund(
                        pool, provider="wechat", transaction_id=got["transaction_id"],
                        booking_id=f"5.R{i}.1", cause="patient_cancel", reason="patient",
                        amount=100 + i)
                env = {"HAOYUAN_ENV": "development", "HAOYUAN_PG_DSN": db, **wxpay_env(cfg)}
                worker = haoyuan(["refunds", "--batch-size", "20", "--backoff-base", "0.05",
                                  "--backoff-cap", "0.2"], env)
                try:
                    # Mid-batch: some asked for, not all answered.
                    await wait_for(pool, "SELECT count(*) FROM refund_orders"
                                         " WHERE state = 'requested'", 5)
                finally:
                    worker.send_signal(signal.SIGKILL)
                    worker.wait(10)
                states = Counter(r["state"] for r in await pool.fetch(
                    "SELECT state FROM refund_orders"))
                assert states["requested"] > 0 and states["succeeded"] < n, states
                # Now the provider refunds, then answers too late, half the time.
                await http.post("/_sim/config", json={"latency_ms": 0, "timeout_rate": 0.5,
                                                      "hang_s": 1.0})
                # The killed worker's lease runs out; a new worker takes over.
                await pool.execute("UPDATE refund_orders SET next_attempt_at = now()"
                                   " WHERE state <> 'succeeded'")
                w = RefundWorker(pool, WechatPay(cfg), RefundConfig(
                                     backoff_base_s=0.05, backoff_cap_s=0.2, idle_s=0.05,
                                     processing_recheck_s=0.1))
                try:
                    await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 120)
                finally:
                    await w.provider.aclose()
                assert w.unknown > 0 and w.looked_up > 0  # timeouts were looked up first
                refunds = (await http.get("/_sim/refunds")).json()
        finally:
            states = Counter(r["state"] for r in await pool.fetch(
                "SELECT state FROM refund_orders"))
            await pool.close()
    assert states == {"succeeded": n}
    assert len(refunds) == n
    assert all(r["effects"] == 1 for r in refunds), [r for r in refunds if r["effects"] != 1]
    # Every unknown outcome (killed mid-request, answered too late) was looked
    # up before anything was sent again.


async def test_forwarder_killed_mid_batch_sends_each_patient_and_appointment_once(
        db: str, redis_url: str) -> None:
    n = 30
    keys = {"k1": os.urandom(32)}
    hmac_key = os.urandom(32)
    crypto = Crypto(keys, "k1", hmac_key)
    env_keys = {"HAOYUAN_DATA_KEYS": "k1:" + base64.b64encode(keys["k1"]).decode(),
                "HAOYUAN_HMAC_KEY": base64.b64encode(hmac_key).decode()}
    app = await flushed_app(redis_url, db, crypto=crypto)
    async with AsyncTestClient(app) as client:
        await import_sessions(client, [make_spec("KF", dept="KFD", caps=(n,))])
        for i in range(n):
            h = await login(client, f"kf-{i}")
            pid = await bind(client, h, 80_000 + i)
            r = await client.post("/v1/holds", headers=h, json={
                "session_id": "KF", "slot_id": "0800", "patient_id": pid})
            assert r.status_code == 201, r.text
            assert (await pay(client, r.json()["hold_id"], 5000)).status_code == 200
    pool = await asyncpg.create_pool(db, min_size=1, max_size=4)
    try:
        async with Engine.connect(redis_url, config()) as eng:
            await drain(eng, pool)
        with SimulatorProcess(SimConfig(seed=2, latency_ms=120, require_patients=True)) as his:
            env = {"HAOYUAN_ENV": "development", "HAOYUAN_PG_DSN": db,
                   "HAOYUAN_REDIS_URL": redis_url, "HAOYUAN_HIS_URL": his.url, **env_keys}
            fwd = haoyuan(["forwarder", "--no-inbound"], env)
            try:
                await wait_for(pool, "SELECT count(*) FROM bookings"
                                     " WHERE his_status = 'accepted'", 3)
            finally:
                fwd.send_signal(signal.SIGKILL)
                fwd.wait(10)
            assert await pool.fetchval("SELECT count(*) FROM bookings"
                                       " WHERE his_status = 'accepted'") < n
            # Its leases run out; another forwarder finishes.
            await pool.execute("UPDATE bookings SET his_updated_at = now()"
                               " WHERE his_status <> 'accepted'")
            await finish(haoyuan(["forwarder", "--burst", "--no-inbound"], env))
            async with httpx.AsyncClient(base_url=his.url) as http:
                received = (await http.get("/_sim/received")).json()
                patients = (await http.get("/_sim/patients")).json()
                appts = (await http.get("/_sim/appointments")).json()
        created = Counter(r["booking_id"] for r in received
                          if r["path"] == "/Appointment" and r["status_code"] == 201)
        assert len(created) == n and set(created.values()) == {1}
        assert len(appts) == n and set(appts.values()) == {"booked"}
        national = [p["identifier"][0]["value"] for p in patients]
        assert len(national) == len(set(national)) == n
        assert await pool.fetchval("SELECT count(*) FROM bookings WHERE his_status = 'accepted'"
                                   " AND his_place IS NOT NULL") == n
        assert await pool.fetchval("SELECT count(*) FROM his_patients") == n
    finally:
        await pool.close()
