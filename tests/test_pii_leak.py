"""Personal data never leaks: after patients bind, hold, pay (the generic
callback and WeChat Pay notifications into the ledger) and cancel through
the real API, and the writer, the HIS forwarder (which sends the FHIR
Patient), the HIS change poller and the refund worker ran, no raw national
ID, phone or name is in any Redis key, value or stream, in the HIS
simulator's appointments or request log, in a pg_dump of the database, or in
the logs. The HIS's Patient resources are the one place they go, by design."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from api.app import create_app
from engine.engine import Engine, EngineConfig
from engine.forwarder import ForwarderConfig, HisForwarder
from engine.his.fhir import FhirHisClient
from engine.his.inbound import HisInbound
from engine.payments.wechat import WechatPay
from engine.refunds import RefundConfig, RefundWorker
from engine.store.migrate import migrate
from engine.testing.his_simulator import SimConfig, SimulatorProcess
from engine.testing.payment_simulator import PaymentSimulatorProcess, PaySimConfig
from engine.testing.servers import find_postgres_bindir
from engine.writer import OutboxWriter, WriterConfig
from tests.apikit import api, import_sessions, login, national_id, pay, settings
from tests.enginekit import make_spec

PHONE = "13812345678"
NAME = "张三丰"


@pytest.fixture
async def db(fresh_pg_dsn: str) -> AsyncIterator[str]:
    await migrate(fresh_pg_dsn)
    yield fresh_pg_dsn


async def test_no_raw_personal_data_anywhere(
    fresh_redis: Any, redis_url: str, db: str, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    ids = [national_id(i) for i in range(6)]
    paysim = PaymentSimulatorProcess(PaySimConfig()).start()
    wxcfg = paysim.wechat_config()
    app = create_app(settings(redis_url, db, log_level="debug", wxpay=wxcfg))
    # create_app holds the stdlib root at WARNING: the scan wants every line.
    caplog.set_level(logging.DEBUG)
    crypto = api(app).crypto
    async with AsyncTestClient(app) as client:
        await import_sessions(client, [make_spec("PII", caps=(10,))])
        for i, nid in enumerate(ids):
            headers = await login(client, f"openid-{i}")
            r = await client.post("/v1/patients", headers=headers, json={
                "name": NAME, "phone": PHONE, "national_id": nid})
            assert r.status_code == 201, r.text
            view = r.json()
            assert nid not in r.text and PHONE not in r.text and NAME not in r.text
            pid = view["patient_id"]
            h = await client.post("/v1/holds", headers=headers, json={
                "session_id": "PII", "slot_id": "0800", "patient_id": pid})
            assert h.status_code == 201, h.text
            if i % 2 == 0:
                assert (await pay(client, h.json()["hold_id"], 5000)).status_code == 200
            elif i != 5:
                async with httpx.AsyncClient(base_url=paysim.url) as http:
                    got = (await http.post("/_sim/pay", json={
                        "hold_id": h.json()["hold_id"], "amount": 5000,
                        "deliver": False})).json()
                r = await client.post("/v1/payments/wechat/notify",
                                      content=got["body"].encode(),
                                      headers={**got["headers"],
                                               "Content-Type": "application/json"})
                assert r.status_code == 204, r.text
            if i == 1:
                c = await client.post(f"/v1/bookings/{h.json()['hold_id']}/cancel",
                                      headers=headers)
                assert c.status_code == 200, c.text
            if i == 0:
                c = await client.post(f"/v1/bookings/{h.json()['hold_id']}/cancel",
                                      headers=headers)
                assert c.status_code == 200, c.text
            # A bad ID is refused without echoing it.
            bad = nid[:-1] + ("0" if nid[-1] != "0" else "1")
            r = await client.post("/v1/patients", headers=headers, json={
                "name": NAME, "phone": PHONE, "national_id": bad})
            assert r.status_code == 422 and bad not in r.text

    pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
    with SimulatorProcess(SimConfig(require_patients=True)) as sim:
        try:
            async with Engine.connect(redis_url, EngineConfig()) as eng:
                await asyncio.wait_for(
                    OutboxWriter(eng, pool, WriterConfig(block_ms=20)).run(
                        asyncio.Event(), burst=True), 30)
                async with FhirHisClient(sim.url, timeout=3.0) as his:
                    await asyncio.wait_for(HisForwarder(eng, pool, his, ForwarderConfig(
                        backoff_base_s=0.05), crypto=crypto).run(asyncio.Event(), burst=True),
                        30)
                    async with httpx.AsyncClient(base_url=sim.url) as http:
                        booked = [b for b, st in (await http.get(
                            "/_sim/appointments")).json().items() if st == "booked"]
                        await http.post("/_sim/his/cancel", json={"booking_id": booked[0]})
                    await HisInbound(eng, pool, his).poll_once()
                await asyncio.wait_for(
                    OutboxWriter(eng, pool, WriterConfig(block_ms=20)).run(
                        asyncio.Event(), burst=True), 30)
                async with WechatPay(wxcfg) as wx:
                    refunds = RefundWorker(pool, wx, RefundConfig(backoff_base_s=0.05))
                    await asyncio.wait_for(refunds.run(asyncio.Event(), burst=True), 30)
                    assert refunds.succeeded >= 1
        finally:
            await pool.close()
            paysim.stop()
        async with httpx.AsyncClient(base_url=sim.url) as http:
            his_text = (await http.get("/_sim/appointment-resources")).text
            his_text += (await http.get("/_sim/received")).text
            his_patients = (await http.get("/_sim/patients")).text

    secrets = [*ids, PHONE, NAME]
    pattern = re.compile("|".join(re.escape(s) for s in secrets))

    # Redis: keys, values, streams.
    r = aioredis.Redis.from_url(redis_url)
    dump: list[str] = []
    async for key in r.scan_iter(count=1000):
        dump.append(key.decode())
        kind = (await r.type(key)).decode()
        if kind == "string":
            dump.append(str(await r.get(key)))
        elif kind == "hash":
            dump.append(str(await r.hgetall(key)))
        elif kind == "zset":
            dump.append(str(await r.zrange(key, 0, -1)))
        elif kind == "set":
            dump.append(str(await r.smembers(key)))
        elif kind == "stream":
            dump.append(str(await r.xrange(key)))
    await r.aclose()
    redis_text = "\n".join(dump)
    assert "PII" in redis_text and not pattern.search(redis_text)

    # PostgreSQL: a full dump holds ciphertext only.
    target = urlsplit(db)
    proc = await asyncio.create_subprocess_exec(
        f"{find_postgres_bindir()}/pg_dump", "-h", "127.0.0.1", "-p", str(target.port),
        "-U", "postgres", target.path.lstrip("/"), stdout=asyncio.subprocess.PIPE)
    raw, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    out = raw.decode()
    assert "patients" in out and not pattern.search(out)

    # The HIS's appointments and request log name patients by the HIS's own
    # id; the patient's identity went to its Patient resources, and only there.
    assert "PII" in his_text and not pattern.search(his_text)
    assert "Patient/pat-" in his_text
    assert sum(nid in his_patients for nid in ids) >= 2 and PHONE in his_patients

    # Logs.
    # Logs: the stdlib records of the workers (every level) and the API's
    # structlog JSON lines on stdout (access log and events at debug).
    logs = "\n".join(rec.getMessage() for rec in caplog.records)
    captured = capsys.readouterr()
    structured = captured.out + captured.err
    # (The access log's lines at least: a logger structlog cached at another
    # level in an earlier test of the same process stays at that level.)
    assert structured.count('"event": "request"') >= 10
    assert not pattern.search(logs)
    assert not pattern.search(structured)
