"""Durability modes: the engine refuses a Redis that does not provide the
configured mode, and in "wait" mode acknowledges a write only once a replica
has it."""

from __future__ import annotations

import asyncio

import pytest

from engine import Engine, Held
from engine.scripts import NotDurable
from engine.testing.servers import RedisServer
from tests.enginekit import config, make_spec

pytestmark = pytest.mark.slow


async def test_aof_modes_are_checked_at_connect() -> None:
    plain = RedisServer(appendonly=False).start()
    always = RedisServer(appendonly=True, appendfsync="always").start()
    try:
        with pytest.raises(RuntimeError, match="appendfsync always"):
            async with Engine.connect(plain.url, config(durability="aof-always")):
                pass
        async with Engine.connect(always.url, config(durability="aof-always")) as eng:
            await eng.load_session(make_spec())
            assert isinstance(await eng.hold("S1", "0800", patient="p", account="a"), Held)
        with pytest.raises(RuntimeError, match="appendfsync everysec"):
            async with Engine.connect(always.url, config(durability="aof-everysec")):
                pass
    finally:
        for s in (plain, always):
            s.cleanup()


@pytest.mark.timeout(60)
async def test_wait_mode_needs_a_replica() -> None:
    """Durability "wait" (a single primary with a real replica): a write is
    acknowledged only once the replica has it. Without a replica the write
    runs but is not acknowledged (NotDurable: its retry, once durable, finds
    it done); with the replica every step is acknowledged and the replica
    has it; when the replica goes, writes stop being acknowledged again."""
    primary = RedisServer(appendonly=False).start()
    replica = None
    try:
        cfg = config(durability="wait", wait_replicas=1, wait_timeout_ms=50)
        async with Engine.connect(primary.url, cfg) as eng:
            with pytest.raises(NotDurable):
                await eng.load_session(make_spec(caps=(5,)))
        replica = RedisServer(appendonly=False,
                              extra={"replicaof": f"127.0.0.1 {primary.port}"}).start()
        cfg = config(durability="wait", wait_replicas=1, wait_timeout_ms=2000)
        async with Engine.connect(primary.url, cfg) as eng:
            from redis.asyncio import Redis

            rep = Redis.from_url(replica.url)
            for _ in range(200):  # the replica's first sync is done
                info = await rep.info("replication")
                if info.get("master_link_status") == "up" and \
                        not int(info.get("master_sync_in_progress", 1)):
                    break
                await asyncio.sleep(0.05)
            await rep.aclose()
            assert (await eng.client.info("replication"))["connected_slaves"] == 1
            # The load that was not acknowledged had run: loading again is a no-op.
            loaded = await eng.load_session(make_spec(caps=(5,)))
            assert not loaded.created
            h = await eng.hold("S1", "0800", patient="p1", account="a1", idempotency_key="k1")
            assert isinstance(h, Held) and not h.replay
            assert (await eng.confirm(h.hold_id, "pay")).ok
            # The replica has what was acknowledged.
            rec = await eng.client.hget(
                (await eng.ref("S1")).keys.part.records, h.hold_id)  # type: ignore[union-attr]
            rep = Redis.from_url(replica.url)
            try:
                assert await rep.hget(
                    (await eng.ref("S1")).keys.part.records, h.hold_id) == rec  # type: ignore[union-attr]
            finally:
                await rep.aclose()
            replica.stop()
            eng.runner.wait_timeout_ms = 50
            with pytest.raises(NotDurable):
                await eng.hold("S1", "0800", patient="p2", account="a2", idempotency_key="k2")
    finally:
        for s in (replica, primary):
            if s is not None:
                s.cleanup()
