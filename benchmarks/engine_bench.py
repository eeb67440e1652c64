"""Engine benchmark: holds/s and sold-out answers/s of one Python process
through the engine, measured in the same run as ``redis-benchmark`` running
the same hold script by EVALSHA (the ceiling), on the same private Redis.

Both sides hit sessions of 9,999-unit slots with distinct patients, so the
script does the full work of a successful hold (rate limits, idempotency
record, rule check, reclaim scan, unit taken, record written). The load
generator and the server share this machine's cores: say so with the figure.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
import uuid
from typing import Any

from engine import keys as K
from engine.engine import Engine, EngineConfig
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import Held, Reason
from engine.testing.servers import RedisServer

UNITS_PER_SESSION = 9999


def _spec(sid: str, dept: str, capacity: int) -> SessionSpec:
    return SessionSpec(
        session_id=sid, hospital="BENCH", dept=dept, doctor=f"DOC-{sid}", date="2026-12-01",
        period="AM", fee=1000, release_at_ms=0, hold_ttl_ms=600_000,
        slots=[SlotSpec(slot_id="A", start="08:00", end="08:30", capacity=capacity)],
    )


def hardware() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            model = m.group(1).strip() if m else ""
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "note": "load generator and server share the same cores"}


async def _engine_holds(eng: Engine, sid: str, n: int, concurrency: int) -> float:
    """Distinct patients hold units of one session; returns decisions/s."""
    tag = uuid.uuid4().hex[:8]
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            r = await eng.hold(sid, "A", patient=f"{tag}-{i}", account=f"{tag}-a{i}")
            if not isinstance(r, Held) and r.reason is not Reason.SOLD_OUT:
                raise RuntimeError(f"unexpected answer {r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


def _redis_benchmark(port: int, sid: str, p: int, n: int, pipeline: int, sha: str,
                     clients: int = 50) -> float:
    # The same KEYS and ARGV as Engine.hold (a distinct patient, account and
    # request id per call through redis-benchmark's __rand_int__).
    sk, pk = K.SessionKeys(p, sid), K.PartitionKeys(p)
    keys = [*sk.bundle(pk.rule("dept", sid, f"DOC-{sid}", "2026-12-01")),
            pk.idempotency("a__rand_int__", "k__rand_int__"),
            pk.rate_account("a__rand_int__"), pk.rate_patient("p__rand_int__")]
    args = [sid, "A", "p__rand_int__", "a__rand_int__", "0", "0", "1", "0", "1",
            "600000", "3", "0", "0", "0.5", "a__rand_int__:k__rand_int__"]
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(n), "-c",
           str(clients), "-P", str(pipeline), "-r", "100000000", "-q", "--csv",
           "EVALSHA", sha, str(len(keys)), *keys, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    # CSV: "test","rps",...
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0].startswith("EVALSHA"):
            return float(cells[1])
    raise RuntimeError(f"redis-benchmark printed no rate: {out!r}")


async def run_engine_bench(*, quick: bool = False, repeats: int | None = None,
                           redis_url: str | None = None, n: int = 9999) -> dict[str, Any]:
    if shutil.which("redis-benchmark") is None:
        raise RuntimeError("redis-benchmark is not installed (Debian package redis-tools)")
    repeats = repeats or (3 if quick else 5)
    server = None
    if redis_url is None:
        # Same persistence for both sides; everysec is the common production mode.
        server = RedisServer(appendonly=True, appendfsync="everysec").start()
        redis_url = server.url
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    cfg = EngineConfig(account_rate_per_s=0, patient_rate_per_s=0, pipelines_in_flight=2)
    ours, ceiling, ceiling_unpiped, soldout = [], [], [], []
    try:
        async with Engine.connect(redis_url, cfg) as eng:
            await eng.client.flushall()
            sha = eng.runner.scripts["holdUnit"].sha
            soldout_spec = _spec("BSOLD", "BSOLD", 0)
            await eng.load_session(soldout_spec)
            for r in range(repeats):
                # Ours: one engine process, many concurrent callers, batched.
                sid = f"BE{r}"
                await eng.load_session(_spec(sid, sid, n))
                ours.append(await _engine_holds(eng, sid, n, concurrency=256))
                # The ceiling: redis-benchmark, same script, 16-deep pipelines.
                sid = f"BC{r}"
                await eng.load_session(_spec(sid, sid, n))
                p = K.partition_of(sid, "2026-12-01")
                ceiling.append(await asyncio.to_thread(_redis_benchmark, port, sid, p, n, 16, sha))
                sid = f"BU{r}"
                await eng.load_session(_spec(sid, sid, n))
                p = K.partition_of(sid, "2026-12-01")
                ceiling_unpiped.append(
                    await asyncio.to_thread(_redis_benchmark, port, sid, p, n, 1, sha))
                soldout.append(await _engine_holds(eng, "BSOLD", n, concurrency=256))
            batches = eng.runner.calls_sent / max(1, eng.runner.pipelines_sent)
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
    holds = statistics.median(ours)
    ceil = statistics.median(ceiling)
    return {
        "holds_per_s": round(holds),
        "soldout_per_s": round(statistics.median(soldout)),
        "ceiling_per_s": round(ceil),
        "ceiling_unpipelined_per_s": round(statistics.median(ceiling_unpiped)),
        "ratio": round(holds / ceil, 3),
        "repeats": repeats,
        "decisions_per_repeat": n,
        "mean_batch": round(batches, 1),
        "samples": {"holds": [round(x) for x in ours], "ceiling": [round(x) for x in ceiling],
                    "ceiling_unpipelined": [round(x) for x in ceiling_unpiped],
                    "soldout": [round(x) for x in soldout]},
        "redis": "private redis-server, appendonly yes, appendfsync everysec",
        "hardware": hardware(),
    }


async def _confirm_run(url: str, n: int, concurrency: int) -> dict[str, float]:
    """Holds then confirmations through the engine; confirmations/s and latency."""
    cfg = EngineConfig(account_rate_per_s=0, patient_rate_per_s=0)
    async with Engine.connect(url, cfg) as eng:
        await eng.client.flushall()
        await eng.load_session(_spec("DUR", "DUR", n))
        tag = uuid.uuid4().hex[:8]
        held: list[str] = []
        todo = iter(range(n))

        async def holder() -> None:
            for i in todo:
                r = await eng.hold("DUR", "A", patient=f"{tag}-{i}", account=f"{tag}-a{i}")
                if isinstance(r, Held):
                    held.append(r.hold_id)

        await asyncio.gather(*(holder() for _ in range(concurrency)))
        lat: list[float] = []
        it = iter(held)

        async def confirmer() -> None:
            for hid in it:
                t = time.perf_counter()
                r = await eng.confirm(hid, "pay")
                lat.append((time.perf_counter() - t) * 1000)
                if not r.ok:
                    raise RuntimeError(f"confirm refused: {r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(confirmer() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    return {"confirms_per_s": len(held) / elapsed,
            "p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)]}


async def run_durability_bench(*, quick: bool = False, n: int = 0) -> dict[str, Any]:
    """Confirmations (each appends an outbox entry) under AOF always, AOF
    everysec and no persistence, side by side, medians over repeats."""
    n = n or (3000 if quick else 9999)
    repeats = 1 if quick else 3
    modes = {"aof_always": dict(appendonly=True, appendfsync="always"),
             "aof_everysec": dict(appendonly=True, appendfsync="everysec"),
             "none": dict(appendonly=False)}
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, kw in modes.items():
            server = RedisServer(**kw).start()  # type: ignore[arg-type]
            try:
                samples[mode].append(await _confirm_run(server.url, n, concurrency=128))
            finally:
                server.stop()
                server.cleanup()
    out: dict[str, Any] = {}
    for mode, runs in samples.items():
        out[mode] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    base = out["none"]["confirms_per_s"]
    for mode in modes:
        out[mode]["ratio_to_none"] = round(out[mode]["confirms_per_s"] / base, 3)
    out.update({"confirms_per_repeat": n, "repeats": repeats, "concurrency": 128,
                "hardware": hardware(),
                "note": "one engine process batching confirmations into pipelines; "
                        "AOF always fsyncs once per event-loop batch before replying"})
    return out


async def run_cluster_bench(*, quick: bool = False, repeats: int | None = None,
                            n: int = 9999) -> dict[str, Any]:
    """Engine holds/s of one process on a private 3-primary Redis Cluster
    and on a private single Redis, alternated in one run (same persistence,
    same calls: batched, one pipeline per node on the cluster), and the HTTP
    hold rate with the API on the cluster (``bench http`` with a cluster)."""
    from benchmarks.http_bench import run_http_bench
    from engine.testing.servers import RedisClusterServer

    repeats = repeats or (3 if quick else 5)
    cfg = dict(account_rate_per_s=0, patient_rate_per_s=0, pipelines_in_flight=2)
    single = RedisServer(appendonly=True, appendfsync="everysec").start()
    cluster = RedisClusterServer(masters=3, appendonly=True, appendfsync="everysec").start()
    on_single: list[float] = []
    on_cluster: list[float] = []
    batches: dict[str, float] = {}
    try:
        async with Engine.connect(single.url, EngineConfig(**cfg)) as one, \
                Engine.connect(cluster.url, EngineConfig(cluster=True, **cfg)) as many:
            for r in range(repeats):
                for name, eng, out in (("single", one, on_single),
                                       ("cluster", many, on_cluster)):
                    # Sessions spread over the partitions (and the cluster's nodes).
                    sids = [f"{name[0].upper()}{r}x{j}" for j in range(6)]
                    for sid in sids:
                        await eng.load_session(_spec(sid, sid, n // len(sids) + 1))
                    t0 = time.perf_counter()
                    await asyncio.gather(*(_engine_holds_timed(eng, sid, n // len(sids), 64)
                                           for sid in sids))
                    out.append(n // len(sids) * len(sids) / (time.perf_counter() - t0))
            batches = {"single": one.runner.calls_sent / max(1, one.runner.pipelines_sent),
                       "cluster": many.runner.calls_sent / max(1, many.runner.pipelines_sent)}
    finally:
        for s in (single, cluster):
            s.stop()
            s.cleanup()
    http = await run_http_bench(quick=True, repeats=1 if quick else 2, cluster=True)
    a, b = statistics.median(on_single), statistics.median(on_cluster)
    return {
        "holds_per_s_single": round(a),
        "holds_per_s_cluster": round(b),
        "ratio": round(b / a, 3),
        "http_holds_per_s_cluster": http["holds_per_s"],
        "http_hold_ratio_cluster": http["hold_ratio"],
        "mean_batch": {k: round(v, 1) for k, v in batches.items()},
        "repeats": repeats,
        "samples": {"single": [round(x) for x in on_single],
                    "cluster": [round(x) for x in on_cluster]},
        "redis": "private redis-server and 3-primary cluster, appendonly yes, everysec",
        "hardware": hardware(),
    }


async def _engine_holds_timed(eng: Engine, sid: str, n: int, concurrency: int) -> float:
    return await _engine_holds(eng, sid, n, concurrency)
