"""Per-worker state of the release-morning hot path: answer cheaply, shed early.

- ``ServerClock``: Redis server time estimated locally (offset measured at
  startup and every 30 s from the fastest of a few ``TIME`` round trips), so
  "not open yet" can be answered without Redis, with the release instant and
  the server time.
- ``ReleaseTimes``: release instants learnt from Redis (a not-open refusal or
  an availability read), kept a few seconds so a re-imported schedule is seen.
- ``SoldOut``: (session, slot) pairs the engine just called sold out, for
  about a second; cleared early when an availability read shows a free unit
  or this worker gave a unit back.
- ``MicroCache``: read results cached for a few hundred milliseconds, and
  concurrent misses of one key share one load (coalescing).
- ``Admission``: a bounded count of engine calls in flight; above it, shed
  (429 with a jittered Retry-After) instead of queueing without bound.

Nothing about who may act is cached here: a hold reads its token's
revocation and its patient's binding from Redis (``Api.patient_access``), so
a logout, an unbind or a revoked binding holds on every worker at once.

None of this decides anything: a local answer only repeats what Redis said.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Admission", "MicroCache", "ReleaseTimes", "ServerClock", "SoldOut"]

K = TypeVar("K")
V = TypeVar("V")

_mono = time.monotonic


class ServerClock:
    """Redis server time, estimated from the local clock plus a measured offset."""

    def __init__(self) -> None:
        self.offset_ms = 0.0
        self.calibrated = False

    def now_ms(self) -> int:
        return int(time.time() * 1000 + self.offset_ms)

    async def calibrate(
        self, server_time_ms: Callable[[], Awaitable[int]], samples: int = 5
    ) -> None:
        best: tuple[float, float] | None = None
        for _ in range(samples):
            t0 = time.time() * 1000
            server = await server_time_ms()
            t1 = time.time() * 1000
            rtt = t1 - t0
            if best is None or rtt < best[0]:
                best = (rtt, server - (t0 + t1) / 2)
        if best is not None:
            self.offset_ms = best[1]
            self.calibrated = True


class ReleaseTimes:
    def __init__(self, ttl_ms: int) -> None:
        self.ttl_s = ttl_ms / 1000
        self._at: dict[str, tuple[int, float]] = {}

    def set(self, session_id: str, release_at_ms: int) -> None:
        if len(self._at) > 100_000:
            self._at.clear()
        self._at[session_id] = (release_at_ms, _mono() + self.ttl_s)

    def get(self, session_id: str) -> int | None:
        hit = self._at.get(session_id)
        if hit is None:
            return None
        if hit[1] < _mono():
            del self._at[session_id]
            return None
        return hit[0]

    def forget(self, session_id: str) -> None:
        self._at.pop(session_id, None)


class SoldOut:
    def __init__(self, ttl_ms: int) -> None:
        self.ttl_s = ttl_ms / 1000
        self._until: dict[tuple[str, str], float] = {}

    def hit(self, session_id: str, slot_id: str) -> bool:
        until = self._until.get((session_id, slot_id))
        if until is None:
            return False
        if until < _mono():
            del self._until[(session_id, slot_id)]
            return False
        return True

    def mark(self, session_id: str, slot_id: str) -> None:
        if len(self._until) > 100_000:
            self._until.clear()
        self._until[(session_id, slot_id)] = _mono() + self.ttl_s

    def clear(self, session_id: str, slot_id: str | None = None) -> None:
        if slot_id is not None:
            self._until.pop((session_id, slot_id), None)
            return
        for key in [k for k in self._until if k[0] == session_id]:
            del self._until[key]


class MicroCache(Generic[K, V]):
    """A tiny TTL cache whose concurrent misses share one load."""

    def __init__(self, ttl_ms: int, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_ms / 1000
        self.max_entries = max_entries
        self._data: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}
        self.hits = 0
        self.loads = 0

    def forget(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        hit = self._data.get(key)
        if hit is not None and hit[0] > _mono():
            self.hits += 1
            return hit[1]
        pending = self._loading.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        self.loads += 1
        try:
            value = await load()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._loading[key]
        fut.set_result(value)
        if len(self._data) >= self.max_entries:
            self._data.clear()
        self._data[key] = (_mono() + self.ttl_s, value)
        return value


class Admission:
    """Admission control for one worker. Sheds (429 with a jittered
    Retry-After) when more than ``limit`` engine calls are in flight, or when
    the worker's event loop runs late by more than ``max_lag_ms``: under a
    CPU-bound spike the queue builds in front of the handlers, where an
    in-flight count cannot see it, but every queued request delays the loop.
    Shedding at the door keeps the answered requests fast instead of letting
    every latency grow without bound."""

    def __init__(self, limit: int, max_lag_ms: float = 0.0, tick_s: float = 0.025) -> None:
        self.limit = limit
        self.max_lag_ms = max_lag_ms
        self.tick_s = tick_s
        self.inflight = 0
        self.shed = 0
        self.shed_lag = 0
        self.lag_ms = 0.0

    def lagging(self) -> bool:
        """The event loop runs later than ``max_lag_ms``: new work waits in line."""
        return self.max_lag_ms > 0 and self.lag_ms > self.max_lag_ms

    def enter(self, *, priority: bool = False) -> bool:
        """Count one engine call in, or refuse it (shed). ``priority`` (a
        waiting-room ticket whose turn came) skips the loop-lag shedding; the
        in-flight bound holds for everyone."""
        if self.inflight >= self.limit:
            self.shed += 1
            return False
        if not priority and self.lagging():
            self.shed += 1
            self.shed_lag += 1
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1

    async def watch_loop(self, stop: asyncio.Event) -> None:
        """Measure how late the loop wakes a timer (a moving average that
        falls as soon as the loop catches up)."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(self.tick_s)
            late = max(0.0, (loop.time() - t - self.tick_s) * 1000)
            self.lag_ms = late if late > self.lag_ms else 0.7 * self.lag_ms + 0.3 * late

