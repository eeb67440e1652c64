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
import pytest

from engine import Booked, Engine, Held
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
