"""The outbox writer on real Redis and PostgreSQL, with real crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg
import msgspec
import pytest

from engine import Booked, Engine, Held
from engine.keys import PartitionKeys
from engine.store.migrate import migrate
from engine.testing.servers import PostgresServer, RedisServer
from engine.writer import GROUP, OutboxWriter, WriterConfig, outbox_lag
from tests.enginekit import book_many, config, drain, make_spec


@pytest.fixture
def db(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    return db_pool


@pytest.fixture
def eng(engine_on_fresh_redis: Engine) -> Engine:
    return engine_on_fresh_redis


async def test_writer_writes_every_event_once(eng: Engine, db: asyncpg.Pool) -> None:
    await eng.load_session(make_spec("S1", caps=(20,), hold_ttl_ms=1000))
    ids = await book_many(eng, "S1", 10)
    await eng.cancel(ids[0], reason="patient")
    h = await eng.hold("S1", "0800", patient="late", account="al")
    assert isinstance(h, Held)
    eng.config.clock_offset_ms = 2_000
    await eng.sweep()
    # Sell out the slot so the late payment finds no unit: refund due.
    await book_many(eng, "S1", 11, prefix="q")
    r = await eng.confirm(h.hold_id, "pay-late")
    assert not r.ok
    w = await drain(eng, db)
    assert w.written == 10 + 1 + 11 + 1
    rows = {r["id"]: r for r in await db.fetch("SELECT * FROM bookings")}
    assert rows[ids[0]]["status"] == "cancelled"
    assert rows[h.hold_id]["status"] == "refund_due"
    assert sum(r["status"] == "booked" for r in rows.values()) == 20
    assert await db.fetchval("SELECT count(*) FROM refunds") == 1
    lag = await outbox_lag(eng.client)
    assert lag.pending == 0 and lag.undelivered == 0
    # Redelivery of everything (group rewound) changes nothing.
    ref = await eng.ref("S1")
    assert ref is not None
    await eng.client.xgroup_setid(PartitionKeys(ref.partition).outbox, GROUP, "0")
    w2 = await drain(eng, db)
    assert w2.written == w.written
    assert await db.fetchval("SELECT count(*) FROM bookings") == len(rows)
    assert await db.fetchval("SELECT count(*) FROM booking_events") == w.written


async def test_poison_entry_goes_to_dead_letters(eng: Engine, db: asyncpg.Pool) -> None:
    await eng.load_session(make_spec("S1", caps=(5,)))
    ref = await eng.ref("S1")
    assert ref is not None
    stream = PartitionKeys(ref.partition).outbox
    await eng.client.xadd(stream, {"e": "{not json"})
    await book_many(eng, "S1", 2)
    w = await drain(eng, db)
    assert w.dead == 1 and w.written == 2
    assert await db.fetchval("SELECT count(*) FROM outbox_dead_letters") == 1
    assert await db.fetchval("SELECT count(*) FROM bookings WHERE status='booked'") == 2


async def test_conflict_is_recorded_and_compensated(eng: Engine, db: asyncpg.Pool) -> None:
    """Redis loses a booking it acknowledged; the unit is sold again; the
    PostgreSQL arbiter catches it: the later one is refunded and cancelled,
    the earlier one is put back on its unit."""
    await eng.load_session(make_spec("S1", caps=(3,)))
    [first] = await book_many(eng, "S1", 1)
    await drain(eng, db)
    ref = await eng.ref("S1")
    assert ref is not None
    # Simulate the lost write: the session's Redis state forgets the booking.
    rec = await eng.record(first)
    assert rec is not None
    assert rec is not None
    await eng.client.hdel(ref.keys.units, str(rec.unit))
    await eng.client.zadd(ref.keys.free, {str(rec.unit): 1_000_000 + rec.unit})
    await eng.client.hdel(PartitionKeys(ref.partition).records, first)
    await eng.client.delete(ref.rule_key)
    [second] = await book_many(eng, "S1", 1, prefix="other")
    second_rec = await eng.record(second)
    assert second_rec is not None and second_rec.unit == rec.unit
    w = await drain(eng, db)
    assert w.conflicts == 1
    row = await db.fetchrow("SELECT status FROM bookings WHERE id=$1", second)
    assert row["status"] == "conflict"
    assert await db.fetchval("SELECT winner_booking_id FROM booking_conflicts") == first
    assert await db.fetchval("SELECT reason FROM refunds WHERE booking_id=$1", second) == "conflict"
    restored = await eng.record(first)
    assert restored is not None and restored.state == "b" and restored.unit == rec.unit
    audit = await eng.audit("S1")
    assert audit.ok and audit.booked == 1 and first in audit.booked_units


WRITER_SCRIPT = """
import asyncio, os, sys
import asyncpg
from engine import Engine
from engine.writer import OutboxWriter, WriterConfig
from tests.enginekit import config

async def main():
    pool = await asyncpg.create_pool(sys.argv[2], min_size=1, max_size=2)
    async def stall(n):
        print("COMMITTED", n, flush=True)
        await asyncio.sleep(3600)
    async with Engine.connect(sys.argv[1], config()) as eng:
        w = OutboxWriter(eng, pool, WriterConfig(batch_size=50, block_ms=20,
                         consumer="doomed", after_commit=stall))
        await w.run(asyncio.Event())

asyncio.run(main())
"""


@pytest.mark.slow
async def test_writer_killed_between_commit_and_ack(eng: Engine, db: asyncpg.Pool,
                                                     fresh_pg_dsn: str, redis_url: str) -> None:
    await eng.load_session(make_spec("S1", caps=(120,)))
    ids = await book_many(eng, "S1", 120)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER_SCRIPT, redis_url, fresh_pg_dsn,
        stdout=asyncio.subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert line.startswith(b"COMMITTED")
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert (await outbox_lag(eng.client)).pending > 0  # committed, never acknowledged
    w = await drain(eng, db, claim_idle_ms=100, consumer="survivor")
    assert w.written == 120
    got = [r["id"] for r in await db.fetch("SELECT id FROM bookings WHERE status='booked'")]
    assert sorted(got) == sorted(ids)
    assert await db.fetchval("SELECT count(*) FROM booking_events") == 120
    assert (await outbox_lag(eng.client)).pending == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_postgres_down_during_confirmations_nothing_lost(eng: Engine) -> None:
    pg = PostgresServer()
    pg.start()
    try:
        await migrate(pg.dsn)
        pool = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=2)
        await eng.load_session(make_spec("S1", caps=(200,)))
        stop = asyncio.Event()
        w = OutboxWriter(eng, pool, WriterConfig(block_ms=20))
        task = asyncio.create_task(w.run(stop))
        ids = await book_many(eng, "S1", 50)
        await asyncio.to_thread(pg.crash)
        ids += await book_many(eng, "S1", 100, prefix="during")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(pg.restart)
        ids += await book_many(eng, "S1", 50, prefix="after")
        for _ in range(300):
            lag = await outbox_lag(eng.client)
            if lag.pending == 0 and lag.undelivered == 0:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        conn = await asyncpg.connect(pg.dsn)
        got = [r["id"] for r in await conn.fetch("SELECT id FROM bookings WHERE status='booked'")]
        await conn.close()
        await pool.close()
        assert sorted(got) == sorted(ids)
    finally:
        pg.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_redis_kill9_during_confirmations_loses_no_acknowledged_booking(
    fresh_pg_dsn: str,
) -> None:
    """AOF always: every confirmation the engine acknowledged survives kill -9
    of Redis, reaches PostgreSQL, and the audit is clean."""
    await migrate(fresh_pg_dsn)
    redis = RedisServer(appendonly=True, appendfsync="always")
    redis.start()
    acked: list[str] = []
    try:
        async with Engine.connect(redis.url, config()) as eng:
            await eng.load_session(make_spec("S1", caps=(400,)))

            async def client(k: int) -> None:
                for i in range(100):
                    try:
                        h = await eng.hold("S1", "0800", patient=f"c{k}-{i}", account=f"a{k}")
                        if isinstance(h, Held):
                            b = await eng.confirm(h.hold_id, "pay")
                            if isinstance(b, Booked):
                                acked.append(b.booking_id)
                    except Exception:  # connection refused while Redis is down
                        await asyncio.sleep(0.05)

            clients = [asyncio.create_task(client(k)) for k in range(4)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(redis.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(redis.restart)
            await asyncio.gather(*clients)
            assert len(acked) > 0
            pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=2)
            try:
                await drain(eng, pool)
                got = {r["id"] for r in await pool.fetch(
                    "SELECT id FROM bookings WHERE status='booked'")}
            finally:
                await pool.close()
            assert set(acked) <= got
            audit = await eng.audit("S1")
            assert audit.ok, audit.breaches
            assert set(audit.booked_units) == got
    finally:
        redis.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_restart_that_lost_nothing_needs_no_rebuild(fresh_pg_dsn: str) -> None:
    """Issue 9: after kill -9 of a Redis on AOF always (nothing lost), the
    system can tell that no rebuild is needed: the audit says
    rebuild_needed False with no recovery entry, the writer closes nothing,
    and sales go on without one."""
    from engine.audit import run_audit
    from engine.store.queries import StoredSession, upsert_schedule

    await migrate(fresh_pg_dsn)
    redis = RedisServer(appendonly=True, appendfsync="always")
    redis.start()
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=2)
    try:
        spec = make_spec("S1", caps=(5,))
        async with pool.acquire() as conn:
            await upsert_schedule(conn, [StoredSession.from_spec(spec)])
        async with Engine.connect(redis.url, config()) as eng:
            await eng.load_session(spec)
            ids = await book_many(eng, "S1", 3)
            await eng.cancel(ids[0])
            await drain(eng, pool)
        await asyncio.to_thread(redis.kill)
        await asyncio.to_thread(redis.restart)
        async with Engine.connect(redis.url, config()) as eng:
            audit = await run_audit(eng, pool)
            assert audit.ok and audit.rebuild_needed is False, audit.breaches
            assert not audit.recovery
            await drain(eng, pool)  # the writer finds nothing lost: nothing closes
            h = await eng.hold("S1", "0800", patient="after", account="a-after")
            assert isinstance(h, Held)
            assert isinstance(await eng.confirm(h.hold_id, "pay"), Booked)
            await drain(eng, pool)
            assert (await run_audit(eng, pool)).ok
            booked = await pool.fetchval("SELECT count(*) FROM bookings WHERE status='booked'")
            assert booked == 3
    finally:
        await pool.close()
        redis.cleanup()


async def test_every_event_the_scripts_write_decodes(eng: Engine) -> None:
    """The writer's event types against what the Lua scripts really write:
    every kind is produced by the scripts (book, cancel, a late payment
    refunded, a waitlist offer, a waitlist closed by a suspension) and every
    entry of every stream decodes into its class."""
    from engine.events import (
        Booked,
        Cancelled,
        OfferLapsed,
        RefundDue,
        WaitlistClosed,
        WaitlistOffer,
        decode_event,
    )

    spec = msgspec.structs.replace(make_spec("S1", caps=(1,), hold_ttl_ms=1000),
                                   waitlist_ttl_ms=60_000, waitlist_max=5)
    await eng.load_session(spec)
    await eng.load_session(msgspec.structs.replace(
        make_spec("S2", doctor="DR2", caps=(1,)), waitlist_ttl_ms=60_000, waitlist_max=5))
    ids = await book_many(eng, "S1", 1)
    assert (await eng.join_waitlist("S1", patient="w1", account="aw")).ok
    await eng.cancel(ids[0])  # the unit goes to the waitlist head as an offer
    await book_many(eng, "S2", 1, prefix="s2")
    assert (await eng.join_waitlist("S2", patient="w2", account="aw2")).ok
    await eng.suspend("S2")  # cancels its booking, closes its waitlist
    await eng.load_session(make_spec("S3", doctor="DR3", caps=(1,), hold_ttl_ms=1000))
    late = await eng.hold("S3", "0800", patient="l1", account="al1")
    assert isinstance(late, Held)
    eng.config.clock_offset_ms = 2_000
    await eng.sweep()
    await book_many(eng, "S3", 1, prefix="s3")
    assert not (await eng.confirm(late.hold_id, "pay-late")).ok  # refund due
    eng.config.clock_offset_ms = 120_000
    await eng.sweep()  # S1's offer lapses unpaid: offer_lapsed
    kinds: set[type] = set()
    for p in range(64):
        for _eid, fields in await eng.client.xrange(PartitionKeys(p).outbox):
            # Every field the scripts write is one the event class knows.
            raw = msgspec.json.decode(fields[b"e"])
            ev = decode_event(fields[b"e"])
            assert set(raw) <= {f.encode_name for f in msgspec.structs.fields(ev)} | {"t"}, raw
            kinds.add(type(ev))
    assert kinds == {Booked, Cancelled, RefundDue, WaitlistOffer, WaitlistClosed, OfferLapsed}


def _lose_aof_tail(redis: RedisServer, keep: float) -> None:
    """What a power cut does to AOF everysec (a kill -9 alone loses nothing:
    the kernel keeps the written pages): the tail of the AOF is gone."""
    incr = sorted((redis.dir / "appendonlydir").glob("*.incr.aof"))[-1]
    data = incr.read_bytes()
    incr.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("loss", ["kill9", "lost-tail"])
async def test_redis_kill9_everysec_rebuilt_before_reopening_no_unit_twice(
    db: asyncpg.Pool, loss: str
) -> None:
    """AOF everysec promises less: a crash may lose the last second of
    confirmations ("lost-tail" cuts the AOF as a power cut would). What must
    still hold: the state is rebuilt from PostgreSQL before sales reopen, no
    unit is ever booked twice (Redis or PostgreSQL), bookings never exceed
    capacity, every booking PostgreSQL has is booked in Redis again, and the
    audit is clean."""
    from engine.rebuild import rebuild
    from engine.store.queries import StoredSession, upsert_schedule

    spec = make_spec("S1", caps=(300,))
    async with db.acquire() as conn:
        await upsert_schedule(conn, [StoredSession.from_spec(spec)])
    redis = RedisServer(appendonly=True, appendfsync="everysec")
    redis.start()
    acked: dict[str, int] = {}  # booking id -> unit, as acknowledged to the client
    try:
        async with Engine.connect(redis.url, config(durability="aof-everysec")) as eng:
            await eng.load_session(spec)
            stop_writer = asyncio.Event()
            writer = asyncio.create_task(
                OutboxWriter(eng, db, WriterConfig(block_ms=20)).run(stop_writer))
            selling = asyncio.Event()
            selling.set()

            async def client(k: int, wave: str, n: int) -> None:
                for i in range(n):
                    if not selling.is_set():
                        return
                    try:
                        h = await eng.hold("S1", "0800", patient=f"{wave}{k}-{i}",
                                           account=f"a{k}")
                        if isinstance(h, Held):
                            b = await eng.confirm(h.hold_id, "pay")
                            if isinstance(b, Booked):
                                acked[b.booking_id] = b.unit
                    except Exception:  # Redis down: the client backs off
                        await asyncio.sleep(0.05)

            clients = [asyncio.create_task(client(k, "w1-", 60)) for k in range(4)]
            await asyncio.sleep(0.4)
            await asyncio.to_thread(redis.kill)
            selling.clear()  # sales close until the state is rebuilt
            await asyncio.gather(*clients)
            if loss == "lost-tail":
                _lose_aof_tail(redis, keep=0.6)
            await asyncio.to_thread(redis.restart)
            stop_writer.set()
            await asyncio.wait_for(writer, timeout=30)  # it rode out the restart
            assert len(acked) > 0
            # Reopen only after: the outbox that survived reaches PostgreSQL,
            # then Redis is rebuilt from PostgreSQL.
            await drain(eng, db)
            reports = await rebuild(eng, db, ["S1"])
            assert not reports[0].failed, reports
            selling.set()
            await asyncio.gather(*(client(k, "w2-", 30) for k in range(4)))
            await drain(eng, db)

            rows = await db.fetch("SELECT id, unit FROM bookings WHERE status = 'booked'")
            pg_units = [r["unit"] for r in rows]
            assert len(pg_units) == len(set(pg_units)) <= 300  # no unit twice in PostgreSQL
            audit = await eng.audit("S1")
            assert audit.ok, audit.breaches
            assert len(set(audit.booked_units.values())) == len(audit.booked_units)
            pg_ids = {r["id"] for r in rows}
            assert pg_ids == set(audit.booked_units)  # Redis and PostgreSQL agree
            # Acknowledged bookings missing from both were lost with the last
            # second of AOF: the documented everysec window, never more.
            assert {bid for bid in acked if bid in pg_ids}, "acknowledged bookings survived"
    finally:
        redis.cleanup()


async def test_trim_never_drops_an_entry_a_consumer_group_has_not_acknowledged(
        eng: Engine, db: asyncpg.Pool) -> None:
    """The outbox does not trim itself (no MAXLEN in the scripts): the writer
    trims below the oldest entry any group still needs. Entries pending in
    another group (a consumer that is behind) and undelivered ones stay."""
    await eng.load_session(make_spec("S1", caps=(50,)))
    ref = await eng.ref("S1")
    assert ref is not None
    stream = PartitionKeys(ref.partition).outbox
    await eng.client.xgroup_create(stream, "notifier", id="0", mkstream=True)
    await book_many(eng, "S1", 10)
    # The notifier reads five entries and acknowledges none of them.
    got = await eng.client.xreadgroup("notifier", "n1", {stream: ">"}, count=5)
    slow_first = got[0][1][0][0]
    w = OutboxWriter(eng, db, WriterConfig(block_ms=20, retain_ms=0))
    await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 30)
    assert await eng.client.xlen(stream) == 10
    assert await w.trim() == 0  # the notifier still needs its first entry
    assert (await eng.client.xrange(stream, count=1))[0][0] == slow_first
    entries = await eng.client.xrange(stream)
    await eng.client.xack(stream, "notifier", *[e[0] for e in entries[:5]])
    await eng.client.xreadgroup("notifier", "n1", {stream: ">"}, count=100)
    await eng.client.xack(stream, "notifier", *[e[0] for e in entries[5:]])
    assert await w.trim() == 9
    left = await eng.client.xrange(stream)
    assert [e[0] for e in left] == [entries[-1][0]]  # the last delivered entry stays
    await book_many(eng, "S1", 3, prefix="more")  # undelivered entries are never trimmed
    assert await w.trim() == 0
    assert await eng.client.xlen(stream) == 4
    w2 = await drain(eng, db)
    assert w2.written == 3
    assert await db.fetchval("SELECT count(*) FROM bookings") == 13
