"""The Peking-scale release morning through haoyuan's API.

Peking University School of Stomatology released 1,009 units a day to about
200,000 visits in the first minute, over 20,000 requests/s at peak. This
benchmark offers that morning to our API on this machine's 2 cores and
reports what the server answered, where the CPU went, and whether every
unit was sold exactly once.

    haoyuan bench peking [--quick] [--json]

Methodology
-----------
- 20 doctors' sessions (5 departments x 4 doctors, AM, 4 slots each)
  summing to 1,009 units, imported through the admin API with a release
  instant a few seconds ahead (5 s; 2 s with ``--quick``) on a whole second.
- The crowd: ``wrk`` (2 threads, 1,000 connections) starts before the
  release (the refresh storm: "not open yet") and runs 60 s after it
  (12 s with ``--quick``). Its Lua script mixes, per request: 35% holds
  without an Idempotency-Key (a press from the page), 30% holds with a fresh
  key (the mini-program), 25% session availability, 10% department-day
  availability; each hold for a random patient of 40,000 (8,000 with
  ``--quick``) real accounts with a bound patient, on a random session and
  slot.
- The API runs as deployed: granian, 2 workers, production defaults (GCRA
  rate limits per account and patient, admission control at 512 engine
  calls in flight per worker, sold-out and availability micro-caches);
  Redis with AOF ``appendfsync always``.
- wrk is a closed loop: each connection sends its next request when the
  previous one is answered, so the *offered* rate equals the answered rate
  (plus what is in flight). 20,000 requests/s can only be offered if the
  server answers that fast; the figures say whether it did.
- Measured: answers by status and problem type, per wall-clock second
  (wrk's Lua ``response()`` with a LuaJIT ffi clock); p50/p99 (wrk, whole
  run); requests answered in the first 60 s after the release; the peak
  second; 5xx and socket errors; the instant all 1,009 units were gone
  (a poller reads every session's free units every 20 ms); CPU by process
  group from /proc every 0.5 s (granian workers, wrk, Redis, PostgreSQL,
  this process, and anything else on the machine).
- Correctness: exactly 1,009 successful holds (201), and the engine's audit
  per session (conservation, no unit twice, free = 0, held = capacity).
  After the last repeat every hold is paid through the engine, the writer
  drains the outbox into PostgreSQL and ``run_audit`` compares both.
- Medians over repeats (3; 1 with ``--quick``), each on a fresh date.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
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
    status_mix,
    stop_process,
    wait_http,
)
from engine import keys as K
from engine.engine import Engine, EngineConfig
from engine.model import SessionSpec, SlotSpec
from engine.servers import PostgresServer, RedisServer, free_port

__all__ = ["run_peking"]

log = logging.getLogger("haoyuan.bench")

UNITS = 1009
DEPTS = 5
DOCTORS_PER_DEPT = 4
SLOTS = ("0800", "0830", "0900", "0930")
TARGET_FIRST_MINUTE = 200_000
TARGET_PEAK_PER_S = 20_000
#: Request mix (cumulative thresholds in the Lua script).
MIX = {"session_availability": 0.25, "dept_day_availability": 0.10,
       "hold_unkeyed": 0.35, "hold_keyed": 0.30}

PEKING_LUA = LUA_COMMON + r"""
local rows, sessions, date, tag
local k = 0
function init(args)
  rows = load_rows(args[1])
  sessions = load_rows(args[2])   -- session id, dept, slot ids (comma separated)
  for _, s in ipairs(sessions) do
    local slots = {}
    for x in s[3]:gmatch("[^,]+") do slots[#slots + 1] = x end
    s[3] = slots
  end
  date, tag = args[3], args[4]
  p_sess = tonumber(args[5]); p_dept = tonumber(args[6]); p_unkeyed = tonumber(args[7])
  math.randomseed(7919 * (tid + 1) + #tag)
end
function request()
  hy_mark()
  k = k + 1
  local x = math.random()
  local s = sessions[math.random(#sessions)]
  if x < p_sess then
    return wrk.format("GET", "/v1/sessions/" .. s[1] .. "/availability")
  elseif x < p_dept then
    return wrk.format("GET", "/v1/departments/" .. s[2] .. "/days/" .. date .. "/availability")
  end
  local r = rows[math.random(#rows)]
  local h = {["Authorization"] = "Bearer " .. r[1], ["Content-Type"] = "application/json"}
  if x >= p_unkeyed then h["Idempotency-Key"] = tag .. "-" .. tid .. "-" .. k end
  local slot = s[3][math.random(#s[3])]
  return wrk.format("POST", "/v1/holds", h,
    '{"session_id":"' .. s[1] .. '","slot_id":"' .. slot .. '","patient_id":"' .. r[2] .. '"}')
end
"""


def _morning(date: str, release_at_ms: int, tag: str) -> list[SessionSpec]:
    """20 sessions (5 departments x 4 doctors) with 1,009 units in all."""
    n = DEPTS * DOCTORS_PER_DEPT
    base, extra = divmod(UNITS, n)
    specs = []
    for i in range(n):
        dept = f"PK{tag}D{i // DOCTORS_PER_DEPT}"
        cap = base + (1 if i < extra else 0)
        q, r = divmod(cap, len(SLOTS))
        slots = [SlotSpec(slot_id=s, start=f"{s[:2]}:{s[2:]}",
                          end=f"{s[:2]}:{int(s[2:]) + 29:02d}",
                          capacity=q + (1 if j < r else 0)) for j, s in enumerate(SLOTS)]
        specs.append(SessionSpec(
            session_id=f"PK{tag}S{i:02d}", hospital="PKUSS", dept=dept,
            doctor=f"DOC{tag}{i:02d}", date=date, period="AM", fee=1400,
            release_at_ms=release_at_ms, hold_ttl_ms=900_000, slots=slots))
    return specs


def _timeline(buckets: dict[str, int], release_s: int) -> list[dict[str, int]]:
    per: dict[int, dict[str, int]] = {}
    for key, v in buckets.items():
        sec, kind = key.split("|", 1)
        row = per.setdefault(int(sec) - release_s, {})
        row[kind] = row.get(kind, 0) + v
    out = []
    for t in sorted(per):
        row = per[t]
        out.append({"t": t, "answered": sum(row.values()), **dict(sorted(row.items()))})
    return out


async def _morning_run(api_url: str, script: Path, rows: Path, eng: Engine, roots: dict[str, int],
                       *, date: str, tag: str, pre_s: float, run_s: float, connections: int
                       ) -> dict[str, Any]:
    release_at_ms = math.ceil(time.time() + pre_s + 1.0) * 1000
    specs = _morning(date, release_at_ms, tag)
    await import_sessions(api_url, specs)
    sessions_file = script.with_name(f"sessions-{tag}.tsv")
    sessions_file.write_text("".join(f"{s.session_id}\t{s.dept}\t"
                                     f"{','.join(x.slot_id for x in s.slots)}\n" for s in specs))
    free_keys = [K.SessionKeys(K.partition_of(s.dept, s.date), s.session_id).free for s in specs]
    sampler = CpuSampler(roots, interval_s=0.5).start()
    duration = (release_at_ms / 1000 - time.time()) + run_s
    p1 = MIX["session_availability"]
    p2 = p1 + MIX["dept_day_availability"]
    p3 = p2 + MIX["hold_unkeyed"]
    w = await Wrk(api_url, script, [str(rows), str(sessions_file), date, tag, str(p1), str(p2),
                                    str(p3)], threads=2, connections=connections,
                  duration_s=duration, timeout_s=10).start()
    sampler.add_root("wrk", w.pid)
    free_series: list[tuple[float, int]] = []
    sold_out_at: float | None = None
    deadline = w.launched_at + duration + 1
    while time.time() < deadline and w.proc is not None and w.proc.returncode is None:
        pipe = eng.client.pipeline(transaction=False)
        for key in free_keys:
            pipe.zcard(key)
        free = sum(int(x) for x in await pipe.execute())
        now = time.time()
        if not free_series or now - free_series[-1][0] >= 0.25:
            free_series.append((now, free))
        if free == 0 and sold_out_at is None:
            sold_out_at = now
        await asyncio.sleep(0.02)
    res = await w.result()
    cpu = await sampler.stop()

    release_s = release_at_ms // 1000
    timeline = _timeline(res["buckets"], release_s)
    after = [r for r in timeline if 0 <= r["t"] < 60]
    before = [r for r in timeline if r["t"] < 0]
    first_minute = sum(r["answered"] for r in after)
    full_secs = [r["answered"] for r in after[1:-1]] or [r["answered"] for r in after]
    audits = [await eng.audit(s.session_id) for s in specs]
    ok = int(res["counts"].get("201", 0))
    seconds = res["duration_us"] / 1e6
    answers = status_mix(res)
    api_cpu_ms = cpu["mean"].get("api", 0.0) / 100 * seconds * 1000
    return {
        "release_at_ms": release_at_ms,
        "wrk_seconds": round(seconds, 2),
        "requests": res["requests"],
        "requests_per_s": round(res["requests"] / seconds, 1) if seconds else 0.0,
        "answered_first_minute": first_minute,
        "answered_per_s_after_release": round(statistics.mean(full_secs), 1) if full_secs else 0,
        "peak_second": max((r["answered"] for r in timeline), default=0),
        "answered_per_s_before_release": round(
            statistics.mean(r["answered"] for r in before[1:]), 1) if len(before) > 1 else None,
        "latency_ms": latency_ms(res),
        "answers": answers,
        "http_5xx": count_5xx(res),
        "socket_errors": socket_errors(res),
        "socket_errors_by_kind": res["errors"],
        "error_rate": round((count_5xx(res) + socket_errors(res)) / max(1, res["requests"]), 5),
        "shed_429": answers.get("429:overloaded", 0),
        "rate_limited_429": answers.get("429:rate-limited", 0),
        "successes": ok,
        "sold_out_after_release_ms": round(sold_out_at * 1000 - release_at_ms)
        if sold_out_at is not None else None,
        "last_success_after_release_ms": round(res["last_ok_ms"] - release_at_ms) if ok else None,
        "audit": {
            "ok": all(a.ok for a in audits),
            "capacity": sum(a.capacity for a in audits),
            "free": sum(a.free for a in audits),
            "held": sum(a.held for a in audits),
            "booked": sum(a.booked for a in audits),
            "breaches": [b for a in audits for b in a.breaches][:10],
        },
        "correct": ok == UNITS and all(a.ok for a in audits)
        and sum(a.held + a.booked for a in audits) == UNITS
        and sum(a.free for a in audits) == 0,
        "free_units": [(round(t * 1000 - release_at_ms), f) for t, f in free_series
                       if -1000 <= t * 1000 - release_at_ms <= 5000 or f == 0][:40],
        "timeline": timeline,
        "cpu": cpu,
        "api_cpu_ms_per_answer": round(api_cpu_ms / max(1, res["requests"]), 3),
        "session_ids": [s.session_id for s in specs],
    }


def _med(runs: list[dict[str, Any]], *path: str) -> float | None:
    """Median over the runs no other work disturbed (all runs if none was clean)."""
    vals = []
    for r in [r for r in runs if not r.get("noisy")] or runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            vals.append(float(v))
    return round(statistics.median(vals), 1) if vals else None


def _med3(runs: list[dict[str, Any]], key: str) -> float | None:
    clean = [r for r in runs if not r.get("noisy")] or runs
    return round(statistics.median(float(r[key]) for r in clean), 3) if clean else None


async def run_peking(quick: bool = False, *, repeats: int | None = None,
                     connections: int = 1000, workers: int = 2) -> dict[str, Any]:
    """Run the benchmark; one JSON-able dict (see the module docstring)."""
    ensure_wrk()
    repeats = repeats or (1 if quick else 3)
    pre_s, run_s = (2.0, 12.0) if quick else (5.0, 60.0)
    patients = 8000 if quick else 40000
    redis = RedisServer(appendonly=True, appendfsync="always")
    pg = PostgresServer()
    tmp = Path(tempfile.mkdtemp(prefix="haoyuan-peking-"))
    proc = None
    started = time.time()
    try:
        redis.start()
        pg.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_api(port, workers, api_env(redis.url, pg.dsn), tmp / "api.log")
        await wait_http(url + "/healthz", 60)
        await asyncio.sleep(1.0)
        rows, warm_rows = tmp / "patients.tsv", tmp / "warm.tsv"
        await prepare_patients(pg.dsn, patients, rows)
        await prepare_patients(pg.dsn, 500, warm_rows, offset=patients)
        script = tmp / "peking.lua"
        script.write_text(PEKING_LUA)
        roots = {"api": proc.pid, "redis": redis.pid or 0, "postgres": pg.pid or 0,
                 "bench": os.getpid()}
        pool = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=4)
        runs: list[dict[str, Any]] = []
        background: list[float] = []
        async with Engine.connect(redis.url, EngineConfig()) as eng:
            # Warm-up (not recorded): a short morning of other patients on another day.
            await _morning_run(url, script, warm_rows, eng, roots, date="2027-04-30", tag="W",
                               pre_s=0.5, run_s=2.0, connections=connections)
            discarded: list[dict[str, Any]] = []
            sids: list[str] = []
            idx = 0
            for _ in range(repeats):
                for attempt in range(2):
                    idx += 1
                    background.append(await settle(3.0 if quick else 60.0))
                    run = await _morning_run(
                        url, script, rows, eng, roots, date=f"2027-04-{idx:02d}",
                        tag=f"R{idx}", pre_s=pre_s, run_s=run_s, connections=connections)
                    sids += run.pop("session_ids")
                    run["noisy"] = noisy(run["cpu"])
                    log.info("peking %s: %s answered/s after the release, %s in the first"
                             " minute, sold out at +%s ms, p99 %s ms%s", idx,
                             run["answered_per_s_after_release"], run["answered_first_minute"],
                             run["sold_out_after_release_ms"], run["latency_ms"]["p99"],
                             " (noisy)" if run["noisy"] else "")
                    if not run["noisy"] or attempt == 1:
                        break
                    discarded.append({k: run[k] for k in (
                        "correct", "successes", "answered_per_s_after_release", "requests")}
                        | {"other_cpu": run["cpu"]["mean"].get("other")})
                runs.append(run)
            end_to_end = await confirm_and_persist(eng, pool, sids)
        await pool.close()
        answered = _med(runs, "answered_per_s_after_release")
        peak = _med(runs, "peak_second")
        first_minute = _med(runs, "answered_first_minute")
        mins = run_s / 60
        return {
            "benchmark": "peking",
            "units": UNITS,
            "sessions": DEPTS * DOCTORS_PER_DEPT,
            "connections": connections,
            "wrk_threads": 2,
            "workers": workers,
            "repeats": repeats,
            "pre_release_s": pre_s,
            "after_release_s": run_s,
            "distinct_patients": patients,
            "mix": MIX,
            "clean_runs": sum(1 for r in runs if not r["noisy"]),
            "answered_per_s": answered,
            "peak_second": peak,
            "answered_first_minute": first_minute,
            "p50_ms": _med(runs, "latency_ms", "p50"),
            "p99_ms": _med(runs, "latency_ms", "p99"),
            "error_rate": _med(runs, "error_rate"),
            "http_5xx": sum(r["http_5xx"] for r in runs),
            "socket_errors": sum(r["socket_errors"] for r in runs),
            "sold_out_after_release_ms": _med(runs, "sold_out_after_release_ms"),
            "last_success_after_release_ms": _med(runs, "last_success_after_release_ms"),
            "successes": [r["successes"] for r in runs],
            "all_correct": bool(all(r["correct"] for r in runs)
                                and all(d["correct"] for d in discarded)
                                and end_to_end["audit_ok"]
                                and end_to_end["booked_postgres"] == UNITS * idx
                                and end_to_end["booked_redis"] == UNITS * idx),
            "discarded_noisy_runs": discarded,
            "noisy_other_pct": NOISY_OTHER_PCT,
            "end_to_end": end_to_end,
            "target": {
                "first_minute": TARGET_FIRST_MINUTE,
                "peak_per_s": TARGET_PEAK_PER_S,
                # the quick run lasts less than a minute: scaled to its length
                "first_minute_scaled_to_run": round(TARGET_FIRST_MINUTE * min(1.0, mins)),
                "first_minute_reached": bool(first_minute is not None and first_minute
                                             >= TARGET_FIRST_MINUTE * min(1.0, mins)),
                "peak_reached": bool(peak is not None and peak >= TARGET_PEAK_PER_S),
                "note": "wrk is a closed loop: offered = answered + in flight",
            },
            "api_cpu_ms_per_answer": _med3(runs, "api_cpu_ms_per_answer"),
            "api_cores_for_target_peak": round(
                TARGET_PEAK_PER_S * (_med3(runs, "api_cpu_ms_per_answer") or 0) / 1000, 1),
            "cpu_mean": {g: _med(runs, "cpu", "mean", g)
                         for g in ("api", "wrk", "redis", "postgres", "bench", "other")},
            "machine_busy_pct": _med(runs, "cpu", "machine_busy_pct"),
            "machine_steal_pct": _med(runs, "cpu", "machine_steal_pct"),
            "background_busy_pct_before": background,
            "runs": runs,
            "elapsed_s": round(time.time() - started, 1),
            "hardware": hardware("2 cores shared by wrk, the API's 2 granian workers, Redis, "
                                 "PostgreSQL and the benchmark process"),
        }
    except BaseException:
        print(f"api server exit status: {None if proc is None else proc.poll()}", file=sys.stderr)
        dump_logs(tmp)
        raise
    finally:
        stop_process(proc)
        pg.cleanup()
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
