"""The engine on a 3-master loopback Redis Cluster: every script's keys
share one hash slot, cross-partition rules work through the patient's own
partition, and a key of another slot is always refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from engine import Booked, Engine, Held, Reason, Refused, Waitlisted
from engine.keys import PartitionKeys
from tests.enginekit import config, make_spec

pytestmark = pytest.mark.cluster


async def test_engine_on_a_cluster(redis_cluster: Any) -> None:
    cfg = config(cluster=True, patient_rules=True, max_active_per_patient=3)
    async with Engine.connect(redis_cluster.url, cfg) as eng:
        parts = set()
        for i in range(8):
            loaded = await eng.load_session(
                make_spec(f"S{i}", dept=f"D{i}", caps=(25,), hold_ttl_ms=1000))
            parts.add(loaded.partition)
        assert len(parts) > 3  # spread over the cluster's masters

        results: list[Any] = []

        async def grab(i: int) -> None:
            for d in range(8):
                results.append(await eng.hold(f"S{d}", "0800", patient=f"p{i}", account=f"a{i}"))

        await asyncio.gather(*(grab(i) for i in range(40)))
        held = [r for r in results if isinstance(r, Held)]
        assert len(held) == 40 * 3  # the hospital-wide limit, across partitions
        reasons = {r.reason for r in results if isinstance(r, Refused)}
        assert reasons <= {Reason.LIMIT_REACHED, Reason.SOLD_OUT}, reasons
        for h in held[:30]:
            assert isinstance(await eng.confirm(h.hold_id, "pay"), Booked)
        eng.config.clock_offset_ms = 2_000
        assert await eng.sweep() == len(held) - 30
        for i in range(8):
            a = await eng.audit(f"S{i}")
            assert a.ok, a.breaches
        # The waitlist across the cluster.
        await eng.load_session(make_spec("W", dept="DW", caps=(1,)))
        b = await eng.hold("W", "0800", patient="w0", account="w0")
        assert isinstance(b, Held)
        assert isinstance(await eng.confirm(b.hold_id, "p"), Booked)


async def test_a_key_of_another_slot_is_refused(redis_cluster: Any) -> None:
    async with Engine.connect(redis_cluster.url, config(cluster=True)) as eng:
        await eng.load_session(make_spec("S1", dept="D1"))
        ref = await eng.ref("S1")
        assert ref is not None
        other = PartitionKeys((ref.partition + 1) % 64)
        keys = list(ref.bundle)
        keys[9] = other.outbox  # the outbox of another partition
        with pytest.raises((RedisError, RedisClusterException)):  # the client refuses
            await eng.runner.run("suspendSession", keys, ["doctor_stopped", 0])
        # ...and so does the server, asked directly on the node of the first key.
        cluster = eng.client
        assert isinstance(cluster, RedisCluster)
        node = cluster.get_node_from_key(keys[0])
        assert node is not None
        direct = Redis(host=node.host, port=node.port)
        try:
            script = eng.runner.scripts["suspendSession"]
            await direct.script_load(script.source)
            with pytest.raises(ResponseError, match=r"same slot|CROSSSLOT|MOVED"):
                await direct.evalsha(script.sha, len(keys), *keys, "doctor_stopped", 0)
        finally:
            await direct.aclose()
        a = await eng.availability("S1")
        assert a is not None and a.status == "open"


async def test_waitlist_on_a_cluster(redis_cluster: Any) -> None:
    async with Engine.connect(redis_cluster.url, config(cluster=True)) as eng:
        await eng.load_session(_waitlisted_spec())
        h = await eng.hold("WL", "0800", patient="a", account="a")
        assert isinstance(h, Held)
        assert isinstance(await eng.join_waitlist("WL", patient="b", account="b"), Waitlisted)
        assert (await eng.release(h.hold_id)).ok
        snap = await eng.snapshot("WL")
        assert snap is not None and len(snap["used"]) == 1
        assert (await eng.audit("WL")).ok


def _waitlisted_spec() -> Any:
    import msgspec

    s = make_spec("WL", dept="DWL", caps=(1,))
    return msgspec.structs.replace(s, waitlist_ttl_ms=60_000, waitlist_max=5)


async def test_every_worker_runs_on_a_cluster(redis_cluster: Any, db_pool: Any,
                                              fresh_pg_dsn: str) -> None:
    """The writer (per-partition reads), its guard and trim, the sweeper, the
    audit, rebuild and rebuild-bindings work on a 3-master cluster, the
    commands included (HAOYUAN_REDIS_CLUSTER=1 is their one setting)."""
    import json
    import os
    import sys

    from engine.audit import run_audit
    from engine.rebuild import rebuild
    from engine.schedule_import import import_sessions
    from engine.writer import OutboxWriter, WriterConfig
    from tests.enginekit import book_many

    cfg = config(cluster=True)
    async with Engine.connect(redis_cluster.url, cfg) as eng:
        specs = [make_spec(f"C{i}", dept=f"CD{i}", caps=(6,)) for i in range(6)]
        await import_sessions(eng, db_pool, specs)
        booked = []
        for s in specs:
            booked += await book_many(eng, s.session_id, 4, prefix=s.session_id)
        w = OutboxWriter(eng, db_pool, WriterConfig(block_ms=20, retain_ms=0))
        await asyncio.wait_for(w.run(asyncio.Event(), burst=True), 60)
        # (the cluster is the session's: older tests' entries are written too)
        assert w.written >= len(booked) and w.closed == []
        rows = await db_pool.fetch("SELECT id FROM bookings WHERE status = 'booked'")
        assert {r["id"] for r in rows} >= set(booked)
        assert await w.trim() >= 0
        report = await run_audit(eng, db_pool)
        assert report.ok and report.rebuild_needed is False, report.breaches
        reports = await rebuild(eng, db_pool)
        assert all(r.already == 4 and not r.failed for r in reports)
        assert (await run_audit(eng, db_pool)).ok

    # (The test cluster keeps no AOF: production workers must be told so.)
    env = {**os.environ, "HAOYUAN_REDIS_CLUSTER": "1", "HAOYUAN_REDIS_URL": redis_cluster.url,
           "HAOYUAN_PG_DSN": fresh_pg_dsn, "HAOYUAN_DURABILITY": "none"}
    for args in (["writer", "--burst"], ["sweeper", "--once"], ["audit", "--json"],
                 ["rebuild"], ["rebuild-bindings"]):
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 120)
        assert p.returncode == 0, (args, err.decode()[-2000:])
        if args[0] == "audit":
            doc = json.loads(out)
            assert doc["ok"] and doc["rebuild_needed"] is False


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_slot_migrating_under_load_loses_no_call(tmp_path: Any) -> None:
    """A partition's hash slot moves to another primary (IMPORTING /
    MIGRATING, its keys a few at a time) while 200 holds and confirms run on
    its sessions: the batches follow ASK to the importing node (after
    ASKING), wait out TRYAGAIN while the keys are split, and follow MOVED
    once the slot has moved. No call fails, every unit is held once, and the
    audit of each session is clean on its new node."""
    from engine import keys as K
    from engine.testing.servers import RedisClusterServer

    cluster = RedisClusterServer(masters=3)
    cluster.start()
    try:
        async with Engine.connect(cluster.url, config(cluster=True)) as eng:
            specs = [make_spec(f"M{i}", dept="DM", caps=(60,)) for i in range(4)]
            for s in specs:
                await eng.load_session(s)  # one department-day: one partition, one slot
            part = K.partition_of("DM", specs[0].date)
            tag = K.tag(part)
            src = cluster.primary_of(tag)
            dst = next(n for n in cluster.alive()
                       if cluster.role(n) == "master" and n is not src)
            slot = int(str(src.command("CLUSTER", "KEYSLOT", tag)))
            errors: list[BaseException] = []
            held: list[Held] = []

            async def client(k: int) -> None:
                for i in range(50):
                    try:
                        h = await eng.hold(f"M{i % 4}", "0800", patient=f"c{k}-{i}",
                                           account=f"a{k}-{i}")
                        if isinstance(h, Held):
                            held.append(h)
                            assert isinstance(await eng.confirm(h.hold_id, "pay"), Booked)
                    except Exception as exc:  # any call that fails is a finding
                        errors.append(exc)
                    await asyncio.sleep(0.005)

            clients = [asyncio.create_task(client(k)) for k in range(4)]
            await asyncio.sleep(0.1)
            moved = await asyncio.to_thread(cluster.migrate_slot, slot, dst, batch=3,
                                            pause_s=0.05)
            await asyncio.gather(*clients)
            assert moved > 10
            assert not errors, errors[:3]
            assert len(held) == 200 and len({(h.session_id, h.unit) for h in held}) == 200
            assert cluster.primary_of(tag) is dst
            for s in specs:
                a = await eng.audit(s.session_id)
                mine = sum(1 for h in held if h.session_id == s.session_id)
                assert a.ok and a.booked == mine and a.held == 0, a.breaches
    finally:
        cluster.cleanup()
