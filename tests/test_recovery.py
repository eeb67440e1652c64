"""Audit and rebuild: Redis data wiped, rebuilt from PostgreSQL, audit clean;
the audit command's table, JSON and exit code."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import asyncpg
import msgspec
import pytest

from engine import Booked, Engine, Held, Reason, Refused
from engine.audit import run_audit
from engine.pii import Crypto
from engine.rebuild import rebuild, rebuild_bindings
from engine.store import queries as q
from engine.store.bindings import Revocation, record_revocation
from engine.store.queries import StoredSession, upsert_schedule
from engine.writer import OutboxWriter, WriterConfig
from tests.apikit import national_id
from tests.enginekit import config, make_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def db(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    return db_pool


async def setup_bookings(eng: Engine, db: asyncpg.Pool) -> list[str]:
    specs = [make_spec("S1", caps=(5, 5)), make_spec("S2", doctor="DR2", caps=(4,))]
    async with db.acquire() as conn:
        await upsert_schedule(conn, [StoredSession.from_spec(s) for s in specs])
    for s in specs:
        await eng.load_session(s)
    ids = []
    for i, (sid, slot) in enumerate([("S1", "0800"), ("S1", "0830"), ("S1", "0830"),
                                     ("S2", "0800")]):
        h = await eng.hold(sid, slot, patient=f"p{i}", account=f"a{i}")
        assert isinstance(h, Held)
        b = await eng.confirm(h.hold_id, "pay")
        assert isinstance(b, Booked)
        ids.append(b.booking_id)
    await eng.cancel(ids[1])
    w = OutboxWriter(eng, db, WriterConfig(block_ms=20))
    await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 30)
    return ids


async def test_rebuild_after_redis_wipe(fresh_redis: Any, redis_url: str,
                                        db: asyncpg.Pool) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        ids = await setup_bookings(eng, db)
        before = {sid: await eng.audit(sid) for sid in ("S1", "S2")}
        report = await run_audit(eng, db)
        assert report.ok, report.breaches
        await eng.client.flushall()
    async with Engine.connect(redis_url, config()) as eng:  # a fresh process: no caches
        reports = await rebuild(eng, db)
        assert sum(r.restored for r in reports) == 3 and not any(r.failed for r in reports)
        for sid in ("S1", "S2"):
            a = await eng.audit(sid)
            assert a.ok and a.booked == before[sid].booked
            assert a.booked_units == before[sid].booked_units
        assert (await run_audit(eng, db)).ok
        # No unit is reissued: the patients' rules hold and new holds take other units.
        h = await eng.hold("S1", "0800", patient="p0", account="a0")
        assert not h.ok
        h = await eng.hold("S1", "0800", patient="new", account="n")
        assert isinstance(h, Held) and h.unit not in before["S1"].booked_units.values()
        assert h.hold_id not in ids
        # Rebuild twice is a no-op.
        again = await rebuild(eng, db)
        assert sum(r.restored for r in again) == 0


async def test_audit_finds_redis_postgres_disagreement(fresh_redis: Any, redis_url: str,
                                                       db: asyncpg.Pool) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        ids = await setup_bookings(eng, db)
        await db.execute("UPDATE bookings SET status='cancelled' WHERE id=$1", ids[0])
        report = await run_audit(eng, db)
        assert not report.ok
        assert any(ids[0] in b for b in report.breaches)


async def test_audit_finds_one_booking_on_two_units(fresh_redis: Any, redis_url: str,
                                                    db: asyncpg.Pool) -> None:
    """The same booking id on another queue number in Redis than in
    PostgreSQL (what a lost confirmation confirmed again would leave) is a
    breach, though both have the id booked."""
    async with Engine.connect(redis_url, config()) as eng:
        ids = await setup_bookings(eng, db)
        assert (await run_audit(eng, db)).ok
        await db.execute("UPDATE bookings SET unit = unit + 10 WHERE id=$1", ids[0])
        report = await run_audit(eng, db)
        assert not report.ok
        assert any(ids[0] in b and "on unit" in b for b in report.breaches), report.breaches


async def test_audit_command_json_and_exit_code(fresh_redis: Any, redis_url: str,
                                               db: asyncpg.Pool, fresh_pg_dsn: str) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        ids = await setup_bookings(eng, db)
    cmd = [sys.executable, "-m", "engine.cli", "audit", "--redis-url", redis_url,
           "--pg-dsn", fresh_pg_dsn]
    p = await asyncio.create_subprocess_exec(*cmd, "--json", cwd=ROOT,
                                             stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    assert p.returncode == 0
    doc = json.loads(out)
    assert doc["ok"] is True and doc["breaches"] == [] and len(doc["sessions"]) == 2
    p = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    assert p.returncode == 0 and b"audit: OK" in out
    await db.execute("UPDATE bookings SET status='cancelled' WHERE id=$1", ids[0])
    p = await asyncio.create_subprocess_exec(*cmd, "--json", cwd=ROOT,
                                             stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    assert p.returncode == 1 and json.loads(out)["ok"] is False
    assert await db.fetchval("SELECT count(*) FROM audit_runs") == 3


async def test_rebuild_bindings_refills_the_mirror(fresh_redis: Any, redis_url: str,
                                                   db: asyncpg.Pool, fresh_pg_dsn: str) -> None:
    """Redis lost the binding mirror: ``haoyuan rebuild-bindings`` refills it
    from PostgreSQL's verified bindings, leaves what the mirror has alone,
    drops the ref of a binding that is not verified (e.g. bound before
    verification existed), and puts back live token revocations."""
    crypto = Crypto.generate_dev()
    views: list[tuple[str, q.PatientView]] = []
    async with db.acquire() as conn:
        for i in range(5):
            acct = await q.create_account(conn, crypto.openid_hash(f"rb{i}"))
            views.append((acct, await q.bind_patient(conn, crypto, acct, "测试", "13800000000",
                                                     national_id(700 + i), verification="data")))
        old_acct = await q.create_account(conn, crypto.openid_hash("rb-old"))
        old = await q.bind_patient(conn, crypto, old_acct, "测试", "13800000000",
                                   national_id(799))  # unverified
    gone_acct, gone = views.pop()
    assert await q.unbind_patient(db, gone_acct, gone.patient_id)
    until = int(time.time()) + 600
    await record_revocation(db, Revocation(views[1][0], "tok1", until), "account")
    await record_revocation(db, Revocation(views[2][0], "tok2", until - 1200), "account")  # expired
    async with Engine.connect(redis_url, config()) as eng:
        await eng.mirror_binding(views[0][0], views[0][1].patient_id, None)  # a tombstone
        await eng.mirror_binding(old_acct, old.patient_id, old.ref)  # a stale ref
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "rebuild-bindings", "--redis-url", redis_url,
            "--pg-dsn", fresh_pg_dsn, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        out, _ = await p.communicate()
        assert p.returncode == 0 and json.loads(out) == {"written": 4}  # 3 refs, 1 dropped
        assert await eng.binding(views[0][0], views[0][1].patient_id) == ""  # left alone
        for acct, v in views[1:]:
            assert await eng.binding(acct, v.patient_id) == v.ref != ""
        assert await eng.binding(gone_acct, gone.patient_id) is None
        assert await eng.binding(old_acct, old.patient_id) is None  # holds ask the store
        assert await eng.access(views[1][0], "", "tok1", until) == (True, None)
        assert await eng.access(views[2][0], "", "tok2", until) == (False, None)
        assert await rebuild_bindings(eng, db) == 0  # idempotent


async def test_rebuild_never_reissues_the_id_of_a_cancelled_booking(
        fresh_redis: Any, redis_url: str, db: asyncpg.Pool) -> None:
    """Redis lost its newest writes (the id sequence rolled back): the newest
    booking, cancelled in PostgreSQL, is not restored, and its id must not be
    handed out again after the rebuild."""
    async with Engine.connect(redis_url, config()) as eng:
        spec = make_spec("S1", caps=(5,))
        async with db.acquire() as conn:
            await upsert_schedule(conn, [StoredSession.from_spec(spec)])
        await eng.load_session(spec)
        ids = []
        for i in range(3):
            h = await eng.hold("S1", "0800", patient=f"p{i}", account=f"a{i}")
            assert isinstance(h, Held)
            b = await eng.confirm(h.hold_id, "pay")
            assert isinstance(b, Booked)
            ids.append(b.booking_id)
        await eng.cancel(ids[-1])
        w = OutboxWriter(eng, db, WriterConfig(block_ms=20))
        await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 30)
        ref = await eng.ref("S1")
        assert ref is not None
        await eng.client.flushall()  # lost everything ...
        await eng.client.set(ref.keys.part.seq, ids[0].rsplit(".", 1)[1])  # ... but an old seq
        reports = await rebuild(eng, db, ["S1"])
        assert not reports[0].failed and reports[0].restored == 2
        h = await eng.hold("S1", "0800", patient="new", account="an")
        assert isinstance(h, Held)
        assert int(h.hold_id.rsplit(".", 1)[1]) > max(int(i.rsplit(".", 1)[1]) for i in ids)


# -- issue: recovery never undoes a newer decision, and sales stay closed ------------


async def _dump(eng: Engine) -> dict[bytes, Any]:
    """Every key's value, by type (a stream: its entries and groups)."""
    out: dict[bytes, Any] = {}
    for k in sorted(await eng.client.keys("*")):
        t = (await eng.client.type(k)).decode()
        c = eng.client
        out[k] = (t, await (c.hgetall(k) if t == "hash" else c.zrange(k, 0, -1, withscores=True)
                            if t == "zset" else c.smembers(k) if t == "set" else
                            c.xrange(k) if t == "stream" else c.get(k)))
        if t == "stream":
            groups = await c.xinfo_groups(k)
            out[k] += (sorted((g["name"], g["last-delivered-id"], g["pending"]) for g in groups),)
    return out


async def test_rebuild_on_a_healthy_system_changes_nothing(
        fresh_redis: Any, redis_url: str, db: asyncpg.Pool) -> None:
    """Everything a session was loaded with (pools, waitlist, windows), its
    bookings, holds, cancellations, waitlist and a suspension: a rebuild of
    a healthy system leaves every Redis key byte for byte as it was, twice."""
    from engine.model import SlotSpec
    from engine.schedule_import import import_sessions

    base = make_spec("S1", caps=(4, 3))
    spec = msgspec.structs.replace(
        base, waitlist_ttl_ms=60_000, waitlist_max=10, rerelease_ms=0, night_from_min=1,
        night_to_min=2, kind="expert",
        slots=[msgspec.structs.replace(base.slots[0], pools={"phone": 1, "window": 1}),
               base.slots[1]])
    other = make_spec("S2", doctor="DR2", caps=(2,))
    gone = msgspec.structs.replace(make_spec("S3", doctor="DR3", caps=(2,)),
                                   slots=[SlotSpec(slot_id="0900", start="09:00", end="09:30",
                                                   capacity=2)])
    async with Engine.connect(redis_url, config()) as eng:
        report = await import_sessions(eng, db, [spec, other, gone])
        assert report.recovering == []
        ids = []
        for i in range(7):
            h = await eng.hold("S1", "0800" if i < 2 else "0830", patient=f"p{i}",
                               account=f"a{i}")
            if isinstance(h, Held) and i < 4:
                b = await eng.confirm(h.hold_id, f"pay{i}")
                assert isinstance(b, Booked)
                ids.append(b.booking_id)
        await eng.cancel(ids[0])
        w = await eng.join_waitlist("S2", patient="w1", account="aw")
        assert not w.ok  # units free: no waitlist
        await eng.suspend("S3", "doctor_stopped")
        await q.set_session_status(db, "S3", "suspended")
        writer = OutboxWriter(eng, db, WriterConfig(block_ms=20))
        await asyncio.wait_for(writer.run(asyncio.Event(), burst=True), 30)
        before = await _dump(eng)
        pg_before = await db.fetch("SELECT * FROM bookings ORDER BY id")
        audit = await run_audit(eng, db)
        assert audit.ok and audit.rebuild_needed is False, audit.breaches
        for _ in range(2):
            reports = await rebuild(eng, db)
            assert {r.session_id for r in reports} == {"S1", "S2", "S3"}
            assert all(r.restored == 0 and not r.failed and not r.kept for r in reports)
            after = await _dump(eng)
            diff = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                    if before.get(k) != after.get(k)}
            if diff and any(isinstance(v[0], tuple) and v[0][0] == "hash" for v in diff.values()):
                diff = {k: {f: (b[1].get(f), a[1].get(f)) for f in set(b[1]) | set(a[1])
                            if b[1].get(f) != a[1].get(f)}
                        for k, (b, a) in diff.items() if b and a and b[0] == "hash"}
            assert not diff
        assert await db.fetch("SELECT * FROM bookings ORDER BY id") == pg_before


async def test_a_wiped_redis_sells_nothing_until_the_rebuild_and_then_as_before(
        fresh_redis: Any, redis_url: str, db: asyncpg.Pool) -> None:
    """Redis lost everything: the partitions PostgreSQL knows answer
    `recovering` (audit: rebuild needed), an import does not reopen them, and
    the rebuilt session answers exactly like the original (pools, waitlist)."""
    from engine.schedule_import import import_sessions

    base = make_spec("S1", caps=(3,))
    spec = msgspec.structs.replace(
        base, waitlist_ttl_ms=60_000, waitlist_max=5,
        slots=[msgspec.structs.replace(base.slots[0], pools={"phone": 1})])
    async with Engine.connect(redis_url, config()) as eng:
        await import_sessions(eng, db, [spec])
        h = await eng.hold("S1", "0800", patient="p1", account="a1")
        assert isinstance(h, Held) and isinstance(await eng.confirm(h.hold_id, "pay"), Booked)
        writer = OutboxWriter(eng, db, WriterConfig(block_ms=20))
        await asyncio.wait_for(writer.run(asyncio.Event(), burst=True), 30)
        avail_app = await eng.availability("S1")
        avail_phone = await eng.availability("S1", "phone")
        await eng.client.flushall()
    async with Engine.connect(redis_url, config()) as eng:  # a fresh process
        audit = await run_audit(eng, db)
        assert not audit.ok and audit.rebuild_needed
        assert [c.state for c in audit.recovery] == ["lost"]
        report = await import_sessions(eng, db, [spec])  # the scheduler's re-import
        assert report.recovering == ["S1"]
        r = await eng.hold("S1", "0800", patient="p2", account="a2")
        assert isinstance(r, Refused) and r.reason is Reason.RECOVERING
        reports = await rebuild(eng, db)
        assert [(x.session_id, x.restored) for x in reports] == [("S1", 1)]
        assert await eng.availability("S1") is not None
        got_app, got_phone = await eng.availability("S1"), await eng.availability("S1", "phone")
        assert got_app is not None and avail_app is not None and avail_phone is not None
        assert got_app.slots == avail_app.slots and got_phone == avail_phone
        assert (await run_audit(eng, db)).ok
        # The waitlist works as before: sold out to the app channel, then a join.
        h2 = await eng.hold("S1", "0800", patient="p2", account="a2")
        assert isinstance(h2, Held)
        assert (await eng.join_waitlist("S1", patient="p3", account="a3")).ok


async def test_the_writer_closes_a_partition_whose_redis_lost_its_newest_writes(
        db: asyncpg.Pool) -> None:
    """A lost tail (Redis restarted on an older copy of its AOF, as after a
    power cut with everysec or a failover to a lagging replica): the marker
    survived, but the outbox lost entries PostgreSQL committed. The writer
    closes the partition before it reads on, the audit says a rebuild is
    needed, and after `rebuild` every booking PostgreSQL has is back."""
    import shutil

    from engine.schedule_import import import_sessions
    from engine.testing.servers import RedisServer

    spec = make_spec("S1", caps=(20,))
    redis = RedisServer(appendonly=True, appendfsync="always")
    redis.start()
    try:
        async with Engine.connect(redis.url, config()) as eng:
            await import_sessions(eng, db, [spec])
            acked = []
            for i in range(5):
                h = await eng.hold("S1", "0800", patient=f"p{i}", account=f"a{i}")
                assert isinstance(h, Held)
                b = await eng.confirm(h.hold_id, "pay")
                assert isinstance(b, Booked)
                acked.append(b.booking_id)
            writer = OutboxWriter(eng, db, WriterConfig(block_ms=20))
            await asyncio.wait_for(writer.run(asyncio.Event(), burst=True), 30)
            old = redis.dir / "aof-copy"
            shutil.copytree(redis.dir / "appendonlydir", old)
            for i in range(5, 9):
                h = await eng.hold("S1", "0800", patient=f"p{i}", account=f"a{i}")
                assert isinstance(h, Held)
                b = await eng.confirm(h.hold_id, "pay")
                assert isinstance(b, Booked)
                acked.append(b.booking_id)
            await asyncio.wait_for(writer.run(asyncio.Event(), burst=True), 30)
            await asyncio.to_thread(redis.kill)
            shutil.rmtree(redis.dir / "appendonlydir")
            shutil.copytree(old, redis.dir / "appendonlydir")
            await asyncio.to_thread(redis.restart)
            ref = await eng.ref("S1")
            assert ref is not None
            assert await eng.partition_epoch(ref.partition) is not None  # the marker survived
            # ... and the old state would sell units PostgreSQL has booked:
            before = await eng.audit("S1")
            assert before.booked == 5
            w = OutboxWriter(eng, db, WriterConfig(block_ms=20))
            await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 30)
            assert w.closed == [ref.partition]
            r = await eng.hold("S1", "0800", patient="late", account="al")
            assert isinstance(r, Refused) and r.reason is Reason.RECOVERING
            audit = await run_audit(eng, db)
            assert audit.rebuild_needed and not audit.ok
            reports = await rebuild(eng, db)
            assert reports[0].restored == 4 and not reports[0].failed
            after = await eng.audit("S1")
            assert after.ok and set(after.booked_units) == set(acked)
            assert (await run_audit(eng, db)).ok
            h = await eng.hold("S1", "0800", patient="late", account="al")
            assert isinstance(h, Held) and h.unit not in after.booked_units.values()
    finally:
        redis.cleanup()


async def test_a_closed_partition_takes_only_the_arbiters_cancel(
        fresh_redis: Any, redis_url: str) -> None:
    """While a partition is closed nothing changes, except the cancel of a
    booking PostgreSQL's arbiter found on a unit it already had booked (force,
    reason "conflict"): rebuild needs that unit back for the winner."""
    async with Engine.connect(redis_url, config()) as eng:
        await eng.load_session(make_spec("S1", caps=(3,)))
        booked = []
        for i in range(2):
            h = await eng.hold("S1", "0800", patient=f"p{i}", account=f"a{i}")
            assert isinstance(h, Held)
            b = await eng.confirm(h.hold_id, f"pay{i}")
            assert isinstance(b, Booked)
            booked.append(b.booking_id)
        ref = await eng.ref("S1")
        assert ref is not None
        await eng.close_partition(ref.partition)
        for reason, force in (("patient", False), ("admin", True), ("conflict", False)):
            r = await eng.cancel(booked[0], reason=reason, force=force)
            assert isinstance(r, Refused) and r.reason is Reason.RECOVERING, (reason, r)
        assert (await eng.cancel(booked[0], reason="conflict", force=True)).ok
        rec = await eng.record(booked[0])
        assert rec is not None and rec.state == "c"
        rec = await eng.record(booked[1])
        assert rec is not None and rec.state == "b"
