"""HTTP benchmark: hold throughput and p99 through the whole API, against the
ceiling of a bare hello-world endpoint of the same app, server and workers.

Methodology
-----------
- One private Redis (AOF, ``appendfsync everysec``, as the engine benchmark)
  and one private PostgreSQL (the catalogue, accounts, patients).
- The app runs under granian, ``--workers 2``, uvloop, access log off (both
  sides alike), engine rate limits off (otherwise every account is throttled
  to 2 holds/s and the run measures the limiter), bench endpoints mounted.
- Load from ``wrk`` (1 thread — it does 30k+ requests/s and leaves the
  second core to the server — 128 connections, ``--latency``); the POST
  bodies come from a Lua script that rotates 1,000 accounts (real tokens from
  ``POST /v1/auth/wechat``, each with one bound patient) over many
  single-slot sessions of distinct departments, so every hold request does
  the full work of a successful hold (token check, patient ref, one Lua
  script in Redis that takes a unit) and carries its own Idempotency-Key.
- Scenarios, each run ``repeats`` times, interleaved (hello, holds,
  sold-out): ``GET /bench/hello`` (the ceiling); ``POST /v1/holds`` that
  succeed (201); ``POST /v1/holds`` on a sold-out slot without an
  Idempotency-Key (409 from the per-worker sold-out cache; one Redis call
  per worker per cache period); the same with a new Idempotency-Key on every
  request (409 from the cache, stored under its key: one small batched
  script per request, so that a retry gets the same answer).
- Figures are medians over the repeats; p99 is wrk's latency distribution
  (median over repeats). Load generator, server workers, Redis and
  PostgreSQL share this machine's cores: say so with the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from engine.engine import Engine, EngineConfig
from engine.model import SessionSpec, SlotSpec
from engine.pii import check_digit
from engine.testing.servers import PostgresServer, RedisClusterServer, RedisServer, free_port

__all__ = ["run_http_bench"]

_ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = 1000
DEPTS = 200  # sessions per repeat (half in a quick run): one per department
_ADMIN = "bench-admin-token-0123456789"
_TOKEN_SECRET = "bench-token-secret-0123456789"


def _national_id(i: int) -> str:
    first = f"110101{1950 + i % 50:04d}{1 + i % 12:02d}{1 + i % 28:02d}{i % 1000:03d}"
    return first + check_digit(first)


def _spec(sid: str, dept: str, date: str, capacity: int) -> SessionSpec:
    return SessionSpec(
        session_id=sid, hospital="BENCH", dept=dept, doctor=f"DOC-{dept}", date=date,
        period="AM", fee=1000, release_at_ms=0, hold_ttl_ms=600_000,
        slots=[SlotSpec(slot_id="A", start="08:00", end="08:30", capacity=capacity)],
    )


def _hold_lua(tokens: list[str], patients: list[str], sessions: list[str]) -> str:
    def arr(xs: list[str]) -> str:
        return "{" + ",".join(f'"{x}"' for x in xs) + "}"

    return f"""
local tokens = {arr(tokens)}
local patients = {arr(patients)}
local sessions = {arr(sessions)}
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local k = 0
function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  keyed = args[1] == "keyed"
  stride = tonumber(args[2]) or 2
end
function request()
  local g = k * stride + tid
  k = k + 1
  local a = g % #tokens + 1
  local s = math.floor(g / #tokens) % #sessions + 1
  local h = {{["Authorization"] = "Bearer " .. tokens[a], ["Content-Type"] = "application/json"}}
  if keyed then h["Idempotency-Key"] = "b" .. tid .. "-" .. k end
  local body = '{{"session_id":"' .. sessions[s] .. '","slot_id":"A","patient_id":"' ..
               patients[a] .. '"}}'
  return wrk.format("POST", "/v1/holds", h, body)
end
"""


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _parse_wrk(out: str) -> dict[str, float]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    p99 = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": p99,
        "requests": float(total.group(1)) if total else 0.0,
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(sum(int(x) for x in errors.groups())) if errors else 0.0,
    }


async def _wrk(url: str, seconds: float, script: Path | None = None, *args: str,
               threads: int = 1, connections: int = 128) -> dict[str, float]:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if args:
        cmd += ["--", *args]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode()
    if proc.returncode != 0 or "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed: {text[-500:]}")
    return _parse_wrk(text)


def _ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    raise RuntimeError("wrk is not installed: apt-get install wrk")


def _hardware() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "note": "load generator, 2 server workers, Redis and PostgreSQL share these cores"}


async def _redis_usec(url: str) -> float:
    """Microseconds Redis has spent in commands (INFO commandstats, all)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        stats = await r.info("commandstats")
    finally:
        await r.aclose()
    return float(sum(v.get("usec", 0) for v in stats.values() if isinstance(v, dict)))


async def _wait_http(url: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient() as c:
        while True:
            try:
                if (await c.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def _setup_accounts(dsn: str, redis_url: str, n: int, *,
                          cluster: bool = False) -> tuple[list[str], list[str]]:
    """Accounts and bound patients written through the store and the binding
    mirror (what POST /v1/auth/wechat and POST /v1/patients do), tokens minted
    with the server's secret: a thousand HTTP logins would take much of a
    quick run."""
    import asyncpg

    from api.auth import TokenSigner
    from api.settings import dev_crypto
    from engine.store import queries as q
    from engine.store.migrate import migrate

    await migrate(dsn)
    crypto = dev_crypto()
    signer = TokenSigner(_TOKEN_SECRET, 3600)
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)
    sem = asyncio.Semaphore(4)

    async def one(eng: Engine, i: int) -> tuple[str, str]:
        async with sem, pool.acquire() as conn:
            acct = await q.create_account(conn, crypto.openid_hash(f"bench{i}"))
            view = await q.bind_patient(conn, crypto, acct, "测试", "13800000000",
                                        _national_id(i), verification="data")
        await eng.mirror_binding(acct, view.patient_id, view.ref)
        return signer.mint(acct)[0], view.patient_id

    try:
        async with Engine.connect(redis_url, EngineConfig(cluster=cluster)) as eng:
            got = await asyncio.gather(*(one(eng, i) for i in range(n)))
    finally:
        await pool.close()
    return [t for t, _ in got], [p for _, p in got]


async def _import(base: str, specs: list[SessionSpec]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        for i in range(0, len(specs), 200):
            r = await c.post("/v1/admin/sessions", content=msgspec.json.encode(specs[i:i + 200]),
                             headers={"Authorization": f"Bearer {_ADMIN}",
                                      "Content-Type": "application/json"})
            r.raise_for_status()


async def run_http_bench(quick: bool = False, *, workers: int = 2,
                         repeats: int | None = None, cluster: bool = False) -> dict[str, Any]:
    """Run the benchmark; one dict of figures (see the module docstring).
    ``cluster``: the API's Redis is a private 3-primary Redis Cluster."""
    _ensure_wrk()
    repeats = repeats or 3
    seconds = 3.0 if quick else 10.0
    redis: Any = (RedisClusterServer(masters=3, appendonly=True, appendfsync="everysec")
                  if cluster else RedisServer(appendonly=True, appendfsync="everysec"))
    pg = PostgresServer()
    tmp = Path(tempfile.mkdtemp(prefix="haoyuan-http-bench-"))
    server: subprocess.Popen[bytes] | None = None
    t_start = time.monotonic()
    try:
        redis.start()
        pg.start()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env.update({
            "HAOYUAN_ENV": "development",  # bench endpoints, development keys and logins
            "HAOYUAN_REDIS_URL": redis.url, "HAOYUAN_PG_DSN": pg.dsn,
            "HAOYUAN_REDIS_CLUSTER": "1" if cluster else "0",
            "HAOYUAN_BENCH_ENDPOINTS": "1", "HAOYUAN_ACCESS_LOG": "0",
            "HAOYUAN_ADMIN_TOKEN": _ADMIN, "HAOYUAN_LOG_LEVEL": "warning",
            "HAOYUAN_TOKEN_SECRET": _TOKEN_SECRET,
            "HAOYUAN_ACCOUNT_RATE_PER_S": "0", "HAOYUAN_PATIENT_RATE_PER_S": "0",
        })
        log = (tmp / "server.log").open("wb")
        server = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "api.serve", "--port", str(port), "--workers", str(workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=_ROOT)
        await _wait_http(base + "/bench/hello")
        await asyncio.sleep(1.0)  # let every worker finish its lifespan startup
        await _wait_http(base + "/readyz")

        # Sessions: a warm-up set and one set per repeat, DEPTS single-slot sessions each.
        depts = DEPTS // 2 if quick else DEPTS
        dates = [f"2027-01-{d + 1:02d}" for d in range(repeats + 1)]
        per_set = [[f"B{d}x{j}" for j in range(depts)] for d in range(len(dates))]
        specs = [_spec(sid, f"BD{j}", dates[d], ACCOUNTS)
                 for d, sids in enumerate(per_set) for j, sid in enumerate(sids)]
        specs.append(_spec("SOLDOUT", "BDSOLD", dates[0], 0))
        await _import(base, specs)
        tokens, patients = await _setup_accounts(pg.dsn, redis.url, ACCOUNTS, cluster=cluster)
        setup_s = time.monotonic() - t_start

        scripts = [tmp / f"hold-{i}.lua" for i in range(len(per_set))]
        for path, sids in zip(scripts, per_set, strict=True):
            path.write_text(_hold_lua(tokens, patients, sids))
        sold = tmp / "soldout.lua"
        sold.write_text(_hold_lua(tokens, patients, ["SOLDOUT"]))

        # Warm-up: JIT-free Python still warms caches (patient refs, session refs).
        await _wrk(base + "/v1/holds", 2.0, scripts[0], "keyed")
        await _wrk(base + "/bench/hello", 1.0)

        hello: list[dict[str, float]] = []
        holds: list[dict[str, float]] = []
        soldout: list[dict[str, float]] = []
        keyed: list[dict[str, float]] = []
        redis_us: list[float] = []  # Redis CPU per hold request, each run
        for r in range(repeats):
            hello.append(await _wrk(base + "/bench/hello", seconds))
            before = None if cluster else await _redis_usec(redis.url)
            holds.append(await _wrk(base + "/v1/holds", seconds, scripts[r + 1], "keyed"))
            if before is not None and holds[-1]["requests"]:
                redis_us.append((await _redis_usec(redis.url) - before) / holds[-1]["requests"])
            soldout.append(await _wrk(base + "/v1/holds", seconds, sold, "unkeyed"))
            keyed.append(await _wrk(base + "/v1/holds", seconds, sold, "keyed"))

        def med(xs: list[dict[str, float]], k: str) -> float:
            return round(statistics.median(x[k] for x in xs), 2)

        ceiling = med(hello, "rps")
        holds_per_s = med(holds, "rps")
        soldout_per_s = med(soldout, "rps")
        keyed_per_s = med(keyed, "rps")
        hold_requests = sum(x["requests"] for x in holds)
        hold_refused = sum(x["non2xx"] for x in holds)
        # The hold's real bound on these cores: the hello ceiling's machine CPU
        # per request (cores / hello rate: the hello runs keep both cores busy)
        # plus what Redis spends per hold, from INFO commandstats of the runs.
        cores = os.cpu_count() or 1
        redis_us_per_hold = round(statistics.median(redis_us), 1) if redis_us else None
        bound = (cores / (cores / ceiling + redis_us_per_hold / 1e6)
                 if ceiling and redis_us_per_hold is not None else None)
        return {
            "redis_us_per_hold": redis_us_per_hold,
            "hold_bound_per_s": round(bound) if bound else None,
            "hold_vs_bound": round(holds_per_s / bound, 3) if bound else None,
            "hold_bound_is": "cores / (cores / hello rate + Redis CPU per hold); Redis CPU from"
                             " INFO commandstats (single node only)",
            "server": "granian",
            "workers": workers,
            "seconds": seconds,
            "repeats": repeats,
            "ceiling_per_s": ceiling,
            "holds_per_s": holds_per_s,
            "soldout_per_s": soldout_per_s,
            "hold_ratio": round(holds_per_s / ceiling, 3) if ceiling else 0.0,
            "soldout_ratio": round(soldout_per_s / ceiling, 3) if ceiling else 0.0,
            "soldout_keyed_per_s": keyed_per_s,
            "soldout_keyed_ratio": round(keyed_per_s / ceiling, 3) if ceiling else 0.0,
            "soldout_keyed_p99_ms": med(keyed, "p99_ms"),
            "p99_ms": med(holds, "p99_ms"),
            "soldout_p99_ms": med(soldout, "p99_ms"),
            "ceiling_p99_ms": med(hello, "p99_ms"),
            "hold_non_201_share": round(hold_refused / hold_requests, 4) if hold_requests else 0,
            "soldout_non_409_share": round(
                1 - sum(x["non2xx"] for x in soldout) / max(1, sum(x["requests"] for x in soldout)),
                4),
            "socket_errors": sum(x["socket_errors"] for x in hello + holds + soldout + keyed),
            "setup_s": round(setup_s, 1),
            "total_s": round(time.monotonic() - t_start, 1),
            "runs": {"hello": [x["rps"] for x in hello], "holds": [x["rps"] for x in holds],
                     "soldout": [x["rps"] for x in soldout],
                     "soldout_keyed": [x["rps"] for x in keyed]},
            "hardware": _hardware(),
        }
    except Exception:
        with contextlib.suppress(OSError):
            tail = (tmp / "server.log").read_text(errors="replace")[-3000:]
            print(f"benchmarks.http_bench: server log tail:\n{tail}", file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
        pg.cleanup()
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
