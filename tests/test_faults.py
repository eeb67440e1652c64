"""Faults between the engine and Redis, on real processes: a reply lost after
the script ran, scripts flushed under load, Redis stopped (SIGSTOP) for a
while. One effect per request, never a unit twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest

from engine import Booked, Engine, Held
from engine.keys import PartitionKeys
from engine.testing.servers import RedisServer
from tests.enginekit import config, make_spec
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture
async def proxied(fresh_redis: Any, redis_url: str) -> AsyncIterator[tuple[Engine, FaultProxy]]:
    target = urlsplit(redis_url)
    assert target.hostname is not None and target.port is not None
    async with FaultProxy(target.hostname, target.port) as proxy:
        async with Engine.connect(proxy.redis_url(), config()) as eng:
            yield eng, proxy


async def outbox_len(eng: Engine, sid: str) -> int:
    ref = await eng.ref(sid)
    assert ref is not None
    return int(await eng.client.xlen(PartitionKeys(ref.partition).outbox))


async def test_lost_reply_after_the_script_ran_has_one_effect(
    proxied: tuple[Engine, FaultProxy],
) -> None:
    eng, proxy = proxied
    await eng.load_session(make_spec(caps=(5,)))
    for key in ("client-key", None):  # with the client's key, and with the engine's own
        patient = f"p-{key}"
        proxy.drop_next_reply()
        h = await eng.hold("S1", "0800", patient=patient, account="a", idempotency_key=key)
        assert proxy.replies_dropped >= 1
        assert isinstance(h, Held)
        proxy.drop_next_reply()
        b = await eng.confirm(h.hold_id, f"pay-{key}")
        assert isinstance(b, Booked) and b.unit == h.unit
    audit = await eng.audit("S1")
    assert audit.ok and audit.booked == 2 and audit.held == 0 and audit.free == 3
    assert await outbox_len(eng, "S1") == 2  # one booked event each, not two


async def test_script_flush_under_load_loses_nothing(fresh_redis: Any, redis_url: str) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        await eng.load_session(make_spec(caps=(300,)))

        async def grab(i: int) -> Any:
            await asyncio.sleep(i * 0.0005)
            return await eng.hold("S1", "0800", patient=f"p{i}", account=f"a{i}")

        tasks = [asyncio.create_task(grab(i)) for i in range(400)]
        for _ in range(5):
            await asyncio.sleep(0.02)
            await eng.client.script_flush()
        results = await asyncio.gather(*tasks)
        held = [r for r in results if isinstance(r, Held)]
        assert len(held) == 300 and len({h.unit for h in held}) == 300
        assert all(not r.ok and r.reason.value == "sold-out" for r in results
                   if not isinstance(r, Held))
        assert (await eng.audit("S1")).ok


@pytest.mark.timeout(120)
async def test_redis_stopped_then_resumed_no_double_effect() -> None:
    redis = RedisServer(appendonly=True, appendfsync="always").start()
    try:
        async with Engine.connect(redis.url, config(socket_timeout_s=0.5)) as eng:
            await eng.load_session(make_spec(caps=(200,)))
            outcomes: list[Any] = []

            async def client(k: int) -> None:
                for i in range(30):
                    try:
                        outcomes.append(await eng.hold("S1", "0800", patient=f"c{k}-{i}",
                                                       account=f"a{k}",
                                                       idempotency_key=f"k{k}-{i}"))
                    except Exception as exc:  # timed out: an unknown outcome
                        outcomes.append(exc)
                    await asyncio.sleep(0.01)

            clients = [asyncio.create_task(client(k)) for k in range(5)]
            await asyncio.sleep(0.1)
            redis.sigstop()
            # Longer than the engine's own retries ride out (4 tries of a batch, each
            # reconnecting with 0.5 s timeouts: about 7.5 s).
            await asyncio.sleep(9.0)
            redis.sigcont()
            await asyncio.gather(*clients)
            unknown = [o for o in outcomes if isinstance(o, Exception)]
            assert unknown, "the stall produced no timeout: the test proved nothing"
            # Retrying every request with its key settles each unknown outcome once.
            again = []
            for k in range(5):
                for i in range(30):
                    again.append(await eng.hold("S1", "0800", patient=f"c{k}-{i}",
                                                account=f"a{k}", idempotency_key=f"k{k}-{i}"))
            assert all(isinstance(r, Held) for r in again)
            assert len({r.unit for r in again}) == 150
            audit = await eng.audit("S1")
            assert audit.ok and audit.held == 150 and audit.free == 50
            snap = await eng.snapshot("S1")
            assert snap is not None
            pats = [msgspec.json.decode(raw)["pat"] for _, raw, _ in snap["used"]]
            assert len(pats) == len(set(pats)) == 150
    finally:
        redis.cleanup()
