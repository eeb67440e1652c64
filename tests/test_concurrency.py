"""Real concurrency: several OS processes, many tasks each, one hot session.

2,000 hold attempts from 1,000 patients (each patient tries twice, from two
different processes) on 100 units: exactly 100 holds, every unit once, no
patient twice in the department-day, conservation holds. Then half the holds
expire, the units come back, and a second wave holds exactly those again.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections import Counter
from typing import Any

import pytest

from engine import Engine, Held, Refused
from tests.enginekit import config, make_spec

pytestmark = pytest.mark.slow

PROCS = 4
SLOTS = ("0800", "0830", "0900", "0930")


def _grab(url: str, attempts: list[tuple[str, str, str]], offset: int) -> list[tuple[Any, ...]]:
    async def main() -> list[tuple[Any, ...]]:
        async with Engine.connect(url, config(clock_offset_ms=offset)) as eng:
            sem = asyncio.Semaphore(200)

            async def one(patient: str, account: str, slot: str) -> tuple[Any, ...]:
                async with sem:
                    r = await eng.hold("HOT", slot, patient=patient, account=account)
                if isinstance(r, Held):
                    return ("held", r.hold_id, r.unit, patient)
                assert isinstance(r, Refused)
                return ("refused", r.reason.value, None, patient)

            return list(await asyncio.gather(*(one(*a) for a in attempts)))

    return asyncio.run(main())


def _run_wave(url: str, attempts: list[tuple[str, str, str]], offset: int) -> list[tuple[Any, ...]]:
    chunks: list[list[tuple[str, str, str]]] = [[] for _ in range(PROCS)]
    for i, a in enumerate(attempts):
        chunks[i % PROCS].append(a)
    ctx = mp.get_context("spawn")
    with ctx.Pool(PROCS) as pool:
        parts = pool.starmap(_grab, [(url, c, offset) for c in chunks])
    return [r for part in parts for r in part]


@pytest.mark.timeout(240)
async def test_two_thousand_attempts_on_one_hundred_units(fresh_redis: Any, redis_url: str) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        await eng.load_session(make_spec("HOT", caps=(25, 25, 25, 25), hold_ttl_ms=60_000))
        # Patient i tries slot A then slot B; attempt k goes to process k % PROCS,
        # so each patient's two attempts race from two processes.
        attempts = []
        for i in range(1000):
            attempts.append((f"pat{i}", f"acct{i}", SLOTS[i % 4]))
        for i in range(1000):
            attempts.append((f"pat{i}", f"acct{i}b", SLOTS[(i + 1) % 4]))
        results = await asyncio.to_thread(_run_wave, redis_url, attempts, 0)
        assert len(results) == 2000
        held = [r for r in results if r[0] == "held"]
        reasons = Counter(r[1] for r in results if r[0] == "refused")
        assert len(held) == 100, reasons
        assert set(reasons) <= {"sold-out", "duplicate"}
        units = [r[2] for r in held]
        assert sorted(units) == list(range(1, 101))
        patients = [r[3] for r in held]
        assert len(set(patients)) == 100
        audit = await eng.audit("HOT")
        assert audit.ok, audit.breaches
        assert (audit.held, audit.booked, audit.free) == (100, 0, 0)
        ref = await eng.ref("HOT")
        assert ref is not None
        assert await eng.client.hlen(ref.rule_key) == 100

        # Half are paid; the other half expire and come back.
        for r in held[:50]:
            assert (await eng.confirm(r[1], f"pay-{r[1]}")).ok
        offset = 61_000
        eng.config.clock_offset_ms = offset
        assert await eng.sweep() == 50
        audit = await eng.audit("HOT")
        assert audit.ok and (audit.held, audit.booked, audit.free) == (0, 50, 50)
        freed = sorted(r[2] for r in held[50:])

        second = [(f"new{i}", f"nacct{i}", SLOTS[i % 4]) for i in range(400)]
        second += [(f"new{i}", f"nacct{i}x", SLOTS[(i + 2) % 4]) for i in range(400)]
        results2 = await asyncio.to_thread(_run_wave, redis_url, second, offset)
        held2 = [r for r in results2 if r[0] == "held"]
        assert len(held2) == 50
        assert sorted(r[2] for r in held2) == freed
        assert len({r[3] for r in held2}) == 50
        audit = await eng.audit("HOT")
        assert audit.ok and (audit.held, audit.booked, audit.free) == (50, 50, 0)
