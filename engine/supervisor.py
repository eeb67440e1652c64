"""``haoyuan serve``: the whole service on one host, kept up.

The supervisor starts each part as its own process, by its command line
(``haoyuan api``, ``haoyuan writer``, ``haoyuan forwarder``, ``haoyuan
sweeper``, optionally ``haoyuan scheduler``), all with the same environment
(``HAOYUAN_*``: the one configuration, node or cluster), and then:

- restarts a child that exits or is killed, after a backoff that grows from
  0.5 s to 30 s while it keeps failing (and resets once it stayed up a minute);
- on SIGTERM or SIGINT, sends SIGTERM to every child and waits for them: the
  API workers finish their in-flight requests (granian), the writer finishes
  its batch and acknowledges what it committed; after ``grace_s`` the rest is
  killed;
- writes its children's state (pid, restarts) as JSON to ``status_file``
  whenever it changes, for ops scripts and tests.

It imports nothing of the API: it runs commands (so it sits in the core).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "Supervisor", "children_for"]

log = logging.getLogger("haoyuan.serve")


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = 0.5
    exits: list[int] = field(default_factory=list)


def children_for(*, host: str, port: int, workers: int, writers: int = 1,
                 forwarder: bool = True, sweeper: bool = True,
                 scheduler: bool = False) -> list[Child]:
    """The processes of one host: the API (its own workers) and the
    background workers, each a ``haoyuan`` command."""
    me = [sys.executable, "-m", "engine.cli"]
    out = [Child("api", [*me, "api", "--host", host, "--port", str(port),
                         "--workers", str(workers)])]
    out += [Child(f"writer-{i}", [*me, "writer"]) for i in range(writers)]
    if forwarder:
        out.append(Child("forwarder", [*me, "forwarder"]))
    if sweeper:
        out.append(Child("sweeper", [*me, "sweeper"]))
    if scheduler:
        out.append(Child("scheduler", [*me, "scheduler"]))
    return out


class Supervisor:
    def __init__(self, children: Sequence[Child], *, grace_s: float = 30.0,
                 status_file: str | None = None, max_backoff_s: float = 30.0) -> None:
        self.children = list(children)
        self.grace_s = grace_s
        self.status_file = Path(status_file) if status_file else None
        self.max_backoff_s = max_backoff_s
        self.stopping = False

    async def _start(self, c: Child) -> None:
        c.proc = await asyncio.create_subprocess_exec(
            *c.argv, stdin=asyncio.subprocess.DEVNULL, env=dict(os.environ),
            start_new_session=False)
        c.started_at = time.monotonic()
        log.info("started %s (pid %d)", c.name, c.proc.pid)
        self._write_status()

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        doc = {"children": {c.name: {"pid": c.proc.pid if c.proc else None,
                                     "restarts": c.restarts, "exits": c.exits[-5:]}
                            for c in self.children},
               "stopping": self.stopping}
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.status_file)

    async def _watch(self, c: Child, stop: asyncio.Event) -> None:
        while not stop.is_set():
            assert c.proc is not None
            rc = await c.proc.wait()
            c.exits.append(rc)
            if stop.is_set() or self.stopping:
                return
            up = time.monotonic() - c.started_at
            if up > 60:
                c.backoff_s = 0.5
            log.error("%s exited with %d after %.1f s; restarting in %.1f s",
                      c.name, rc, up, c.backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), c.backoff_s)
            if stop.is_set():
                return
            c.backoff_s = min(self.max_backoff_s, c.backoff_s * 2)
            c.restarts += 1
            await self._start(c)

    async def run(self, stop: asyncio.Event) -> int:
        """Start everything, keep it up until ``stop``, then stop everything."""
        for c in self.children:
            await self._start(c)
        watchers = [asyncio.create_task(self._watch(c, stop)) for c in self.children]
        await stop.wait()
        self.stopping = True
        self._write_status()
        for c in self.children:
            if c.proc is not None and c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        clean = True
        for c in self.children:
            if c.proc is None:
                continue
            try:
                await asyncio.wait_for(c.proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                clean = False
                log.error("%s did not stop within %.0f s: killed", c.name, self.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._write_status()
        return 0 if clean else 1
