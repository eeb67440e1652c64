"""Daily reconciliation (对账): a clean day passes; each kind of mismatch,
injected at the provider or in our books, is found; the command exits 1 on
any and its JSON has counts and examples."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import Engine
from engine.payments.wechat import WechatPay, WechatPayConfig
from engine.reconcile import KINDS, reconcile
from engine.refunds import RefundConfig, RefundWorker
from engine.testing.payment_simulator import PaymentSimulatorProcess, PaySimConfig, wxpay_env
from tests.apikit import bind, flushed_app, import_sessions, login
from tests.enginekit import config, drain, make_spec, new_database

ROOT = Path(__file__).resolve().parent.parent
CST = dt.timezone(dt.timedelta(hours=8))
Client = AsyncTestClient[Litestar]


@pytest.fixture(scope="module")
def sim() -> Iterator[PaymentSimulatorProcess]:
    with PaymentSimulatorProcess(PaySimConfig(seed=8)) as p:
        yield p


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[str]:
    async with new_database(pg_dsn) as dsn:
        yield dsn


class Day:
    def __init__(self, client: Client, sim: PaymentSimulatorProcess, pool: asyncpg.Pool,
                 eng: Engine, wx: WechatPay) -> None:
        self.client, self.sim, self.pool, self.eng, self.wx = client, sim, pool, eng, wx
        self.n = 0

    async def admin(self, path: str, **body: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.sim.url, timeout=30) as http:
            r = await http.post(f"/_sim/{path}", content=msgspec.json.encode(body))
        assert r.status_code == 200, r.text
        return r.json()

    async def book(self, sid: str) -> tuple[str, str, dict[str, str]]:
        """A patient holds and pays; (hold id, transaction id, headers)."""
        self.n += 1
        headers = await login(self.client, f"rc-{sid}-{self.n}")
        pid = await bind(self.client, headers, 60_000 + self.n)
        r = await self.client.post("/v1/holds", headers=headers, json={
            "session_id": sid, "slot_id": "0800", "patient_id": pid})
        assert r.status_code == 201, r.text
        hold = r.json()["hold_id"]
        got = await self.admin("pay", hold_id=hold, amount=5000, deliver=False)
        r = await self.client.post("/v1/payments/wechat/notify", content=got["body"].encode(),
                                   headers={**got["headers"],
                                            "Content-Type": "application/json"})
        assert r.status_code == 204, r.text
        return hold, got["transaction_id"], headers

    async def settle(self) -> None:
        await drain(self.eng, self.pool)
        w = RefundWorker(self.pool, self.wx, RefundConfig(backoff_base_s=0.05, idle_s=0.05))
        await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 60)


@pytest.fixture
async def day(redis_url: str, db: str, sim: PaymentSimulatorProcess) -> AsyncIterator[Day]:
    async with httpx.AsyncClient() as http:
        await http.post(f"{sim.url}/_sim/reset")
    cfg: WechatPayConfig = sim.wechat_config()
    app = await flushed_app(redis_url, db, wxpay=cfg)
    async with AsyncTestClient(app) as client:
        await import_sessions(client, [make_spec(f"RC{i}", dept=f"RCD{i}", caps=(9,))
                                       for i in range(4)])
        pool = await asyncpg.create_pool(db, min_size=1, max_size=4)
        try:
            async with Engine.connect(redis_url, config()) as eng, WechatPay(cfg) as wx:
                yield Day(client, sim, pool, eng, wx)
        finally:
            await pool.close()


def today() -> str:
    return dt.datetime.now(CST).date().isoformat()


async def test_a_clean_day_passes_and_each_mismatch_is_found(day: Day) -> None:
    d = day
    kept = [await d.book("RC0") for _ in range(3)]
    cancelled, txn_c, headers_c = await d.book("RC1")
    r = await d.client.post(f"/v1/bookings/{cancelled}/cancel", headers=headers_c)
    assert r.status_code == 200
    await d.settle()
    clean = await reconcile(d.pool, d.wx, today())
    assert clean.ok, clean.counts
    assert clean.counts == dict.fromkeys(KINDS, 0)
    assert (clean.statement.payments, clean.statement.refunds) == (4, 1)
    assert (clean.ledger.payments, clean.ledger.refunds) == (4, 1)
    assert clean.statement.amount == clean.ledger.amount == 20_000

    # paid_without_booking: WeChat Pay took money; its notification never came.
    lost = await d.admin("pay", hold_id="2.RC0.999", amount=5000, deliver=False)
    # booked_without_payment: a payment our ledger holds, the statement does not.
    await d.admin("bill/tamper", action="hide_trade", transaction_id=kept[1][1])
    # amount_mismatch: the statement says another amount.
    await d.admin("bill/tamper", action="amount", transaction_id=kept[2][1], amount=4500)
    # refund_missing: we count a refund done that the provider's bill does not show.
    await d.admin("bill/tamper", action="hide_refund",
                  out_refund_no=await d.pool.fetchval("SELECT out_refund_no FROM refund_orders"))
    # refund_doubled: a second refund of one payment.
    await d.admin("bill/tamper", action="extra_refund", transaction_id=txn_c, amount=5000)
    report = await reconcile(d.pool, d.wx, today())
    assert not report.ok
    assert report.counts == {"paid_without_booking": 1, "booked_without_payment": 1,
                             "amount_mismatch": 1, "refund_missing": 1, "refund_doubled": 1}
    assert report.examples["paid_without_booking"][0].transaction_id == lost["transaction_id"]
    assert report.examples["booked_without_payment"][0].transaction_id == kept[1][1]
    assert report.examples["amount_mismatch"][0].transaction_id == kept[2][1]
    assert {m.transaction_id for m in report.examples["refund_doubled"]} == {txn_c}
    assert await d.pool.fetchval("SELECT count(*) FROM reconcile_runs") == 2

    # A refund owed but never ordered is missing too.
    await d.pool.execute("DELETE FROM refund_orders")
    again = await reconcile(d.pool, d.wx, today())
    assert again.counts["refund_missing"] == 1
    assert again.examples["refund_missing"][0].booking_id == cancelled


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_command_exits_1_on_a_mismatch_with_counts_and_examples(
        day: Day, db: str) -> None:
    d = day
    await d.book("RC3")
    await d.settle()
    env = {**os.environ, "HAOYUAN_ENV": "development", "HAOYUAN_PG_DSN": db,
           **wxpay_env(d.wx.config)}

    async def run() -> tuple[int, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "reconcile", "payments", "--date", today(),
            "--json", cwd=str(ROOT), env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode in (0, 1), err.decode()[-2000:]
        return proc.returncode or 0, json.loads(out)

    code, ok = await run()
    assert code == 0 and ok["ok"] is True and ok["counts"]["paid_without_booking"] == 0
    await d.admin("pay", hold_id="1.NOPE.2", amount=300, deliver=False)
    code, bad = await run()
    assert code == 1 and bad["ok"] is False
    assert bad["counts"]["paid_without_booking"] == 1
    assert bad["examples"]["paid_without_booking"][0]["amount"] == 300
    assert set(bad["counts"]) == set(KINDS)
