"""Notifications (issue 13): every kind, through the real API, writer,
refund desk and notifier, to the simulator of WeChat subscribe messages and
SMS: each event told exactly once, also after kill -9 of the notifier
mid-batch; nothing before the event is in PostgreSQL; WeChat only with the
user's consent (a one-time consent is used up), SMS otherwise; the reminder
once, out of the quiet hours; nothing personal but the masked name."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import Engine
from engine.notify.config import notifiers_from_env
from engine.notify.worker import Notifications, NotifyConfig, kind_of
from engine.pii import dev_crypto
from engine.testing.notify_simulator import NotifySimConfig, NotifySimulatorProcess
from tests.apikit import ADMIN, api, flushed_app, import_sessions, national_id, next_id, pay, uid
from tests.enginekit import make_spec, now_ms
from tests.test_stats import drain

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent
NAMES = ("张三丰", "李四光", "王五福", "赵六顺")


@pytest.fixture
async def app(fresh_redis: Any, redis_url: str, fresh_pg_dsn: str) -> Litestar:
    # The fixed development keys: the notifier process decrypts with them too.
    return await flushed_app(redis_url, fresh_pg_dsn, crypto=dev_crypto())


def test_what_each_event_is_told_as() -> None:
    assert kind_of("booked", None) == "booking_confirmed"
    assert kind_of("waitlist_offer", None) == "waitlist_offer"
    assert kind_of("offer_lapsed", "expired") == "offer_passed_on"
    assert kind_of("cancelled", "patient") == "cancellation"
    assert kind_of("cancelled", "his_cancelled:window") == "cancellation"
    assert kind_of("cancelled", "doctor_stopped") == "suspension"
    assert kind_of("waitlist_closed", "doctor_stopped") == "suspension"
    assert kind_of("waitlist_closed", "cutoff") is None
    assert kind_of("refund_due", "expired") is None


async def test_every_kind_told_once_even_after_kill_9(
        app: Litestar, redis_url: str, fresh_pg_dsn: str, tmp_path: Path) -> None:
    db = fresh_pg_dsn
    with NotifySimulatorProcess(NotifySimConfig(latency_ms=300)) as sim:
        async with AsyncTestClient(app) as client, httpx.AsyncClient(base_url=sim.url) as simc:
            who: dict[str, tuple[dict[str, str], str, str]] = {}
            for name, person in zip(("a", "b", "c", "d"), NAMES, strict=True):
                openid = f"o-{name}-{next_id()}"
                r = await client.post("/v1/auth/wechat", json={"code": f"dev-{openid}"})
                h = {"Authorization": f"Bearer {r.json()['token']}"}
                r = await client.post("/v1/patients", headers=h, json={
                    "name": person, "phone": f"1390000{next_id():04d}",
                    "national_id": national_id(next_id())})
                assert r.status_code == 201, r.text
                who[name] = (h, r.json()["patient_id"], openid)
            # a: every kind, long-term; b: one offer, once; c and d: none (SMS).
            r = await client.post("/v1/notifications/consent", headers=who["a"][0], json={
                "kinds": ["booking_confirmed", "cancellation", "refund", "visit_reminder"],
                "long_term": True})
            assert r.status_code == 200 and r.json()["remaining"]["refund"] is None
            await client.post("/v1/notifications/consent", headers=who["b"][0],
                              json={"kinds": ["waitlist_offer"]})
            base = make_spec(uid("NS"), dept=uid("ND"), caps=(1,))
            s1 = msgspec.structs.replace(base, waitlist_ttl_ms=1500, waitlist_max=5)
            s2 = make_spec(uid("NT"), dept=uid("NE"), caps=(2,))
            # A visit three hours from now (China time): its reminder is due now.
            soon = dt.datetime.now(dt.timezone(dt.timedelta(hours=8))) + dt.timedelta(hours=3)
            v = make_spec(uid("NV"), dept=uid("NF"), caps=(2,), date=soon.date().isoformat(),
                          starts_ms=now_ms() + 3 * 3_600_000)
            s3 = msgspec.structs.replace(v, slots=[msgspec.structs.replace(
                v.slots[0], start=soon.strftime("%H:%M"),
                end=(soon + dt.timedelta(minutes=1)).strftime("%H:%M"))])
            await import_sessions(client, [s1, s2, s3])

            async def hold(name: str, sid: str) -> str:
                h, pid, _ = who[name]
                r = await client.post("/v1/holds", headers=h, json={
                    "session_id": sid, "slot_id": "0800", "patient_id": pid})
                assert r.status_code == 201, r.text
                return str(r.json()["hold_id"])

            a1 = await hold("a", s1.session_id)
            assert (await pay(client, a1, 5000)).status_code == 200       # booking_confirmed a
            for n in ("b", "c"):
                r = await client.post(f"/v1/sessions/{s1.session_id}/waitlist",
                                      headers=who[n][0], json={"patient_id": who[n][1]})
                assert r.status_code == 201
            r = await client.post(f"/v1/bookings/{a1}/cancel", headers=who["a"][0])
            assert r.status_code == 200                                  # cancellation a,
            c2 = await hold("c", s2.session_id)                         # offer b
            assert (await pay(client, c2, 5000)).status_code == 200       # booking_confirmed c
            d3 = await hold("d", s3.session_id)
            assert (await pay(client, d3, 5000)).status_code == 200       # confirmed d, reminder d
            r = await client.post(f"/v1/admin/sessions/{s2.session_id}/suspend", headers=ADMIN,
                                  json={"reason": "doctor_stopped"})
            assert r.status_code == 200                                  # suspension c
            # Nothing is told before the writer has it in PostgreSQL.
            notifiers = notifiers_from_env(sim.env(), development=True)
            pool = await asyncpg.create_pool(db, min_size=1, max_size=4)
            quiet = NotifyConfig(quiet_from_min=0, quiet_to_min=0, lease_s=1.0,
                                 backoff_base_s=0.05, backoff_cap_s=0.2, idle_s=0.05)
            try:
                early = Notifications(pool, api(app).crypto, notifiers, quiet)
                await early.run(asyncio.Event(), burst=True)
                assert early.planned == 0
                await drain(redis_url, db)
                # b lets the offer lapse: it passes on to c.                 offer_passed_on b
                await asyncio.sleep(1.7)                                     # offer c
                async with Engine.connect(redis_url) as eng:
                    assert await eng.sweep() >= 1
                await drain(redis_url, db)
                r = await client.post(f"/v1/admin/refunds/{a1}/paid", headers=ADMIN,
                                      json={"paid_ref": "bank-1"})
                assert r.status_code == 200, r.text                          # refund a
                # The notifier, killed while its first batch is on the wire ...
                env = {k: v for k, v in os.environ.items() if not k.startswith("HAOYUAN_")}
                env.update(HAOYUAN_ENV="development", HAOYUAN_PG_DSN=db, **sim.env())
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "engine.cli", "notifier", "--quiet-hours", "0-0",
                    "--lease", "1", cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL)
                try:
                    for _ in range(200):
                        if await pool.fetchval(
                                "SELECT count(*) FROM notifications WHERE state = 'sending'"):
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the notifier never sent")
                finally:
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                # ... and another one finishing the work (the lease ran out).
                await simc.post("/_sim/config", json={"latency_ms": 0})
                after = Notifications(pool, api(app).crypto, notifiers, quiet)
                await asyncio.wait_for(after.run(asyncio.Event(), burst=True), 60)
                rows = await pool.fetch("SELECT dedup_key, account_id, kind, channel, state,"
                                        " payload FROM notifications ORDER BY created_at")
            finally:
                for n in notifiers.values():
                    await n.aclose()
                await pool.close()
            got = (await simc.get("/_sim/messages")).json()
            mine = (await client.get("/v1/notifications", headers=who["a"][0])).json()
    by = Counter((r["kind"], r["channel"], r["state"]) for r in rows)
    expected = Counter({
        ("booking_confirmed", "wechat", "sent"): 1,      # a
        ("booking_confirmed", "sms", "sent"): 2,         # c, d
        ("cancellation", "wechat", "sent"): 1,           # a
        ("waitlist_offer", "wechat", "sent"): 1,         # b (its one consent)
        ("offer_passed_on", "sms", "sent"): 1,           # b, no consent for it
        ("waitlist_offer", "sms", "sent"): 1,            # c
        ("suspension", "sms", "sent"): 1,                # c
        ("refund", "wechat", "sent"): 1,                 # a
        ("visit_reminder", "sms", "sent"): 1,            # d
    })
    assert by == expected, by
    # Exactly once at the simulator per message, whatever was sent again.
    assert sorted(m["dedup_key"] for m in got) == sorted(r["dedup_key"] for r in rows)
    wechat = [m for m in got if m["channel"] == "wechat"]
    assert {m["to"] for m in wechat} == {who["a"][2], who["b"][2]}
    assert all(m["template_id"].startswith("tpl-") for m in wechat)
    # Only the masked name travels; no raw name, no ID number anywhere.
    text = msgspec.json.encode(got).decode() + msgspec.json.encode(
        [r["payload"] for r in rows]).decode()
    assert "张*丰" in text and not any(n in text for n in NAMES)
    assert {n["kind"] for n in mine} == {"booking_confirmed", "cancellation", "refund"}
    assert all(n["state"] == "sent" for n in mine)
