"""Admission control sheds when the worker's event loop runs late (the queue
in front of the handlers), not only when engine calls pile up."""

from __future__ import annotations

import asyncio
import time

from api.hotpath import Admission


async def test_sheds_while_the_loop_runs_late_and_recovers() -> None:
    a = Admission(limit=10, max_lag_ms=50, tick_s=0.01)
    stop = asyncio.Event()
    watcher = asyncio.create_task(a.watch_loop(stop))
    try:
        await asyncio.sleep(0.05)
        assert a.enter()
        a.leave()
        time.sleep(0.3)  # a CPU-bound burst holds the loop, as a spike does  # noqa: ASYNC251
        await asyncio.sleep(0.02)
        assert a.lag_ms > 50
        assert not a.enter() and a.shed_lag == 1
        for _ in range(100):  # the loop catches up: admission reopens
            await asyncio.sleep(0.01)
            if a.lag_ms < 50:
                break
        assert a.enter()
        a.leave()
    finally:
        stop.set()
        await watcher


def test_sheds_above_the_in_flight_limit() -> None:
    a = Admission(limit=2)
    assert a.enter() and a.enter() and not a.enter()
    a.leave()
    assert a.enter()
    assert a.shed == 1 and a.shed_lag == 0
