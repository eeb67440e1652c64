"""Run the API under granian with several worker processes.

    python -m api.serve --port 8000 --workers 2

Each worker builds its own app (``create_app()``, settings from ``HAOYUAN_*``
variables) with its own engine connection, pool, caches and metrics.

Why granian, by measurement on this machine (2 shared cores, same app, 2
workers, wrk): medians of two interleaved rounds were granian 4,030
hello/s, 2,119 holds/s and 4,903 sold-out answers/s against uvicorn (uvloop,
httptools) 3,861, 1,309 and 4,120, on a machine busy with other work; the
project's earlier quiet-machine figure was 17.6k against 12.4k hello/s.
granian spawns its worker processes itself; the ASGI lifespan runs in each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "serve"]


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 2,
    backlog: int = 2048,
    loop: str = "uvloop",
    access_log: bool | None = None,
    task_impl: str = "asyncio",
    runtime_mode: str = "auto",
    backpressure: int | None = None,
) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops, RuntimeModes, TaskImpl

    from api.settings import Settings

    # Refuse to start here, once, naming every missing or weak secret: a worker
    # whose factory fails would only be respawned by granian, over and over.
    settings = Settings.from_env()
    _check_durability(settings)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One scrape of /metrics sees every worker (api.metrics): the workers
        # inherit the directory; a fresh one per start (no stale counters).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="haoyuan-metrics-")
    if access_log is not None:
        os.environ["HAOYUAN_ACCESS_LOG"] = "1" if access_log else "0"
    Granian(
        "api.app:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        backlog=backlog,
        loop=Loops(loop),
        task_impl=TaskImpl(task_impl),
        runtime_mode=RuntimeModes(runtime_mode),
        # Requests one worker takes in at once (granian: backlog / workers);
        # beyond, they wait in the socket, and arrive old (shed at once).
        backpressure=backpressure or None,
        log_access=False,
        respawn_failed_workers=True,
    ).serve()


def _check_durability(settings: Any) -> None:
    """Refuse to start (SettingsError) when Redis does not provide the
    configured durability (production: AOF always unless HAOYUAN_DURABILITY
    says otherwise); a Redis that is not up yet is the workers' to find."""
    from api.settings import SettingsError

    mode = settings.engine.durability
    if mode not in ("aof-always", "aof-everysec") or settings.engine.cluster:
        return
    import redis

    try:
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, decode_responses=True)
        try:
            got = {str(k): str(v) for k, v in r.config_get("append*").items()}
        finally:
            r.close()
    except redis.RedisError:
        return
    want = mode.removeprefix("aof-")
    if got.get("appendonly") != "yes" or got.get("appendfsync") != want:
        raise SettingsError(
            f"haoyuan api refuses to start: HAOYUAN_DURABILITY is {mode} (the production"
            f" default) but Redis has appendonly {got.get('appendonly')} and appendfsync"
            f" {got.get('appendfsync')}: configure Redis, or name the mode you run"
            " (HAOYUAN_DURABILITY=aof-everysec, wait or none)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m api.serve", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--backlog", type=int, default=2048)
    p.add_argument("--loop", default="uvloop", choices=["auto", "asyncio", "uvloop"])
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--task-impl", default=os.environ.get("HAOYUAN_TASK_IMPL", "asyncio"),
                   choices=["asyncio", "rust"])
    p.add_argument("--runtime-mode", default=os.environ.get("HAOYUAN_RUNTIME_MODE", "auto"),
                   choices=["auto", "st", "mt"])
    p.add_argument("--backpressure", type=int,
                   default=int(os.environ.get("HAOYUAN_BACKPRESSURE", "0")) or None,
                   help="requests a worker takes in at once (default: granian's, backlog"
                        " / workers); $HAOYUAN_BACKPRESSURE")
    args = p.parse_args(argv)
    from api.settings import SettingsError

    try:
        serve(host=args.host, port=args.port, workers=args.workers, backlog=args.backlog,
              loop=args.loop, access_log=False if args.no_access_log else None,
              task_impl=args.task_impl, runtime_mode=args.runtime_mode,
              backpressure=args.backpressure)
    except SettingsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
