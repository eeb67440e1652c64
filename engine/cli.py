"""``haoyuan``: the one front door of the stack.

    haoyuan serve [--port 8000] [--workers N]  the API and every worker, kept up
    haoyuan api [--port 8000] [--workers N]   the HTTP API (granian workers)
    haoyuan writer | forwarder | sweeper | scheduler | refunds   the background workers
    haoyuan migrate                      apply PostgreSQL migrations
    haoyuan import FILE | --example | --schema   sessions JSON -> PostgreSQL + engine
    haoyuan audit [--json]               conservation; Redis vs PostgreSQL vs HIS; rebuild needed?
    haoyuan rebuild [SESSION ...]        close, drain, rebuild from PostgreSQL, reopen
    haoyuan rebuild-bindings             Redis's binding mirror from PostgreSQL
    haoyuan staff add|list|disable       staff accounts with roles (token shown once)
    haoyuan fhir-client add|list|disable backend clients of the FHIR facade (token shown once)
    haoyuan fhir-location HOSPITAL ...   a hospital's phone and address for aggregators
    haoyuan publish [--once]             SMART Scheduling Links bulk files (a worker)
    haoyuan reconcile payments --date D  the provider's statement vs the ledger (对账)
    haoyuan his attention | resolve      bookings the forwarder stopped retrying
    haoyuan demo [--quick] [--json]      the release-morning demo (starts what it needs)
    haoyuan bench engine|http|durability|cluster|peers|peking [--quick] [--json]

Every command reads the same configuration from the environment
(``engine.config``): ``HAOYUAN_REDIS_URL`` (default redis://127.0.0.1:6379/0),
``HAOYUAN_PG_DSN`` (default postgresql://postgres@127.0.0.1:5432/haoyuan),
``HAOYUAN_HIS_URL`` (default http://127.0.0.1:8090), and the engine's
``HAOYUAN_DURABILITY``, ``HAOYUAN_REDIS_CLUSTER``, ``HAOYUAN_PATIENT_RULES``,
``HAOYUAN_ACCOUNT_RATE_PER_S``, ...; ``--redis-url`` / ``--pg-dsn`` /
``--his-url`` override the addresses. ``HAOYUAN_LOG_LEVEL`` (any case).

This module sits above the embeddable core: it imports the API, the demo and
the benchmarks lazily, inside the commands that run them; nothing in the
core imports it (``tests/test_layering.py``).
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

import msgspec

from engine.config import Connections


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _writer(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.writer import OutboxWriter, WriterConfig

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=4)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
            w = OutboxWriter(eng, pool, WriterConfig(
                batch_size=a.batch_size, block_ms=a.block_ms, claim_idle_ms=a.claim_idle_ms,
                consumer=a.consumer or ""))
            await w.run(_stop_event(), burst=a.burst)
            print(json.dumps({"written": w.written, "conflicts": w.conflicts, "dead": w.dead}))
    finally:
        await pool.close()
    return 0


async def _sweeper(a: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sweeper import Sweeper

    async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
        await Sweeper(eng, interval_s=a.interval).run(_stop_event(), burst=a.once)
    return 0


async def _migrate(a: argparse.Namespace) -> int:
    from engine.store.migrate import migrate

    applied = await migrate(a.pg_dsn)
    print(json.dumps({"applied": applied}))
    return 0


async def _audit(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.audit import format_table, run_audit
    from engine.config import EngineConfig
    from engine.engine import Engine

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2) if a.pg_dsn else None
    his = None
    if a.his_url:
        from engine.his.fhir import FhirHisClient

        his = FhirHisClient(a.his_url)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
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
    import asyncpg

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.rebuild import rebuild
    from engine.recovery import RecoveryError

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
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

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.rebuild import rebuild_bindings

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
            written = await rebuild_bindings(eng, pool)
    finally:
        await pool.close()
    print(msgspec.json.encode({"written": written}).decode())
    return 0


async def _import(a: argparse.Namespace) -> int:
    if a.schema:
        from engine.model import SessionSpec

        print(msgspec.json.encode(msgspec.json.schema(list[SessionSpec])).decode())
        return 0
    if a.example:
        from engine.schedule_import import example_file

        print(example_file().read_text(), end="")
        return 0
    if not a.file:
        print("haoyuan import: give a FILE (see --example and --schema)", file=sys.stderr)
        return 2
    import asyncpg

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.schedule_import import ScheduleFileError, import_sessions, load_json_file

    try:
        specs = load_json_file(a.file)
    except ScheduleFileError as exc:
        print(f"haoyuan import: {exc}", file=sys.stderr)
        return 2
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
            report = await import_sessions(eng, pool, specs)
    finally:
        await pool.close()
    print(msgspec.json.encode(report).decode())
    return 0


async def _forwarder(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.forwarder import ForwarderConfig, HisForwarder
    from engine.his.fhir import FhirHisClient
    from engine.his.inbound import HisInbound, InboundConfig
    from engine.pii import worker_crypto

    # It decrypts patients for the HIS: production refuses missing or weak keys.
    crypto = worker_crypto(worker="forwarder")
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=4)
    his = FhirHisClient(a.his_url, timeout=a.timeout)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
            fwd = HisForwarder(eng, pool, his, ForwarderConfig(), crypto=crypto)
            stop = _stop_event()
            tasks = [asyncio.create_task(fwd.run(stop, burst=a.burst))]
            inbound = None
            if not a.no_inbound:
                inbound = HisInbound(eng, pool, his, InboundConfig(interval_s=a.poll_interval))
                if a.burst:
                    await inbound.poll_once()
                else:
                    tasks.append(asyncio.create_task(inbound.run(stop)))
            await tasks[0]
            stop.set()
            await asyncio.gather(*tasks[1:])
            print(json.dumps({"accepted": fwd.accepted, "rejected": fwd.rejected,
                              "cancelled": fwd.cancelled, "attention": fwd.attention,
                              "patients": fwd.patients_sent,
                              "his_changes": None if inbound is None else
                              msgspec.to_builtins(inbound.total)}))
    finally:
        await his.aclose()
        await pool.close()
    return 0


async def _notifier(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.notify.config import notifiers_from_env
    from engine.notify.worker import Notifications, NotifyConfig
    from engine.pii import is_development, worker_crypto

    # It decrypts the openid and the phone to send: production refuses weak keys.
    crypto = worker_crypto(worker="notifier")
    notifiers = notifiers_from_env(os.environ, development=is_development())
    try:
        quiet_from, _, quiet_to = a.quiet_hours.partition("-")
        q0, q1 = int(quiet_from) * 60, int(quiet_to) * 60
        if not (0 <= q0 < 1440 and 0 <= q1 < 1440):
            raise ValueError
    except ValueError:
        print("haoyuan notifier: --quiet-hours is FROM-TO in whole hours, e.g. 22-7",
              file=sys.stderr)
        return 2
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=4)
    try:
        n = Notifications(pool, crypto, notifiers, NotifyConfig(
            batch_size=a.batch_size, reminder_lead_s=a.reminder_lead_hours * 3600,
            quiet_from_min=q0, quiet_to_min=q1, lease_s=a.lease))
        await n.run(_stop_event(), burst=a.burst)
        print(json.dumps({"planned": n.planned, "sent": n.sent, "failed": n.failed,
                          "skipped": n.skipped, "retried": n.retried}))
    finally:
        for notifier in notifiers.values():
            await notifier.aclose()
        await pool.close()
    return 0


def _wxpay(worker: str) -> Any:
    """WeChat Pay from HAOYUAN_WXPAY_*; production refuses weak or missing keys."""
    from engine.config import ConfigError
    from engine.payments.wechat import WechatPay, WechatPayConfig
    from engine.pii import is_development

    try:
        cfg = WechatPayConfig.from_env()
    except ValueError as exc:
        raise ConfigError(f"haoyuan {worker}: {exc}") from None
    if cfg is None:
        raise ConfigError(f"haoyuan {worker}: WeChat Pay is not configured (HAOYUAN_WXPAY_*)")
    if not is_development():
        problems = cfg.problems()
        if problems:
            raise ConfigError(f"haoyuan {worker} refuses to start (production): "
                              + "; ".join(f"{v}: {why}" for v, why in problems))
    return WechatPay(cfg)


async def _refunds(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.refunds import RefundConfig, RefundWorker, refund_lag, retry_refund

    # The merchant key is checked before anything else: production refuses weak keys.
    provider = None if (a.retry or a.status) else _wxpay("refunds")
    try:
        pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=4)
    except BaseException:
        if provider is not None:
            await provider.aclose()
        raise
    try:
        if a.retry:
            got = await retry_refund(pool, a.retry)
            print(json.dumps({"out_refund_no": a.retry, "rearmed": got is not None}))
            return 0 if got is not None else 1
        if a.status:
            print(msgspec.json.encode(await refund_lag(pool)).decode())
            return 0
        assert provider is not None
        w = RefundWorker(pool, provider, RefundConfig(
            batch_size=a.batch_size, max_attempts=a.max_attempts,
            backoff_base_s=a.backoff_base, backoff_cap_s=a.backoff_cap))
        await w.run(_stop_event(), burst=a.burst)
        print(json.dumps({"sent": w.sent, "looked_up": w.looked_up,
                          "succeeded": w.succeeded, "failed": w.failed,
                          "unknown": w.unknown}))
    finally:
        if provider is not None:
            await provider.aclose()
        await pool.close()
    return 0


async def _reconcile(a: argparse.Namespace) -> int:
    import datetime as dt

    import asyncpg

    from engine.payments.base import StatementNotReady
    from engine.reconcile import format_report, reconcile

    date = a.date or (dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).date()
                      - dt.timedelta(days=1)).isoformat()
    provider = _wxpay("reconcile")
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        report = await reconcile(pool, provider, date, examples=a.examples)
    except StatementNotReady as exc:
        print(f"haoyuan reconcile: {exc} (WeChat Pay publishes a day's bill after 10:00 the"
              " next day)", file=sys.stderr)
        return 2
    finally:
        await pool.close()
        await provider.aclose()
    if a.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(format_report(report))
    return 0 if report.ok else 1


async def _his(a: argparse.Namespace) -> int:
    import asyncpg

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        from engine.his.attention import attention, resolve

        if a.his_command == "attention":
            rows = await attention(pool)
            if a.json:
                print(msgspec.json.encode(rows).decode())
            else:
                for r in rows:
                    print(f"{r.booking_id:<40} {r.his_status:<17} {r.status:<10} {r.reason}")
                print(f"{len(rows)} booking(s) need an operator")
            return 0
        import getpass

        from engine.config import EngineConfig
        from engine.engine import Engine

        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
            got = await resolve(eng, pool, a.booking_id, a.action,
                                actor="cli:" + getpass.getuser(), note=a.note)
    finally:
        await pool.close()
    if isinstance(got, str):
        print(f"haoyuan his resolve: {got}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(got).decode())
    return 0


async def _scheduler(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.his.fhir import FhirHisClient
    from engine.scheduler import run_scheduler, schedule_once

    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    his = FhirHisClient(a.his_url)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
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


async def _fhir_client(a: argparse.Namespace) -> int:
    """``fhir-client add NAME --scopes ...`` (prints the token, once), ``list``, ``disable``."""
    import getpass

    import asyncpg

    from engine.store import fhir_clients as fc

    who = "cli:" + getpass.getuser()
    conn = await asyncpg.connect(a.pg_dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('fhir_clients') IS NOT NULL"):
            print("haoyuan fhir-client: no fhir_clients table here; run haoyuan migrate first",
                  file=sys.stderr)
            return 1
        if a.fhir_command == "add":
            try:
                client, token = await fc.add_client(
                    conn, a.name, a.scopes, who, identity=a.identity, rate_per_s=a.rate_per_s,
                    burst=a.burst)
            except (ValueError, fc.ClientExists) as exc:
                print(f"haoyuan fhir-client add: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({"client_id": client.id, "name": client.name,
                              "scopes": list(client.scopes), "identity": client.identity,
                              "rate_per_s": client.rate_per_s, "burst": client.burst,
                              "token": token}))
            print("The token is shown once: hand it to the backend's operator; only its hash is"
                  " stored.", file=sys.stderr)
            return 0
        if a.fhir_command == "disable":
            done = await fc.disable_client(conn, a.name, who)
            print(json.dumps({"name": a.name, "disabled": done}))
            return 0 if done else 1
        clients = await fc.list_clients(conn)
    finally:
        await conn.close()
    if a.json:
        print(msgspec.json.encode(clients).decode())
    else:
        print(f"{'id':<16} {'name':<24} {'identity':<8} {'rate/s':>7} disabled  scopes")
        for c in clients:
            print(f"{c.id:<16} {c.name:<24} {c.identity:<8} {c.rate_per_s:>7g} "
                  f"{'yes' if c.disabled_at else 'no ':<9} {' '.join(c.scopes)}")
    return 0


async def _fhir_location(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.store.scheduling import set_contact

    contact: dict[str, Any] = {
        "phone": a.phone, "url": a.url, "line": a.line or None, "city": a.city,
        "district": a.district, "state": a.state, "postal_code": a.postal_code,
        "country": a.country, "latitude": a.latitude, "longitude": a.longitude}
    given = {k: ("" if v == [""] else v) for k, v in contact.items() if v is not None}
    changes: dict[str, Any] = {k: (None if v == "" else v) for k, v in given.items()}
    conn = await asyncpg.connect(a.pg_dsn)
    try:
        done = await set_contact(conn, a.hospital, changes)
    finally:
        await conn.close()
    print(json.dumps({"hospital": a.hospital, "updated": done}))
    return 0 if done else 1


async def _publish(a: argparse.Namespace) -> int:
    import asyncpg

    from engine.config import EngineConfig, PublishConfig
    from engine.engine import Engine
    from engine.scheduling.publish import BulkPublisher

    cfg = PublishConfig.from_env()
    overrides = {k: v for k, v in (("public_url", a.public_url),
                                   ("publish_min_interval_s", a.min_interval),
                                   ("publish_check_s", a.check_every)) if v is not None}
    if overrides:
        import dataclasses

        cfg = dataclasses.replace(cfg, **overrides)
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
            pub = BulkPublisher(eng, pool, cfg)
            if a.once:
                report = await pub.publish_once(force=True)
                print(msgspec.json.encode(report).decode())
            else:
                await pub.run(_stop_event())
    finally:
        await pool.close()
    return 0


async def _demo(a: argparse.Namespace) -> int:
    from benchmarks.demo import run_demo

    summary = await run_demo(quick=a.quick, json_only=a.json, out_dir=a.out,
                             engine_only=a.engine_only, cluster=a.cluster,
                             failover=a.failover)
    if a.json:
        print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


async def _stats(a: argparse.Namespace) -> int:
    """``haoyuan stats``: fold Redis's demand into PostgreSQL, then the
    figures per session, doctor, department and day (engine.stats)."""
    import datetime as dt

    import asyncpg

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.stats import fold, stats, totals

    try:
        if a.date and (a.date_from or a.date_to):
            raise ValueError("give --date, or --from and --to")
        first = dt.date.fromisoformat(a.date or a.date_from or dt.date.today().isoformat())
        last = dt.date.fromisoformat(a.date or a.date_to or first.isoformat())
    except ValueError as exc:
        print(f"haoyuan stats: {exc} (dates are YYYY-MM-DD)", file=sys.stderr)
        return 2
    if last < first or (last - first).days > 366:
        print("haoyuan stats: --to must not be before --from, nor a year after it",
              file=sys.stderr)
        return 2
    pool = await asyncpg.create_pool(a.pg_dsn, min_size=1, max_size=2)
    try:
        folded = None
        if not a.no_fold:
            async with Engine.connect(a.redis_url, EngineConfig.from_env()) as eng:
                async with pool.acquire() as conn:
                    folded = await fold(eng, conn)
        rows = await stats(pool, date_from=first, date_to=last, hospital=a.hospital)
    finally:
        await pool.close()
    out = {
        "from": first.isoformat(), "to": last.isoformat(), "hospital": a.hospital,
        "sessions": msgspec.to_builtins(rows),
        "by_doctor": totals(rows, ("date", "dept_id", "doctor_id")),
        "by_department": totals(rows, ("date", "dept_id")),
        "by_day": totals(rows, ("date",)),
        "folded": None if folded is None else msgspec.to_builtins(folded),
    }
    if a.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    head = ("date", "dept_id", "doctor_id", "released", "booked", "tried", "unmet_demand",
            "sold_out_after_release_ms", "cancelled_in_time", "cancelled_late", "no_show_rate",
            "waitlist_offers", "refunds", "his_rejections")
    print("\t".join(head))
    for r in out["by_doctor"]:
        print("\t".join("" if r.get(k) is None else str(r.get(k)) for k in head))
    return 0


def _capacity(a: argparse.Namespace) -> int:
    """``haoyuan capacity``: the M/M/s clinic (and its simulations), or the
    release-morning sizing (``capacity release``). Bad or unstable input is
    exit 2 with the reason; nothing else is printed then."""
    from engine import capacity as cap

    try:
        if a.what == "release":
            if a.peak_rps is None:
                raise ValueError("capacity release needs --peak-rps")
            given = {k: getattr(a, k) for k in cap.MEASURED if getattr(a, k) is not None}
            sized = cap.size_release(a.peak_rps, **given)
            out: dict[str, Any] = sized.to_dict()
            text = [sized.arithmetic]
        else:
            if a.arrivals_per_hour is None or a.services_per_hour is None:
                raise ValueError("capacity needs --arrivals-per-hour and --services-per-hour")
            if a.servers is None and a.target_wait_minutes is None:
                raise ValueError("capacity needs --servers or --target-wait-minutes")
            needed = (cap.servers_for_wait(a.arrivals_per_hour, a.services_per_hour,
                                           a.target_wait_minutes)
                      if a.target_wait_minutes is not None else None)
            servers = a.servers if a.servers is not None else needed
            assert servers is not None
            q = cap.mms(a.arrivals_per_hour, a.services_per_hour, servers,
                        percentile=a.percentile)
            out = q.to_dict()
            if needed is not None:
                out["servers_for_target_wait"] = needed
                out["target_wait_minutes"] = a.target_wait_minutes
            text = [f"M/M/{servers}: utilization {q.utilization:.1%}, P(wait) {q.p_wait:.3f}, "
                    f"Lq {q.lq:.2f}, Wq {q.wq_minutes:.2f} min, "
                    f"p{round(q.wait_percentile * 100)} wait {q.wait_percentile_minutes:.2f} min"]
            if needed is not None:
                text.append(f"fewest servers for a mean wait of at most "
                            f"{a.target_wait_minutes:g} min: {needed}")
            if a.simulate:
                sim = cap.simulate_mms(a.arrivals_per_hour, a.services_per_hour, servers,
                                       patients=a.patients, seed=a.seed,
                                       percentile=a.percentile)
                booked = cap.simulate_booked(
                    a.arrivals_per_hour, a.services_per_hour, servers, hours=a.hours,
                    days=a.days, punctuality_sd_minutes=a.punctuality_sd_minutes,
                    no_show_rate=a.no_show_rate, seed=a.seed, percentile=a.percentile)
                out["simulated"] = sim.to_dict()
                out["booked"] = booked.to_dict()
                text.append(f"simulated M/M/{servers} ({sim.patients} patients): Wq "
                            f"{sim.wq_minutes:.2f} min, P(wait) {sim.p_wait:.3f}")
                text.append(f"booked every {60 / a.arrivals_per_hour:.1f} min, punctuality "
                            f"sd {a.punctuality_sd_minutes:g} min, {a.no_show_rate:.0%} no-shows"
                            f" ({a.days} sessions):"
                            f" Wq {booked.wq_minutes:.2f} min, P(wait) {booked.p_wait:.3f}")
    except cap.Unstable as exc:
        print(f"haoyuan capacity: unstable: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"haoyuan capacity: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out) if a.json else "\n".join(text))
    return 0


async def _bench(a: argparse.Namespace) -> int:
    result: dict[str, Any]
    try:
        if a.what == "engine":
            from benchmarks.engine_bench import run_engine_bench

            result = await run_engine_bench(quick=a.quick)
        elif a.what == "durability":
            from benchmarks.engine_bench import run_durability_bench

            result = await run_durability_bench(quick=a.quick)
        elif a.what == "cluster":
            from benchmarks.engine_bench import run_cluster_bench

            result = await run_cluster_bench(quick=a.quick)
        elif a.what == "peers":
            from benchmarks.peers import run_peers

            result = await run_peers(quick=a.quick)
        elif a.what == "peking":
            from benchmarks.peking import run_peking

            result = await run_peking(quick=a.quick, open_loop=a.open_loop)
        else:
            from benchmarks.http_bench import run_http_bench

            result = await run_http_bench(quick=a.quick)
    except ModuleNotFoundError as exc:
        print(f"haoyuan bench {a.what}: {exc.name} is missing: this benchmark runs from a "
              "checkout of haoyuan with the load extra (pip install 'haoyuan[load]')",
              file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0


async def _serve(a: argparse.Namespace) -> int:
    from engine.supervisor import Supervisor, children_for

    children = children_for(host=a.host, port=a.port, workers=a.workers, writers=a.writers,
                            forwarder=not a.no_forwarder, sweeper=not a.no_sweeper,
                            scheduler=a.scheduler)
    sup = Supervisor(children, grace_s=a.grace, status_file=a.status_file)
    return await sup.run(_stop_event())


def _api(a: argparse.Namespace) -> int:
    from api.serve import main as serve_main

    args = ["--host", a.host, "--port", str(a.port), "--workers", str(a.workers)]
    if a.no_access_log:
        args.append("--no-access-log")
    return serve_main(args)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown with every option; descriptions kept as written."""


def _conn(p: argparse.ArgumentParser, *, pg: bool = True, his: bool = False,
          his_optional: bool = False) -> None:
    c = Connections.from_env()
    p.add_argument("--redis-url", default=c.redis_url,
                   help="Redis (or a cluster node: HAOYUAN_REDIS_CLUSTER=1); $HAOYUAN_REDIS_URL")
    if pg:
        p.add_argument("--pg-dsn", default=c.pg_dsn, help="PostgreSQL; $HAOYUAN_PG_DSN")
    if his:
        p.add_argument("--his-url", default=c.his_url, help="the HIS (FHIR R4); $HAOYUAN_HIS_URL")
    if his_optional:
        p.add_argument("--his-url", default=os.environ.get("HAOYUAN_HIS_URL"),
                       help="also compare with the HIS (FHIR R4); $HAOYUAN_HIS_URL")


SyncOrAsync = Callable[[argparse.Namespace], Any]
COMMANDS: dict[str, SyncOrAsync] = {}
#: The long-running workers (the API and serve log their own start).
WORKERS = frozenset({"writer", "forwarder", "refunds", "sweeper", "scheduler", "publish",
                     "notifier"})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="haoyuan", description=__doc__, formatter_class=_Help)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, fn: SyncOrAsync, help: str) -> argparse.ArgumentParser:
        COMMANDS[name] = fn
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help, formatter_class=_Help)
        return parser

    p = cmd("api", _api, "serve the HTTP API under granian (settings: HAOYUAN_*, see README)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="worker processes (each with its own engine connection and caches)")
    p.add_argument("--no-access-log", action="store_true", help="no access log lines")

    p = cmd("serve", _serve, "the whole service on this host, kept up: the API and the workers "
            "as child processes, each restarted if it dies; SIGTERM stops them cleanly")
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    p.add_argument("--port", type=int, default=8000, help="the API's TCP port")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="API worker processes")
    p.add_argument("--writers", type=int, default=1, help="outbox writer processes")
    p.add_argument("--no-forwarder", action="store_true", help="no HIS forwarder here")
    p.add_argument("--no-sweeper", action="store_true", help="no hold sweeper here")
    p.add_argument("--scheduler", action="store_true", help="also run the HIS scheduler")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the children get to stop after SIGTERM before a kill")
    p.add_argument("--status-file", default=None,
                   help="write the children's pids and restarts here (JSON) on each change")

    p = cmd("writer", _writer, "the outbox writer: Redis outbox streams -> PostgreSQL")
    _conn(p)
    p.add_argument("--batch-size", type=int, default=500, help="entries per transaction")
    p.add_argument("--block-ms", type=int, default=200,
                   help="milliseconds one read waits for new entries")
    p.add_argument("--claim-idle-ms", type=int, default=5000,
                   help="milliseconds after which a dead writer's entries are claimed")
    p.add_argument("--consumer", default=None,
                   help="consumer name in the group (default: host-pid)")
    p.add_argument("--burst", action="store_true", help="stop once the outbox is drained")

    p = cmd("forwarder", _forwarder, "the HIS forwarder: bookings and cancels -> HIS (FHIR R4, "
            "with the FHIR Patient), and the HIS's changes back (window cancels, 停诊, arrivals, "
            "no-shows). Decrypts patients: needs HAOYUAN_DATA_KEYS and HAOYUAN_HMAC_KEY "
            "(production refuses missing or weak ones)")
    _conn(p, his=True)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HIS request")
    p.add_argument("--burst", action="store_true",
                   help="stop once nothing is left to send (after one pass of the HIS's changes)")
    p.add_argument("--poll-interval", type=float, default=30.0,
                   help="seconds between reads of the HIS's changes (a notification to POST "
                        "/v1/his/notify wakes it at once)")
    p.add_argument("--no-inbound", action="store_true",
                   help="do not read the HIS's changes (another forwarder does)")

    p = cmd("refunds", _refunds, "the refund worker: refund orders -> WeChat Pay "
            "(HAOYUAN_WXPAY_*), at least once, never twice (idempotent out-refund number, a "
            "lookup before any retry after an unknown outcome)")
    _conn(p)
    p.add_argument("--burst", action="store_true",
                   help="stop once no refund can move without waiting")
    p.add_argument("--batch-size", type=int, default=50, help="orders claimed per step")
    p.add_argument("--max-attempts", type=int, default=12,
                   help="failed refunds are retried this often, then left for finance")
    p.add_argument("--backoff-base", type=float, default=2.0,
                   help="seconds: the first retry's backoff ceiling (doubles, full jitter)")
    p.add_argument("--backoff-cap", type=float, default=600.0,
                   help="seconds: the largest backoff between attempts")
    p.add_argument("--status", action="store_true",
                   help="print the refund orders per state (JSON) and stop")
    p.add_argument("--retry", metavar="OUT_REFUND_NO",
                   help="re-arm a refund left for finance (failed past its attempts) and stop")

    p = cmd("notifier", _notifier, "the notifier: booking confirmed, waitlist offers, offers "
            "passed on, 停诊, cancellations, refunds and visit reminders -> WeChat subscribe "
            "messages (with the user's consent) or SMS; settings HAOYUAN_NOTIFY_*")
    p.add_argument("--pg-dsn", default=Connections.from_env().pg_dsn,
                   help="PostgreSQL; $HAOYUAN_PG_DSN")
    p.add_argument("--burst", action="store_true",
                   help="stop once nothing is left to plan or send now")
    p.add_argument("--batch-size", type=int, default=100, help="events or messages per step")
    p.add_argument("--reminder-lead-hours", type=float, default=24.0,
                   help="hours before the visit that the reminder goes")
    p.add_argument("--quiet-hours", default="22-7",
                   help="no reminder between these local hours (FROM-TO, e.g. 22-7)")
    p.add_argument("--lease", type=float, default=30.0,
                   help="seconds a message being sent is left alone (a killed worker's)")

    p = cmd("reconcile", _reconcile, "daily reconciliation (对账): the provider's statement vs "
            "the payments ledger, bookings and refunds; exit 1 on any mismatch")
    p.add_argument("what", choices=["payments"], help="what to reconcile")
    _conn(p)
    p.add_argument("--date", help="the day, YYYY-MM-DD in China time (default: yesterday)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: ok, counts per kind, examples, totals")
    p.add_argument("--examples", type=int, default=5, help="examples shown per mismatch kind")

    p = cmd("his", _his, "bookings the HIS forwarder stopped retrying (lookup_cancelled, "
            "cancel_refused): list them, resolve one")
    his_sub = p.add_subparsers(dest="his_command", required=True, metavar="ACTION")
    q = his_sub.add_parser("attention", help="the bookings that need an operator",
                           formatter_class=_Help)
    q.add_argument("--json", action="store_true", help="as JSON")
    _conn(q)
    q = his_sub.add_parser("resolve", help="resolve one (recorded in the booking's history)",
                           formatter_class=_Help)
    q.add_argument("booking_id")
    q.add_argument("--action", required=True, choices=("cancel", "retry", "done"),
                   help="cancel: the HIS is right, cancel (and refund) here too; retry: send "
                        "again; done: settled by hand in the HIS")
    q.add_argument("--note", default="", help="what was done (kept in the history)")
    _conn(q)

    p = cmd("sweeper", _sweeper, "reclaim expired holds, release delayed units, close waitlists")
    _conn(p, pg=False)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between sweeps")
    p.add_argument("--once", action="store_true", help="one sweep, then stop")

    p = cmd("scheduler", _scheduler,
            "fetch HIS sessions ahead of the release calendar, apply the rules, import")
    _conn(p, his=True)
    p.add_argument("--interval", type=float, default=600.0, help="seconds between passes")
    p.add_argument("--once", action="store_true", help="one pass, print its report")

    p = cmd("migrate", _migrate, "apply PostgreSQL migrations (under an advisory lock)")
    _conn(p)

    p = cmd("import", _import,
            "import sessions (a JSON list of session specs) into PostgreSQL and the engine")
    _conn(p)
    p.add_argument("file", nargs="?", help="the sessions JSON file")
    p.add_argument("--example", action="store_true",
                   help="print a documented example file (engine/examples/sessions.json)")
    p.add_argument("--schema", action="store_true", help="print the file's JSON Schema")

    p = cmd("audit", _audit, "conservation per session; Redis vs PostgreSQL vs HIS; whether a "
            "rebuild is needed (exit 1 on any breach)")
    _conn(p, his_optional=True)
    p.add_argument("--session", action="append", help="only this session (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: ok, sessions, breaches, rebuild_needed, recovery, ...")

    p = cmd("rebuild", _rebuild, "per partition: close sales, drain the outbox, reload from "
            "PostgreSQL, restore bookings, reopen (safe any time; exit 2: a partition stayed "
            "closed)")
    _conn(p)
    p.add_argument("session", nargs="*", help="rebuild the partitions of these sessions "
                   "(default: every partition PostgreSQL knows)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to wait for a partition's outbox to reach PostgreSQL before "
                        "giving up (the partition then stays closed)")

    p = cmd("rebuild-bindings", _rebuild_bindings,
            "refill Redis's binding mirror (read by holds) from PostgreSQL; prints {written}")
    _conn(p)

    p = cmd("staff", _staff, "staff accounts with roles: add (prints the token once), list, "
            "disable")
    staff_sub = p.add_subparsers(dest="staff_command", required=True, metavar="ACTION")
    q = staff_sub.add_parser("add", help="add a staff member; prints their token once",
                             formatter_class=_Help)
    q.add_argument("username")
    q.add_argument("--role", required=True, choices=("operator", "clerk", "finance"),
                   help="operator: schedule, rules, audits; clerk: the window; finance: refunds")
    _conn(q)
    q = staff_sub.add_parser("list", help="every staff member", formatter_class=_Help)
    q.add_argument("--json", action="store_true", help="as JSON")
    _conn(q)
    q = staff_sub.add_parser("disable", help="disable a staff member (by username or id)",
                             formatter_class=_Help)
    q.add_argument("username")
    _conn(q)

    p = cmd("fhir-client", _fhir_client, "backend clients of the FHIR facade (/fhir/r4): add "
            "(prints the token once), list, disable")
    fsub = p.add_subparsers(dest="fhir_command", required=True, metavar="ACTION")
    q = fsub.add_parser("add", help="add a client; prints its token once (a JSON object: "
                        "client_id, name, scopes, identity, rate_per_s, burst, token)",
                        formatter_class=_Help)
    q.add_argument("name", help="the client's name: a-z 0-9 . _ - (1..64)")
    q.add_argument("--scopes", nargs="+", required=True,
                   help="SMART system scopes: system/Slot.read, system/Appointment.read, "
                        "system/Appointment.write (wildcards system/*.read ... allowed)")
    q.add_argument("--identity", choices=("verify", "trusted"), default="verify",
                   help="verify: every patient's ID, name and phone go to the real-name "
                        "authority; trusted: the client vouches for its patients (the ID only)")
    q.add_argument("--rate-per-s", type=float, default=50.0,
                   help="the client's quota in requests per second (0: no quota of its own)")
    q.add_argument("--burst", type=int, default=100, help="requests the quota allows at once")
    _conn(q)
    q = fsub.add_parser("list", help="every client", formatter_class=_Help)
    q.add_argument("--json", action="store_true", help="as JSON")
    _conn(q)
    q = fsub.add_parser("disable", help="disable a client (by name or id): its token stops "
                        "working within HAOYUAN_FHIR_CLIENT_CACHE_S seconds",
                        formatter_class=_Help)
    q.add_argument("name")
    _conn(q)

    p = cmd("fhir-location", _fhir_location, "a hospital's contact for aggregators (the SMART "
            "Location): phone, url, address; an empty value removes one")
    p.add_argument("hospital", help="the hospital id")
    p.add_argument("--phone", help="the booking and contact phone")
    p.add_argument("--url", help="the hospital's web site")
    p.add_argument("--line", action="append", help="an address line (repeatable)")
    for opt in ("city", "district", "state", "postal-code", "country"):
        p.add_argument(f"--{opt}", help=f"the address's {opt.replace('-', ' ')}")
    p.add_argument("--latitude", type=float, help="degrees")
    p.add_argument("--longitude", type=float, help="degrees")
    _conn(p)

    p = cmd("publish", _publish, "SMART Scheduling Links bulk publishing: Location, Schedule and "
            "Slot NDJSON files and their $bulk-publish manifest, regenerated when the schedule or "
            "a slot's free/busy state changes (HAOYUAN_PUBLISH_*, HAOYUAN_PUBLIC_URL)")
    _conn(p)
    p.add_argument("--once", action="store_true",
                   help="publish now and stop; prints {outcome, files, resources, ...}")
    p.add_argument("--public-url", default=None,
                   help="where clients reach the API ($HAOYUAN_PUBLIC_URL, default "
                        "http://127.0.0.1:8000)")
    p.add_argument("--min-interval", type=float, default=None,
                   help="seconds between publications at least ($HAOYUAN_PUBLISH_MIN_INTERVAL_S,"
                        " default 60)")
    p.add_argument("--check-every", type=float, default=None,
                   help="seconds between checks for a change ($HAOYUAN_PUBLISH_CHECK_S, "
                        "default 5)")

    p = cmd("demo", _demo, "the release-morning demo (starts its own Redis, PostgreSQL, HIS "
            "simulator, API and workers unless HAOYUAN_REDIS_URL / HAOYUAN_PG_DSN are set)")
    p.add_argument("--quick", action="store_true", help="a smaller morning, under a minute")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    p.add_argument("--out", default="reports/demo",
                   help="directory for the report, Locust's CSV/HTML and the plots")
    p.add_argument("--engine-only", action="store_true",
                   help="the crowd calls the engine in process instead of HTTP + Locust")
    p.add_argument("--cluster", action="store_true",
                   help="on a private Redis Cluster (3 primaries, a replica each)")
    p.add_argument("--failover", action="store_true",
                   help="with --cluster: kill -9 a primary mid-spike; its replica takes over")

    p = cmd("stats", _stats,
            "statistics per day, department and doctor: units released by pool, booked, "
            "time to sold out, demand and unmet demand, cancellations, no-shows, waitlist, "
            "refunds, HIS rejections (engine.stats)")
    _conn(p)
    p.add_argument("--date", help="one day, YYYY-MM-DD (default: today)")
    p.add_argument("--from", dest="date_from", help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="date_to", help="last day, YYYY-MM-DD (at most a year on)")
    p.add_argument("--hospital", help="one hospital's sessions")
    p.add_argument("--no-fold", action="store_true",
                   help="read PostgreSQL only (do not move Redis's demand counts first)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: sessions, by_doctor, by_department, by_day")

    p = cmd("capacity", _capacity,
            "capacity planning: the clinic as an M/M/s queue (Erlang C), simulated with "
            "--simulate; 'capacity release': API cores and Redis primaries for a peak")
    p.add_argument("what", nargs="?", choices=["clinic", "release"], default="clinic",
                   help="clinic (the default): the queue at the doctors' rooms; release: "
                        "sizing for release morning")
    p.add_argument("--arrivals-per-hour", type=float, help="patients arriving an hour (L)")
    p.add_argument("--services-per-hour", type=float,
                   help="patients one doctor sees an hour (M)")
    p.add_argument("--servers", type=int, help="doctors (or rooms) seeing patients (S)")
    p.add_argument("--target-wait-minutes", type=float,
                   help="also: the fewest servers whose mean wait is at most this (minutes)")
    p.add_argument("--percentile", type=float, default=0.9,
                   help="the wait percentile to report (0-1)")
    p.add_argument("--simulate", action="store_true",
                   help="also a discrete-event simulation of the same clinic, and of booked "
                        "arrivals (every 60/L minutes) with punctuality and no-shows")
    p.add_argument("--patients", type=int, default=200_000, help="--simulate: patients")
    p.add_argument("--hours", type=float, default=4.0,
                   help="--simulate: hours of booked appointments a session")
    p.add_argument("--days", type=int, default=200, help="--simulate: sessions simulated")
    p.add_argument("--punctuality-sd-minutes", type=float, default=5.0,
                   help="--simulate: standard deviation of arrival vs booked time (minutes)")
    p.add_argument("--no-show-rate", type=float, default=0.1,
                   help="--simulate: share of booked patients who do not come")
    p.add_argument("--seed", type=int, default=1, help="--simulate: random seed")
    p.add_argument("--peak-rps", type=float, help="release: requests a second at the peak")
    p.add_argument("--reach-redis", type=float,
                   help="release: share of requests that run a script (default 0.10)")
    p.add_argument("--api-us-cached", type=float,
                   help="release: API CPU us per answer without Redis (default 90, measured)")
    p.add_argument("--api-us-hold", type=float,
                   help="release: API CPU us per hold (default 125, measured)")
    p.add_argument("--redis-us-hold", type=float,
                   help="release: Redis CPU us per hold (default 80, measured)")
    p.add_argument("--api-headroom", type=float, help="release: API headroom (default 0.30)")
    p.add_argument("--redis-busy", type=float,
                   help="release: how busy a primary may run (default 0.5)")
    p.add_argument("--min-primaries", type=float,
                   help="release: fewest primaries (default 3, a cluster)")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = cmd("bench", _bench, "measurements with their ceilings (see benchmarks/README.md)")
    p.add_argument("what", choices=["engine", "http", "durability", "cluster", "peers", "peking"],
                   help="engine: holds/s vs redis-benchmark; http: holds and sold-out vs "
                        "hello-world; durability: confirmations per AOF mode; cluster: holds/s "
                        "on a 3-primary cluster vs one node (ratio), and HTTP on the cluster; "
                        "peers: vs the relational design; peking: the Peking-scale morning "
                        "(checkout only)")
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--open-loop", action="store_true",
                   help="peking: an open-loop crowd on a rate schedule (benchmarks/openloop.c)")
    return ap


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
    fn = COMMANDS[a.cmd]
    if a.cmd in WORKERS:
        from engine.pii import DEV_WARNING, is_development

        # Every worker, every start: a development instance never runs silently.
        if is_development():
            logging.getLogger("haoyuan.cli").warning("haoyuan %s: %s", a.cmd, DEV_WARNING)
        else:
            logging.getLogger("haoyuan.cli").info("haoyuan %s: starting (production)", a.cmd)
    if not asyncio.iscoroutinefunction(fn):
        return int(fn(a))
    try:
        import uvloop

        runner: Callable[[Awaitable[int]], int] = uvloop.run  # type: ignore[assignment]
    except ImportError:  # pragma: no cover
        runner = asyncio.run  # type: ignore[assignment]
    try:
        return runner(fn(a))
    except Exception as exc:  # a worker that cannot start: say why, no traceback
        from engine.config import ConfigError

        if isinstance(exc, ConfigError | RuntimeError | OSError):
            print(f"haoyuan {a.cmd}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
