"""``haoyuan``: the command line of the engine.

    haoyuan demo [--quick] [--json]        the release-morning demo
    haoyuan bench engine|http [--quick] [--json]
    haoyuan migrate                        apply PostgreSQL migrations
    haoyuan writer | forwarder | sweeper   the background workers
    haoyuan import FILE                    sessions JSON -> PostgreSQL + engine
    haoyuan audit [--json]                 conservation, Redis vs PostgreSQL vs HIS
    haoyuan rebuild [SESSION ...]          Redis state from PostgreSQL
    haoyuan rebuild-bindings               Redis's binding mirror from PostgreSQL
    haoyuan staff add|list|disable         staff accounts with roles (token shown once)

Connections come from ``--redis-url`` / ``--pg-dsn`` or the environment
(``HAOYUAN_REDIS_URL``, ``HAOYUAN_PG_DSN``, ``HAOYUAN_HIS_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _writer(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.engine import Engine, EngineConfig
    from engine.writer import OutboxWriter, WriterConfig

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=4)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            w = OutboxWriter(eng, pool, WriterConfig(
                batch_size=a.batch_size, block_ms=a.block_ms, claim_idle_ms=a.claim_idle_ms,
                consumer=a.consumer or ""))
            await w.run(_stop_event(), burst=a.burst)
            print(json.dumps({"written": w.written, "conflicts": w.conflicts, "dead": w.dead}))
    finally:
        await pool.close()
    return 0


async def _sweeper(a: argparse.Namespace) -> int:
    from engine.engine import Engine, EngineConfig

    async with Engine.connect(a.redis_url, EngineConfig()) as eng:
        stop = _stop_event()
        while not stop.is_set():
            try:
                n = await eng.sweep()
                if n:
                    logging.getLogger("haoyuan.sweeper").info("reclaimed %d expired holds", n)
            except Exception:
                logging.getLogger("haoyuan.sweeper").exception("sweep failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=a.interval)
            except TimeoutError:
                pass
    return 0


async def _migrate(a: argparse.Namespace) -> int:
    from engine.store.migrate import migrate

    applied = await migrate(a.pg_dsn)
    print(json.dumps({"applied": applied}))
    return 0


async def _bench(a: argparse.Namespace) -> int:
    result: dict[str, Any]
    if a.what == "engine":
        from engine.bench import run_engine_bench

        result = await run_engine_bench(quick=a.quick)
    elif a.what == "durability":
        from engine.bench import run_durability_bench

        result = await run_durability_bench(quick=a.quick)
    elif a.what == "peers":
        from benchmarks.peers import run_peers

        result = await run_peers(quick=a.quick)
    elif a.what == "peking":
        from benchmarks.peking import run_peking

        result = await run_peking(quick=a.quick, open_loop=a.open_loop)
    else:
        from api.bench import run_http_bench

        result = await run_http_bench(quick=a.quick)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0


def _add_conn(p: argparse.ArgumentParser, pg: bool = True) -> None:
    p.add_argument("--redis-url", default=_env("HAOYUAN_REDIS_URL", DEFAULT_REDIS))
    if pg:
        p.add_argument("--pg-dsn", default=_env("HAOYUAN_PG_DSN", DEFAULT_PG))


COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "writer": _writer,
    "sweeper": _sweeper,
    "migrate": _migrate,
    "bench": _bench,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="haoyuan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("writer", help="outbox streams -> PostgreSQL")
    _add_conn(p)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--block-ms", type=int, default=200)
    p.add_argument("--claim-idle-ms", type=int, default=5000)
    p.add_argument("--consumer", default=None)
    p.add_argument("--burst", action="store_true", help="stop once the outbox is drained")

    p = sub.add_parser("sweeper", help="reclaim expired holds")
    _add_conn(p, pg=False)
    p.add_argument("--interval", type=float, default=1.0)

    p = sub.add_parser("migrate", help="apply PostgreSQL migrations")
    _add_conn(p)

    p = sub.add_parser("bench", help="benchmarks: engine or http")
    p.add_argument("what", choices=["engine", "http", "durability", "peers", "peking"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--open-loop", action="store_true",
                   help="peking: an open-loop crowd on a rate schedule (benchmarks/openloop.c)")

    _extend(sub)
    return ap


def _extend(sub: Any) -> None:
    """Commands defined in other modules register here (kept lazy: imports
    happen only when the command runs)."""
    from engine import cli_ops

    cli_ops.register(sub, COMMANDS, _add_conn)


def log_level(value: str | None) -> int:
    """``HAOYUAN_LOG_LEVEL`` in any case (``info``, ``WARNING``); INFO when unset."""
    level = logging.getLevelName((value or "INFO").strip().upper())
    if not isinstance(level, int):
        raise SystemExit(f"HAOYUAN_LOG_LEVEL must be one of debug, info, warning, error"
                         f" (any case), not {value!r}")
    return level


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=log_level(os.environ.get("HAOYUAN_LOG_LEVEL")),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    a = build_parser().parse_args(argv)
    try:
        import uvloop

        runner: Callable[[Awaitable[int]], int] = uvloop.run  # type: ignore[assignment]
    except ImportError:  # pragma: no cover
        runner = asyncio.run  # type: ignore[assignment]
    return runner(COMMANDS[a.cmd](a))


if __name__ == "__main__":
    sys.exit(main())
