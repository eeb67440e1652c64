"""Operational commands: import, audit, rebuild, forwarder, demo, staff
(registered into ``haoyuan``'s parser by engine.cli; imports stay inside the
commands)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec


async def _audit(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.audit import format_table, run_audit
    from engine.engine import Engine, EngineConfig

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2) if a.pg_dsn else None
    his = None
    if a.his_url:
        from engine.his.fhir import FhirHisClient

        his = FhirHisClient(a.his_url)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            report = await run_audit(eng, pool, his, session_ids=a.session or None)
        if pool is not None:
            import datetime as dt

            from engine.store.queries import record_audit_run

            now = dt.datetime.now(dt.UTC)
            await record_audit_run(pool, started_at=now, finished_at=now, ok=report.ok,
                                   sessions=len(report.sessions), breaches=report.breaches,
                                   report=msgspec.to_builtins(report))
    finally:
        if pool is not None:
            await pool.close()
        if his is not None:
            await his.aclose()
    if a.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(format_table(report))
    return 0 if report.ok else 1


async def _rebuild(a: argparse.Namespace) -> int:
    import sys

    import asyncpg

    from engine.engine import Engine, EngineConfig
    from engine.rebuild import rebuild
    from engine.recovery import RecoveryError

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            reports = await rebuild(eng, pool, a.session or None,
                                    drain_timeout_s=a.drain_timeout)
    except RecoveryError as exc:
        print(f"haoyuan rebuild: {exc}; the partition stays closed (its sales answer "
              "'recovering'): fix the cause and run the rebuild again", file=sys.stderr)
        return 2
    finally:
        await pool.close()
    print(msgspec.json.encode(reports).decode())
    return 0 if all(not r.failed for r in reports) else 1


async def _rebuild_bindings(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.engine import Engine, EngineConfig
    from engine.rebuild import rebuild_bindings

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            written = await rebuild_bindings(eng, pool)
    finally:
        await pool.close()
    print(msgspec.json.encode({"written": written}).decode())
    return 0


async def _import(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.engine import Engine, EngineConfig
    from engine.schedule_import import import_sessions, load_json_file

    specs = load_json_file(a.file)
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            report = await import_sessions(eng, pool, specs)
    finally:
        await pool.close()
    print(msgspec.json.encode(report).decode())
    return 0


async def _forwarder(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.cli import _stop_event
    from engine.engine import Engine, EngineConfig
    from engine.forwarder import ForwarderConfig, HisForwarder
    from engine.his.fhir import FhirHisClient

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=4)
    his = FhirHisClient(a.his_url, timeout=a.timeout)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            fwd = HisForwarder(eng, pool, his, ForwarderConfig())
            await fwd.run(_stop_event(), burst=a.burst)
    finally:
        await his.aclose()
        await pool.close()
    return 0


async def _scheduler(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.cli import _stop_event
    from engine.engine import Engine, EngineConfig
    from engine.his.fhir import FhirHisClient
    from engine.scheduler import run_scheduler, schedule_once

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    his = FhirHisClient(a.his_url)
    try:
        async with Engine.connect(a.redis_url, EngineConfig()) as eng:
            if a.once:
                print(msgspec.json.encode(await schedule_once(eng, pool, his)).decode())
            else:
                await run_scheduler(eng, pool, his, _stop_event(), interval_s=a.interval)
    finally:
        await his.aclose()
        await pool.close()
    return 0


async def _staff(a: argparse.Namespace) -> int:
    """``staff add USERNAME --role R`` (prints the token, once), ``staff list``,
    ``staff disable USERNAME``. Recorded in the staff audit trail as ``cli:<OS user>``."""
    import getpass
    import sys

    import asyncpg

    from engine.store import staff

    who = "cli:" + getpass.getuser()
    conn = await asyncpg.connect(a.pg_dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('staff') IS NOT NULL"):
            print("haoyuan staff: no staff table here; run haoyuan migrate first",
                  file=sys.stderr)
            return 1
        if a.staff_command == "add":
            try:
                member, token = await staff.add_staff(conn, a.username, a.role, who)
            except (ValueError, staff.StaffExists) as exc:
                print(f"haoyuan staff add: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({"staff_id": member.id, "username": member.username,
                              "role": member.role, "token": token}))
            print("The token is shown once: hand it to the person; only its hash is stored.",
                  file=sys.stderr)
            return 0
        if a.staff_command == "disable":
            done = await staff.disable_staff(conn, a.username, who)
            print(json.dumps({"username": a.username, "disabled": done}))
            return 0 if done else 1
        members = await staff.list_staff(conn)
    finally:
        await conn.close()
    if a.json:
        print(msgspec.json.encode(members).decode())
    else:
        print(f"{'id':<16} {'username':<24} {'role':<9} {'created':<20} disabled")
        for m in members:
            print(f"{m.id:<16} {m.username:<24} {m.role:<9} "
                  f"{m.created_at:%Y-%m-%d %H:%M:%S} "
                  f"{'' if m.disabled_at is None else f'{m.disabled_at:%Y-%m-%d %H:%M:%S}'}")
    return 0


async def _demo(a: argparse.Namespace) -> int:
    from engine.demo import run_demo

    summary = await run_demo(quick=a.quick, json_only=a.json, out_dir=a.out,
                             engine_only=a.engine_only)
    if a.json:
        print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


def register(
    sub: Any,
    commands: dict[str, Callable[[argparse.Namespace], Awaitable[int]]],
    add_conn: Callable[..., None],
) -> None:
    his_default = os.environ.get("HAOYUAN_HIS_URL")

    p = sub.add_parser("audit", help="conservation and Redis/PostgreSQL/HIS agreement")
    add_conn(p)
    p.add_argument("--his-url", default=his_default)
    p.add_argument("--session", action="append", help="only this session (repeatable)")
    p.add_argument("--json", action="store_true")
    commands["audit"] = _audit

    p = sub.add_parser(
        "rebuild", help="close, drain, rebuild from PostgreSQL and reopen partitions of Redis")
    add_conn(p)
    p.add_argument("session", nargs="*",
                   help="rebuild the partitions of these sessions (default: every partition "
                        "PostgreSQL knows)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to wait for a partition's outbox to reach PostgreSQL before "
                        "giving up (the partition then stays closed; default 60)")
    commands["rebuild"] = _rebuild

    p = sub.add_parser("rebuild-bindings",
                       help="refill Redis's binding mirror (read by holds) from PostgreSQL")
    add_conn(p)
    commands["rebuild-bindings"] = _rebuild_bindings

    p = sub.add_parser("import", help="import sessions (JSON list of session specs)")
    add_conn(p)
    p.add_argument("file")
    commands["import"] = _import

    p = sub.add_parser("forwarder", help="forward bookings to HIS (FHIR R4)")
    add_conn(p)
    p.add_argument("--his-url", default=his_default or "http://127.0.0.1:8090")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--burst", action="store_true")
    commands["forwarder"] = _forwarder

    p = sub.add_parser("scheduler", help="import HIS sessions ahead of the release calendar")
    add_conn(p)
    p.add_argument("--his-url", default=his_default or "http://127.0.0.1:8090")
    p.add_argument("--interval", type=float, default=600.0)
    p.add_argument("--once", action="store_true", help="one pass, print its report")
    commands["scheduler"] = _scheduler

    p = sub.add_parser("staff", help="staff accounts with roles: add, list, disable")
    staff_sub = p.add_subparsers(dest="staff_command", required=True)
    q = staff_sub.add_parser("add", help="add a staff member; prints their token once")
    q.add_argument("username")
    q.add_argument("--role", required=True, choices=("operator", "clerk", "finance"))
    add_conn(q)
    q = staff_sub.add_parser("list", help="every staff member")
    q.add_argument("--json", action="store_true")
    add_conn(q)
    q = staff_sub.add_parser("disable", help="disable a staff member (by username or id)")
    q.add_argument("username")
    add_conn(q)
    commands["staff"] = _staff

    p = sub.add_parser("demo", help="the release-morning demo (starts what it needs)")
    p.add_argument("--quick", action="store_true", help="a smaller morning, under a minute")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    p.add_argument("--out", default="reports/demo", help="where the report and plots go")
    p.add_argument("--engine-only", action="store_true",
                   help="the crowd calls the engine in process instead of HTTP + Locust")
    commands["demo"] = _demo
