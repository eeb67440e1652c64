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
            for _ in range(100):
                info = await eng.client.info("replication")
                if info.get("connected_slaves", 0) >= 1:
                    break
                await asyncio.sleep(0.1)
            # The load that was not acknowledged had run: loading again is a no-op.
            loaded = await eng.load_session(make_spec(caps=(5,)))
            assert not loaded.created
            h = await eng.hold("S1", "0800", patient="p1", account="a1", idempotency_key="k1")
            assert isinstance(h, Held)
            assert (await eng.confirm(h.hold_id, "pay")).ok
            replica.stop()
            eng.runner.wait_timeout_ms = 50
            h2 = await eng.hold("S1", "0800", patient="p2", account="a2", idempotency_key="k2")
            raise AssertionError(f"replica gone, yet acknowledged: {h2}")
    except NotDurable:
        pass
    finally:
        for s in (replica, primary):
            if s is not None:
                s.cleanup()
    # What was not acknowledged did run, and a retry replays it once durable.
