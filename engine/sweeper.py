"""The hold sweeper: reclaims expired holds, releases units whose
anti-scalper delay has passed and closes waitlists past the cut-off, in every
partition (``Engine.sweep``), every ``interval_s`` seconds. Hold scripts
reclaim a few on their way; this catches the rest, without keyspace
notifications."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.engine import Engine

__all__ = ["Sweeper"]

log = logging.getLogger("haoyuan.sweeper")


class Sweeper:
    def __init__(self, engine: Engine, *, interval_s: float = 1.0) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.expired = 0

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Sweep until ``stop`` is set (with ``burst``: once). A failed sweep
        is logged and the next one tries again."""
        while not stop.is_set():
            try:
                n = await self.engine.sweep()
                self.expired += n
                if n:
                    log.info("reclaimed %d expired holds", n)
            except Exception:
                log.exception("sweep failed")
            if burst:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
