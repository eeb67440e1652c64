"""Demand as the API sees it (for ``engine.stats``): which accounts pressed
"book" for a session after its release and competed for a unit (``tried``),
which were told "sold out" (``refused``, cached answers included), which
joined its waitlist (``joined``).

Kept in memory per worker and added to Redis sets once a second
(``engine.stats.record_demand``, one pipeline): no PostgreSQL write and no
Redis call per request. A worker that dies loses at most its last second;
at most ``max_entries`` are kept between flushes (beyond, they are counted
as ``dropped``, never an error for the patient).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from engine.stats import record_demand

if TYPE_CHECKING:
    from engine import Engine

__all__ = ["DemandLog"]

log = logging.getLogger("haoyuan.api.demand")


class DemandLog:
    def __init__(self, engine: Engine, *, interval_s: float = 1.0,
                 max_entries: int = 500_000) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._n = 0
        self.sent = 0
        self.dropped = 0

    def note(self, session_id: str, kind: str, account: str) -> None:
        if self._n >= self.max_entries:
            self.dropped += 1
            return
        bucket = self._seen.setdefault((session_id, kind), set())
        if account not in bucket:
            bucket.add(account)
            self._n += 1

    async def flush(self) -> int:
        seen, self._seen, self._n = self._seen, {}, 0
        if not seen:
            return 0
        try:
            n = await record_demand(self.engine, seen)
        except Exception as exc:  # Redis away: put them back for the next flush
            log.warning("demand_flush_failed: %s", type(exc).__name__)
            for k, v in seen.items():
                for a in v:
                    self.note(k[0], k[1], a)
            return 0
        self.sent += n
        return n

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
            await self.flush()
