"""Money end to end: patients pay through the WeChat Pay simulator into the
real API (the notification route records the ledger before it confirms), the
writer, the HIS forwarder (with its change poller) against the HIS simulator,
and the refund worker against the payment simulator. Every paid booking that
ends without a visit, and every payment that booked nothing, ends with
exactly one refund, done once at the provider."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.context import Api
from engine import Engine
from engine.forwarder import ForwarderConfig, HisForwarder
from engine.his.fhir import FhirHisClient
from engine.his.inbound import HisInbound
from engine.keys import PartitionKeys
from engine.payments.wechat import WechatPay, WechatPayConfig
from engine.refunds import RefundConfig, RefundWorker
from engine.testing.his_simulator import SimConfig, SimulatorProcess
from engine.testing.payment_simulator import PaymentSimulatorProcess, PaySimConfig
from tests.apikit import ADMIN, api, bind, flushed_app, import_sessions, login
from tests.enginekit import config, drain, make_spec, new_database

Client = AsyncTestClient[Litestar]
FAST_FWD = dict(backoff_base_s=0.02, backoff_cap_s=0.2, breaker_reset_s=0.2, idle_s=0.05,
                lease_s=10.0, compensate_recheck_s=0.2)
FAST_REFUNDS = dict(backoff_base_s=0.05, backoff_cap_s=0.2, processing_recheck_s=0.1,
                    idle_s=0.05, lease_s=10.0)


@pytest.fixture(scope="module")
def his_sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(SimConfig(seed=5, require_patients=True,
                                    reject_doctors=frozenset({"DR_REJ"}))) as p:
        yield p


@pytest.fixture(scope="module")
def pay_sim() -> Iterator[PaymentSimulatorProcess]:
    with PaymentSimulatorProcess(PaySimConfig(seed=5)) as p:
        yield p


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[str]:
    async with new_database(pg_dsn) as dsn:
        yield dsn


class World:
    """The API in process, the workers, both simulators."""

    def __init__(self, client: Client, app: Litestar, eng: Engine, pool: asyncpg.Pool,
                 his_sim: SimulatorProcess, pay_sim: PaymentSimulatorProcess,
                 wx: WechatPay, his: FhirHisClient) -> None:
        self.client, self.app, self.eng, self.pool = client, app, eng, pool
        self.his_sim, self.pay_sim, self.wx, self.his = his_sim, pay_sim, wx, his
        self.fwd = HisForwarder(eng, pool, his, ForwarderConfig(**FAST_FWD),  # type: ignore[arg-type]
                                crypto=self.api.crypto)
        self.inbound = HisInbound(eng, pool, his)
        self.refunds = RefundWorker(pool, wx, RefundConfig(**FAST_REFUNDS))  # type: ignore[arg-type]

    @property
    def api(self) -> Api:
        return api(self.app)

    async def sim(self, which: str, path: str, **body: Any) -> Any:
        base = self.his_sim.url if which == "his" else self.pay_sim.url
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            r = await http.post(f"/_sim/{path}", content=msgspec.json.encode(body))
        assert r.status_code == 200, r.text
        return r.json()

    async def get(self, which: str, path: str) -> Any:
        base = self.his_sim.url if which == "his" else self.pay_sim.url
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            return (await http.get(f"/_sim/{path}")).json()

    async def pay(self, hold_id: str, amount: int = 5000, *, expect: int = 204) -> str:
        """The patient pays in WeChat Pay; its notification reaches the API."""
        got = await self.sim("pay", "pay", hold_id=hold_id, amount=amount, deliver=False)
        r = await self.client.post("/v1/payments/wechat/notify", content=got["body"].encode(),
                                   headers={**got["headers"], "Content-Type": "application/json"})
        assert r.status_code == expect, r.text
        self.last_notification = got
        return str(got["transaction_id"])

    async def settle(self, rounds: int = 3) -> None:
        """Writer, forwarder, the HIS's changes, writer, refunds: until quiet."""
        for _ in range(rounds):
            await drain(self.eng, self.pool)
            await asyncio.wait_for(self.fwd.run(asyncio.Event(), burst=True), 60)
            await self.inbound.poll_once()
            await drain(self.eng, self.pool)
            await asyncio.wait_for(self.refunds.run(asyncio.Event(), burst=True), 60)


@pytest.fixture
async def world(redis_url: str, db: str, his_sim: SimulatorProcess,
                pay_sim: PaymentSimulatorProcess) -> AsyncIterator[World]:
    async with httpx.AsyncClient() as http:
        await http.post(f"{his_sim.url}/_sim/reset")
        await http.post(f"{pay_sim.url}/_sim/reset")
    cfg: WechatPayConfig = pay_sim.wechat_config(timeout_s=2.0)
    app = await flushed_app(redis_url, db, wxpay=cfg)
    async with AsyncTestClient(app) as client:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=8)
        try:
            async with Engine.connect(redis_url, config()) as eng, \
                    WechatPay(cfg) as wx, FhirHisClient(his_sim.url, timeout=2.0) as his:
                yield World(client, app, eng, pool, his_sim, pay_sim, wx, his)
        finally:
            await pool.close()


async def patient(w: World, i: int) -> tuple[dict[str, str], str]:
    headers = await login(w.client, f"money-{i}")
    return headers, await bind(w.client, headers, 70_000 + i)


async def hold(w: World, who: tuple[dict[str, str], str], sid: str) -> str:
    r = await w.client.post("/v1/holds", headers=who[0], json={
        "session_id": sid, "slot_id": "0800", "patient_id": who[1]})
    assert r.status_code == 201, r.text
    return str(r.json()["hold_id"])


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_every_refund_cause_ends_with_exactly_one_refund(world: World) -> None:
    w = world
    specs = [make_spec(sid, dept=f"D{sid}", doctor="DR_REJ" if sid == "REJ" else f"DR{sid}",
                       caps=(1,) if sid == "LATE" else (3,))
             for sid in ("CANCEL", "STOP", "HISSTOP", "REJ", "WIN", "LATE", "CONF", "KEEP",
                         "NOSHOW", "AMT")]
    await import_sessions(w.client, specs)
    ps = [await patient(w, i) for i in range(14)]
    booked: dict[str, str] = {}
    for i, sid in enumerate(("CANCEL", "STOP", "HISSTOP", "REJ", "WIN", "CONF", "KEEP",
                             "NOSHOW")):
        h = await hold(w, ps[i], sid)
        await w.pay(h)
        booked[sid] = h
    # The same notification again (WeChat Pay retries): counted, applied once.
    again = w.last_notification
    r = await w.client.post("/v1/payments/wechat/notify", content=again["body"].encode(),
                            headers={**again["headers"], "Content-Type": "application/json"})
    assert r.status_code == 204
    # A second payment for a hold already paid; a payment of the wrong amount;
    # a payment for no hold of ours.
    await w.pay(booked["KEEP"])
    amt = await hold(w, ps[8], "AMT")
    await w.pay(amt, 4000)
    await w.pay("9.NOPE.1")
    # A late payment that finds no unit: the hold is released, another patient
    # takes the only unit, then the first pays.
    late = await hold(w, ps[9], "LATE")
    assert (await w.client.delete(f"/v1/holds/{late}", headers=ps[9][0])).status_code == 200
    taker = await hold(w, ps[10], "LATE")
    await w.pay(taker)
    await w.pay(late)
    await w.settle(1)

    # A patient cancels; an operator stops a session (停诊).
    r = await w.client.post(f"/v1/bookings/{booked['CANCEL']}/cancel", headers=ps[0][0])
    assert r.status_code == 200, r.text
    r = await w.client.post("/v1/admin/sessions/STOP/suspend", headers=ADMIN, json={})
    assert r.status_code == 200 and r.json()["cancelled"] == 1
    # The HIS: 停诊 entered there, a cancel at its window, a no-show.
    await w.sim("his", "his/suspend", session_id="HISSTOP", reason="专家停诊")
    await w.sim("his", "his/cancel", booking_id=booked["WIN"], reason="window")
    await w.sim("his", "his/noshow", booking_id=booked["NOSHOW"])
    # Redis loses an acknowledged booking; its unit is sold again: a conflict.
    conf = booked["CONF"]
    ref = await w.eng.ref("CONF")
    assert ref is not None
    rec = await w.eng.record(conf)
    assert rec is not None
    await w.eng.client.hdel(ref.keys.units, str(rec.unit))
    await w.eng.client.zadd(ref.keys.free, {str(rec.unit): 1_000_000 + rec.unit})
    await w.eng.client.hdel(PartitionKeys(ref.partition).records, conf)
    await w.eng.client.delete(ref.rule_key)
    second = await hold(w, ps[11], "CONF")
    await w.pay(second)
    await w.settle(3)

    orders = {r["booking_id"]: r for r in await w.pool.fetch(
        "SELECT booking_id, cause, state, amount, provider, transaction_id FROM refund_orders")}
    expected = {
        booked["CANCEL"]: "patient_cancel", booked["STOP"]: "suspended",
        booked["HISSTOP"]: "suspended", booked["REJ"]: "his_rejected",
        booked["WIN"]: "his_cancelled", late: "expired", second: "conflict",
        amt: "amount_mismatch", "9.NOPE.1": "unknown_hold",
    }
    by_cause = {b: o["cause"] for b, o in orders.items()}
    assert {b: c for b, c in by_cause.items() if c != "already_paid"} == expected
    assert Counter(by_cause.values())["already_paid"] == 1
    assert orders[booked["KEEP"]]["cause"] == "already_paid"  # not the booking's own payment
    assert {o["state"] for o in orders.values()} == {"succeeded"}
    assert {o["provider"] for o in orders.values()} == {"wechat"}
    assert orders[amt]["amount"] == 4000
    # At the provider: one refund per payment, each done once.
    sim_refunds = await w.get("pay", "refunds")
    assert len(sim_refunds) == len(orders) == 10
    assert Counter(r["transaction_id"] for r in sim_refunds).most_common(1)[0][1] == 1
    assert all(r["effects"] == 1 and r["status"] == "SUCCESS" for r in sim_refunds)
    # What stands is not refunded: the kept booking, the no-show, the conflict's winner.
    keep = await w.pool.fetchrow("SELECT status, payment_ref FROM bookings WHERE id = $1",
                                 booked["KEEP"])
    assert keep["status"] == "booked"
    noshow = await w.pool.fetchrow("SELECT status, attendance FROM bookings WHERE id = $1",
                                   booked["NOSHOW"])
    assert (noshow["status"], noshow["attendance"]) == ("booked", "no_show")
    assert await w.pool.fetchval("SELECT status FROM bookings WHERE id = $1", conf) == "booked"
    # The ledger: every payment once, the repeated notification counted.
    ledger = await w.pool.fetch("SELECT transaction_id, notifications, outcome FROM payments")
    assert len(ledger) == 14
    assert sorted(r["notifications"] for r in ledger)[-1] == 2
    assert {r["outcome"] for r in ledger} == {"booked", "refund"}

    # The patient sees why, and the refund.
    mine = (await w.client.get("/v1/bookings", headers=ps[3][0])).json()
    [rej] = [b for b in mine if b["booking_id"] == booked["REJ"]]
    assert rej["his_status"] == "rejected" and "停诊" in rej["reason_text"]
    assert rej["refund"] == {"state": "succeeded", "amount": 5000, "state_text": "已退款"}
    [kept] = (await w.client.get("/v1/bookings", headers=ps[6][0])).json()
    assert kept["his_appointment_id"] and kept["place"] and kept["visit_start"]
    # It stands; the refund it shows is its second payment's.
    assert kept["status"] == "booked" and kept["reason_text"] is None
    assert kept["refund"]["state"] == "succeeded"
    [win] = (await w.client.get("/v1/bookings", headers=ps[4][0])).json()
    assert win["status"] == "cancelled" and "窗口" in win["reason_text"]
    assert win["refund"]["state"] == "succeeded"
    one = (await w.client.get(f"/v1/bookings/{booked['CANCEL']}", headers=ps[0][0])).json()
    assert one["refund"]["state"] == "succeeded" and one["reason_text"].startswith("您已取消")

    # The HIS has each person once, and appointments name them by the HIS's id.
    patients = await w.get("his", "patients")
    ids = [p["identifier"][0]["value"] for p in patients]
    assert len(ids) == len(set(ids))
    appts = await w.get("his", "appointment-resources")
    refs = {p["actor"]["reference"] for a in appts for p in a["participant"]
            if p["actor"]["reference"].startswith("Patient/")}
    assert refs and refs <= {f"Patient/{p['id']}" for p in patients}
    assert await w.pool.fetchval("SELECT count(*) FROM his_patients") == len(patients)
    # Operators see it in /metrics: nothing left to refund, nothing stuck.
    metrics = (await w.client.get("/metrics")).text
    assert 'haoyuan_refund_orders{state="due"} 0.0' in metrics
    assert 'haoyuan_refund_orders{state="stuck"} 0.0' in metrics
    assert 'haoyuan_his_attention_bookings{state="cancel_refused"} 0.0' in metrics


async def test_a_refund_notification_ends_its_order_and_a_forged_one_changes_nothing(
        world: World) -> None:
    w = world
    await import_sessions(w.client, [make_spec("RN", dept="DRN", caps=(2,))])
    who = await patient(w, 50)
    h = await hold(w, who, "RN")
    txn = await w.pay(h)
    assert (await w.client.post(f"/v1/bookings/{h}/cancel", headers=who[0])).status_code == 200
    await drain(w.eng, w.pool)
    no = await w.pool.fetchval("SELECT out_refund_no FROM refund_orders WHERE booking_id = $1", h)
    # The provider refunded it (another worker's request); its notification arrives.
    r = await w.wx.refund(no, transaction_id=txn, refund=5000, total=5000, reason="x")
    assert r.outcome == "accepted"
    note = await w.sim("pay", "refund-notify", out_refund_no=no)
    sig = note["headers"]["Wechatpay-Signature"]
    forged = {**note["headers"], "Wechatpay-Signature": sig[::-1]}
    r = await w.client.post("/v1/payments/wechat/notify", content=note["body"].encode(),
                            headers={**forged, "Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == "FAIL"
    assert await w.pool.fetchval("SELECT state FROM refund_orders WHERE out_refund_no = $1",
                                 no) == "due"
    for _ in range(2):  # delivered twice: the same outcome
        r = await w.client.post("/v1/payments/wechat/notify", content=note["body"].encode(),
                                headers={**note["headers"], "Content-Type": "application/json"})
        assert r.status_code == 204, r.text
    row = await w.pool.fetchrow("SELECT state, provider_refund_id FROM refund_orders"
                                " WHERE out_refund_no = $1", no)
    assert row["state"] == "succeeded" and row["provider_refund_id"]
    # The worker has nothing left to send: the provider refunded it once.
    await asyncio.wait_for(w.refunds.run(asyncio.Event(), burst=True), 30)
    assert w.refunds.sent == 0
    [one] = [x for x in await w.get("pay", "refunds") if x["out_refund_no"] == no]
    assert one["effects"] == 1
