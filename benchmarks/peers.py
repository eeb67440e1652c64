"""The release spike through haoyuan's API vs the relational design of the
seed documents (Spring Boot + MySQL style, here on PostgreSQL), side by side
in one run.

    haoyuan bench peers [--quick] [--json]

Methodology
-----------
- One hot slot of C units (C = 1,009 in the full run, 300 with ``--quick``),
  200 concurrent connections from ``wrk`` (2 threads), every request a
  ``POST /v1/holds`` for a *distinct* patient (real accounts, tokens and
  bound patients, written to the store in bulk; each run uses a fresh
  session in a fresh department, so no patient has a hold there yet).
- *Ours*: ``api.serve`` under granian, 2 workers, production defaults (rate
  limits, admission control, sold-out cache on). Two client behaviours:
  ``ours`` (no Idempotency-Key: a press from the page, answered from the
  per-worker sold-out cache once the slot is gone) and ``ours_keyed`` (a
  fresh Idempotency-Key per request, as the mini-program sends: before a
  cached sold-out answer it costs a Redis look-up of the key).
- *Relational*: ``benchmarks.relational_app`` under granian, same worker
  count, same request bytes: ``UPDATE slots SET remaining = remaining - 1
  WHERE ... AND remaining > 0 RETURNING remaining`` then ``INSERT INTO
  bookings`` in one transaction, asyncpg pool of 10 per worker (HikariCP's
  default), on the same PostgreSQL server (its own database).
- Durability is matched pairwise, each a separate measurement: ``fsync``
  (Redis ``appendfsync always`` / PostgreSQL ``synchronous_commit on``: an
  acknowledged hold survives a power loss) and ``relaxed`` (``everysec`` /
  ``synchronous_commit off``: up to about a second of acknowledged holds
  can be lost with the host). Switched at run time (``CONFIG SET``,
  ``ALTER SYSTEM`` + reload), servers untouched.
- One run: wrk starts; a poller reads the slot's free count (Redis
  ``ZCARD`` / ``SELECT remaining``) every ~2 ms; when it reads 0, the spike
  goes on for a tail (2 s, 1 s with ``--quick``) of sold-out answers, then
  wrk is stopped with SIGINT (it still prints its statistics). Same offered
  load for both: the same 200 closed-loop connections, the same requests.
- Figures per run: successful holds (201), ``bookings_per_s`` = successes /
  (last 201 received - first request sent, wrk's clock), ``sellout_ms`` =
  first request sent until the poller read 0 free, wrk's p50/p99 over the
  whole run (sale + tail), the answers by status and problem type, 5xx and
  socket errors, CPU by process group (/proc). ``sale_latency_ms`` is the
  mean latency during the sale by Little's law (200 / bookings_per_s).
- Correctness per run: exactly C successes; ours: the engine's audit
  (conservation, no unit twice) with held = C and free = 0; relational:
  ``count(*) FROM bookings`` = C and ``remaining`` = 0. At the end every hold
  of ours is paid through the engine, the writer drains the outbox into
  PostgreSQL and ``run_audit`` compares Redis with PostgreSQL.
- Medians over repeats (3; 1 with ``--quick``), the variants interleaved
  (order reversed on odd repeats). wrk, both apps' 2 workers each, Redis,
  PostgreSQL and this process share the machine's 2 cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks._common import (
    LUA_COMMON,
    NOISY_OTHER_PCT,
    CpuSampler,
    Wrk,
    api_env,
    confirm_and_persist,
    count_5xx,
    dump_logs,
    ensure_wrk,
    hardware,
    import_sessions,
    latency_ms,
    noisy,
    prepare_patients,
    settle,
    socket_errors,
    start_api,
    start_relational,
    status_mix,
    stop_process,
    wait_http,
)
from engine import keys as K
from engine.engine import Engine, EngineConfig
from engine.model import SessionSpec, SlotSpec
from engine.testing.servers import PostgresServer, RedisServer, free_port

__all__ = ["run_peers"]

log = logging.getLogger("haoyuan.bench")

DATE = "2027-03-01"
VARIANTS = ("ours", "ours_keyed", "relational")
#: Durability pairs: name -> (Redis appendfsync, PostgreSQL synchronous_commit).
MODES = {"fsync": ("always", "on"), "relaxed": ("everysec", "off")}

SPIKE_LUA = LUA_COMMON + r"""
local rows, sid, slot, keyed, tag, nth
local k = 0
function init(args)
  rows = load_rows(args[1])
  sid, slot, keyed, tag = args[2], args[3], args[4] == "keyed", args[5]
  nth = tonumber(args[6])
end
function request()
  hy_mark()
  local g = k * nth + tid
  k = k + 1
  local r = rows[g % #rows + 1]
  local h = {["Authorization"] = "Bearer " .. r[1], ["Content-Type"] = "application/json"}
  if keyed then h["Idempotency-Key"] = tag .. "-" .. tid .. "-" .. k end
  return wrk.format("POST", "/v1/holds", h,
    '{"session_id":"' .. sid .. '","slot_id":"' .. slot .. '","patient_id":"' .. r[2] .. '"}')
end
"""


def _spec(sid: str, dept: str, capacity: int) -> SessionSpec:
    return SessionSpec(
        session_id=sid, hospital="BENCH", dept=dept, doctor=f"DOC-{sid}", date=DATE,
        period="AM", fee=1000, release_at_ms=0, hold_ttl_ms=600_000,
        slots=[SlotSpec(slot_id="A", start="08:00", end="08:30", capacity=capacity)],
    )


async def _spike(url: str, script: Path, args: list[str], poll: Callable[[], Awaitable[int]],
                 capacity: int, roots: dict[str, int], *, connections: int, tail_s: float,
                 settle_s: float, max_sale_s: float = 30.0) -> dict[str, Any]:
    """One spike: wrk until the poller reads 0 free plus the tail; wrk's figures
    and the poller's instants."""
    background = await settle(settle_s)
    sampler = CpuSampler(roots, interval_s=0.25).start()
    w = await Wrk(url, script, [*args, "2"], threads=2, connections=connections,
                  duration_s=max_sale_s + tail_s + 5).start()
    sampler.add_root("wrk", w.pid)
    t_zero: float | None = None
    deadline = time.time() + max_sale_s
    while time.time() < deadline:
        if await poll() == 0:
            t_zero = time.time()
            break
        await asyncio.sleep(0.002)
    if t_zero is not None:
        await asyncio.sleep(tail_s)
    w.interrupt()
    res = await w.result()
    cpu = await sampler.stop()
    ok = int(res["counts"].get("201", 0))
    first = res["first_request_ms"]
    sale_ms = res["last_ok_ms"] - first if ok else float("nan")
    bps = ok / (sale_ms / 1000) if ok and sale_ms > 0 else 0.0
    seconds = res["duration_us"] / 1e6
    return {
        "successes": ok,
        "bookings_per_s": round(bps, 1),
        "sellout_ms": round(t_zero * 1000 - first, 1) if t_zero is not None else None,
        "sale_ms": round(sale_ms, 1),
        "sale_latency_ms": round(connections / bps * 1000, 1) if bps else None,
        "latency_ms": latency_ms(res),
        "requests": res["requests"],
        "seconds": round(seconds, 2),
        "requests_per_s": round(res["requests"] / seconds, 1) if seconds else 0.0,
        "http_5xx": count_5xx(res),
        "socket_errors": socket_errors(res),
        "socket_errors_by_kind": res["errors"],
        "answers": status_mix(res),
        "cpu": cpu,
        "background_busy_pct_before": background,
    }


def _median(runs: list[dict[str, Any]], path: str) -> float | None:
    """Median over the runs no other work disturbed (all runs if none was clean)."""
    vals: list[float] = []
    for r in [r for r in runs if not r.get("noisy")] or runs:
        v: Any = r
        for part in path.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            vals.append(float(v))
    return round(statistics.median(vals), 2) if vals else None


def _summary(runs: list[dict[str, Any]], capacity: int) -> dict[str, Any]:
    return {
        "clean_runs": sum(1 for r in runs if not r.get("noisy")),
        "bookings_per_s": _median(runs, "bookings_per_s"),
        "sellout_ms": _median(runs, "sellout_ms"),
        "sale_ms": _median(runs, "sale_ms"),
        "sale_latency_ms": _median(runs, "sale_latency_ms"),
        "p50_ms": _median(runs, "latency_ms.p50"),
        "p99_ms": _median(runs, "latency_ms.p99"),
        "requests_per_s": _median(runs, "requests_per_s"),
        "http_5xx": sum(r["http_5xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "successes": [r["successes"] for r in runs],
        "exactly_c": all(r["successes"] == capacity for r in runs),
        "correct": all(r["correct"] for r in runs),
        "cpu_mean": {g: _median(runs, f"cpu.mean.{g}")
                     for g in ("ours_api", "relational_api", "redis", "postgres", "wrk", "bench",
                               "other")},
        "background_busy_pct_before": [r["background_busy_pct_before"] for r in runs],
        "machine_steal_pct": _median(runs, "cpu.machine_steal_pct"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


async def run_peers(quick: bool = False, *, repeats: int | None = None,
                    capacity: int | None = None, connections: int = 200,
                    workers: int = 2) -> dict[str, Any]:
    """Run the benchmark; one JSON-able dict (see the module docstring)."""
    ensure_wrk()
    repeats = repeats or (1 if quick else 3)
    capacity = capacity or (300 if quick else 1009)
    tail_s = 1.0 if quick else 2.0
    settle_s = 1.0 if quick else 30.0
    patients = 6000 if quick else 12000
    redis = RedisServer(appendonly=True, appendfsync="always")
    pg = PostgresServer()
    tmp = Path(tempfile.mkdtemp(prefix="haoyuan-peers-"))
    ours_proc = rel_proc = None
    started = time.time()
    try:
        redis.start()
        pg.start()
        admin = await asyncpg.connect(pg.dsn)
        await admin.execute("CREATE DATABASE relational")
        rel_dsn = pg.dsn_for("relational")
        rel = await asyncpg.connect(rel_dsn)
        from benchmarks.relational_app import SCHEMA

        await rel.execute(SCHEMA)
        ours_port, rel_port = free_port(), free_port()
        ours_url, rel_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{rel_port}"
        ours_proc = start_api(ours_port, workers, api_env(redis.url, pg.dsn), tmp / "ours.log")
        rel_proc = start_relational(rel_port, workers, rel_dsn, tmp / "relational.log")
        await wait_http(ours_url + "/healthz", 60)
        await wait_http(rel_url + "/healthz", 60)
        await asyncio.sleep(1.0)  # every worker through its lifespan startup
        rows = tmp / "patients.tsv"
        await prepare_patients(pg.dsn, patients, rows, redis_url=redis.url)
        script = tmp / "spike.lua"
        script.write_text(SPIKE_LUA)
        roots = {"ours_api": ours_proc.pid, "relational_api": rel_proc.pid,
                 "redis": redis.pid or 0, "postgres": pg.pid or 0, "bench": os.getpid()}
        pool = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=4)
        async with Engine.connect(redis.url, EngineConfig()) as eng:
            n = 0
            ours_sids: list[str] = []
            ours_units = 0

            async def ours(keyed: bool, cap: int) -> dict[str, Any]:
                nonlocal n, ours_units
                n += 1
                ours_units += cap
                sid, dept = f"HOT{n}", f"HD{n}"
                await import_sessions(ours_url, [_spec(sid, dept, cap)])
                free_key = K.SessionKeys(K.partition_of(dept, DATE), sid).free

                async def poll() -> int:
                    return int(await eng.client.zcard(free_key))

                r = await _spike(ours_url + "/v1/holds", script,
                                 [str(rows), sid, "A", "keyed" if keyed else "unkeyed", f"r{n}"],
                                 poll, cap, roots, connections=connections, tail_s=tail_s,
                                 settle_s=settle_s)
                a = await eng.audit(sid)
                r["check"] = {"audit_ok": a.ok, "free": a.free, "held": a.held,
                              "booked": a.booked, "breaches": a.breaches[:5]}
                r["correct"] = (a.ok and a.free == 0 and a.held + a.booked == cap
                                and r["successes"] == cap)
                ours_sids.append(sid)
                return r

            async def relational(cap: int) -> dict[str, Any]:
                nonlocal n
                n += 1
                sid = f"REL{n}"
                await rel.execute("INSERT INTO slots VALUES ($1, 'A', $2, $2)", sid, cap)

                async def poll() -> int:
                    return int(await rel.fetchval(
                        "SELECT remaining FROM slots WHERE session_id = $1 AND slot_id = 'A'", sid))

                r = await _spike(rel_url + "/v1/holds", script,
                                 [str(rows), sid, "A", "unkeyed", f"r{n}"],
                                 poll, cap, roots, connections=connections, tail_s=tail_s,
                                 settle_s=settle_s)
                rows_n = await rel.fetchval("SELECT count(*) FROM bookings WHERE session_id = $1",
                                            sid)
                remaining = await rel.fetchval(
                    "SELECT remaining FROM slots WHERE session_id = $1", sid)
                r["check"] = {"booking_rows": rows_n, "remaining": remaining}
                r["correct"] = rows_n == cap and remaining == 0 and r["successes"] == cap
                return r

            async def set_mode(mode: str) -> None:
                fsync, commit = MODES[mode]
                await eng.client.config_set("appendfsync", fsync)
                await admin.execute(f"ALTER SYSTEM SET synchronous_commit = '{commit}'")
                await admin.execute("SELECT pg_reload_conf()")
                await asyncio.sleep(0.5)

            runners: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
                "ours": lambda c: ours(False, c),
                "ours_keyed": lambda c: ours(True, c),
                "relational": relational,
            }
            # Warm-up (not recorded): both apps, every worker, pools and caches.
            await set_mode("fsync")
            for v in VARIANTS:
                await runners[v](100)
            results: dict[str, dict[str, list[dict[str, Any]]]] = {
                m: {v: [] for v in VARIANTS} for m in MODES}
            discarded: list[dict[str, Any]] = []
            for rep in range(repeats):
                for mode in MODES:
                    await set_mode(mode)
                    order = VARIANTS if rep % 2 == 0 else tuple(reversed(VARIANTS))
                    for v in order:
                        for attempt in range(3):
                            run = await runners[v](capacity)
                            run["noisy"] = noisy(run["cpu"])
                            if not run["noisy"] or attempt == 2:
                                break
                            discarded.append({
                                "mode": mode, "variant": v, "correct": run["correct"],
                                "successes": run["successes"],
                                "bookings_per_s": run["bookings_per_s"],
                                "other_cpu": run["cpu"]["mean"].get("other")})
                        results[mode][v].append(run)
                        log.info("peers %s %s: %s bookings/s, sold out in %s ms, p99 %s ms%s",
                                 mode, v, run["bookings_per_s"], run["sellout_ms"],
                                 run["latency_ms"]["p99"], " (noisy)" if run["noisy"] else "")
            end_to_end = await confirm_and_persist(eng, pool, ours_sids)
        await pool.close()
        await rel.close()
        await admin.close()

        modes_out: dict[str, Any] = {}
        for mode, per in results.items():
            s = {v: _summary(per[v], capacity) for v in VARIANTS}
            o, k, r = s["ours"], s["ours_keyed"], s["relational"]
            modes_out[mode] = {
                "redis_appendfsync": MODES[mode][0],
                "pg_synchronous_commit": MODES[mode][1],
                **s,
                "ratio_ours_to_relational": {
                    "bookings_per_s": _ratio(o["bookings_per_s"], r["bookings_per_s"]),
                    "bookings_per_s_keyed": _ratio(k["bookings_per_s"], r["bookings_per_s"]),
                    "sellout_speedup": _ratio(r["sellout_ms"], o["sellout_ms"]),
                    "sellout_speedup_keyed": _ratio(r["sellout_ms"], k["sellout_ms"]),
                    "p99_relational_over_ours": _ratio(r["p99_ms"], o["p99_ms"]),
                    "p99_relational_over_ours_keyed": _ratio(r["p99_ms"], k["p99_ms"]),
                },
                "runs": per,
            }
        correct = all(modes_out[m][v]["correct"] and modes_out[m][v]["exactly_c"]
                      for m in MODES for v in VARIANTS) and all(d["correct"] for d in discarded)
        return {
            "benchmark": "peers",
            "capacity": capacity,
            "connections": connections,
            "wrk_threads": 2,
            "workers_per_app": workers,
            "repeats": repeats,
            "tail_s": tail_s,
            "distinct_patients": patients,
            "modes": modes_out,
            "end_to_end_ours": end_to_end,
            "discarded_noisy_runs": discarded,
            "noisy_other_pct": NOISY_OTHER_PCT,
            "all_correct": bool(correct and end_to_end["audit_ok"]
                                and end_to_end["booked_postgres"] == ours_units
                                and end_to_end["booked_redis"] == ours_units),
            "elapsed_s": round(time.time() - started, 1),
            "hardware": hardware("2 cores shared by wrk, both apps' granian workers (2 each), "
                                 "Redis, PostgreSQL and the benchmark process"),
        }
    except BaseException:
        print(f"exit status: ours {None if ours_proc is None else ours_proc.poll()}, "
              f"relational {None if rel_proc is None else rel_proc.poll()}", file=sys.stderr)
        dump_logs(tmp)
        raise
    finally:
        stop_process(ours_proc)
        stop_process(rel_proc)
        pg.cleanup()
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
