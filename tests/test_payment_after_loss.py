"""A payment notified again after a failover lost its confirmation: the
booking PostgreSQL recorded stays the payment's booking, on its own unit.

The story (real Redis on AOF, restarted on an older copy of its AOF as a
failover to a lagging replica would leave it): a hold is paid, the engine
books unit 1 and the writer commits it; the answer to WeChat Pay was a FAIL,
so WeChat Pay notifies again. Redis has lost the confirmation (the hold is a
hold again), the hold then expires and another patient holds unit 1. The
notification comes again: it must not book a second unit for the same
hold (PostgreSQL and the HIS have unit 1), and Redis is put back to unit 1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil

import asyncpg
import pytest

from engine import Booked, Engine, Held
from engine.payments.intake import Incoming, take_payment
from engine.schedule_import import import_sessions
from engine.testing.servers import RedisServer
from engine.writer import OutboxWriter, WriterConfig
from tests.enginekit import config, make_spec

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
async def test_a_payment_notified_again_after_a_lost_confirmation_keeps_its_unit(
        db_pool: asyncpg.Pool) -> None:
    db = db_pool
    spec = make_spec("S1", caps=(3,), hold_ttl_ms=1500)
    redis = RedisServer(appendonly=True, appendfsync="always")
    redis.start()
    try:
        async with Engine.connect(redis.url, config()) as eng:
            await import_sessions(eng, db, [spec])
            x = await eng.hold("S1", "0800", patient="px", account="ax")
            assert isinstance(x, Held) and x.unit == 1
            old = redis.dir / "aof-copy"
            shutil.copytree(redis.dir / "appendonlydir", old)  # Redis as it was: X held
            pay = Incoming(provider="wechatpay", transaction_id="4200-lost", hold_id=x.hold_id,
                           payment_ref="4200-lost", amount=spec.fee,
                           paid_at=dt.datetime.now(dt.UTC))
            first = await take_payment(eng, db, pay)
            assert first.kind == "booked" and first.booked is not None
            assert first.booked.unit == 1
            writer = OutboxWriter(eng, db, WriterConfig(block_ms=20))
            await asyncio.wait_for(writer.run(asyncio.Event(), burst=True), 30)
            # The confirmation is lost: Redis comes back on the older AOF.
            await asyncio.to_thread(redis.kill)
            shutil.rmtree(redis.dir / "appendonlydir")
            shutil.copytree(old, redis.dir / "appendonlydir")
            await asyncio.to_thread(redis.restart)
            rec = await eng.record(x.hold_id)
            assert rec is not None and rec.state.value == "h"  # held again
            await asyncio.sleep(1.7)  # X's hold expires; another patient takes unit 1
            y = await eng.hold("S1", "0800", patient="py", account="ay")
            assert isinstance(y, Held) and y.unit == 1
            again = await take_payment(eng, db, pay)  # WeChat Pay notifies again
            assert again.kind == "booked" and again.repeated
            assert again.booked is not None and again.booked.unit == 1
            audit = await eng.audit("S1")
            assert audit.ok, audit.breaches
            assert audit.booked_units == {x.hold_id: 1}
            # Y's hold, which PostgreSQL never saw paid, gave unit 1 back: its
            # payment finds another unit of the slot.
            yb = await eng.confirm(y.hold_id, "pay-y")
            assert isinstance(yb, Booked) and yb.unit != 1
            row = await db.fetchrow("SELECT unit, status FROM bookings WHERE id = $1",
                                    x.hold_id)
            assert (row["unit"], row["status"]) == (1, "booked")
            assert await db.fetchval(
                "SELECT count(*) FROM bookings WHERE id = $1", x.hold_id) == 1
    finally:
        redis.cleanup()
