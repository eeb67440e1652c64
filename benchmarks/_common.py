"""What the peers and Peking benchmarks share: starting the two HTTP apps
under granian, real accounts and patients prepared in bulk, wrk runs whose
Lua script counts every answer by status and problem type (with a
wall-clock timeline), and CPU sampling of every process group from /proc.

Helpers of ``benchmarks.http_bench`` (wrk and hardware checks, HTTP readiness, the
admin import) are reused, not copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from api.auth import TokenSigner
from api.settings import dev_crypto
from benchmarks.http_bench import _ADMIN, _ensure_wrk, _hardware, _import, _parse_wrk, _wait_http
from engine.engine import Engine, EngineConfig
from engine.pii import check_digit

__all__ = [
    "ADMIN",
    "NOISY_OTHER_PCT",
    "TOKEN_SECRET",
    "CpuSampler",
    "Wrk",
    "api_env",
    "background_busy_pct",
    "dump_logs",
    "ensure_wrk",
    "hardware",
    "import_sessions",
    "noisy",
    "prepare_patients",
    "settle",
    "start_api",
    "start_relational",
    "stop_process",
    "wait_http",
]

ROOT = Path(__file__).resolve().parent.parent
ADMIN = _ADMIN
TOKEN_SECRET = "bench-token-secret-0123456789abcdef"
ensure_wrk = _ensure_wrk
wait_http = _wait_http
import_sessions = _import


def hardware(note: str) -> dict[str, Any]:
    hw = _hardware()
    hw["note"] = note
    with contextlib.suppress(OSError, ValueError):
        hw["mem_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return hw


# --------------------------------------------------------------------------- servers
def api_env(redis_url: str, pg_dsn: str, **extra: str) -> dict[str, str]:
    """Environment of haoyuan's API: production-like defaults (rate limits on,
    admission control on), no access log, our admin token and token secret."""
    env = dict(os.environ)
    env.update({
        "HAOYUAN_ENV": "development",  # development keys and dev-<openid> logins
        "HAOYUAN_REDIS_URL": redis_url, "HAOYUAN_PG_DSN": pg_dsn,
        "HAOYUAN_ACCESS_LOG": "0", "HAOYUAN_LOG_LEVEL": "warning",
        "HAOYUAN_ADMIN_TOKEN": ADMIN, "HAOYUAN_TOKEN_SECRET": TOKEN_SECRET,
    })
    env.update(extra)
    return env


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("wb")
    try:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    finally:
        fh.close()


def start_api(port: int, workers: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return _spawn(["-m", "api.serve", "--port", str(port), "--workers", str(workers)], env, log)


def start_relational(port: int, workers: int, dsn: str, log: Path,
                     pool_max: int = 10) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update({"RELATIONAL_PG_DSN": dsn, "RELATIONAL_POOL_MAX": str(pool_max)})
    return _spawn(["-m", "benchmarks.relational_app", "--port", str(port),
                   "--workers", str(workers)], env, log)


def dump_logs(tmp: Path, lines: int = 40) -> None:
    """After a failure: the tail of every server log of this run, on stderr."""
    for log in sorted(tmp.glob("*.log")):
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {log.name} (last {len(tail)} lines)", *tail, sep="\n", file=sys.stderr)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop one server we started (its granian workers are its children)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- patients
def national_id(i: int) -> str:
    """A valid, distinct national ID number for i < 20 million."""
    first = (f"110101{1950 + (i // 336_000) % 60:04d}{1 + (i // 28_000) % 12:02d}"
             f"{1 + (i // 1000) % 28:02d}{i % 1000:03d}")
    return first + check_digit(first)


async def prepare_patients(pg_dsn: str, n: int, path: Path, *, offset: int = 0,
                           redis_url: str | None = None) -> int:
    """``n`` accounts with one bound patient each, written straight to the
    store with COPY (encrypted fields, keyed ID hash, as ``POST
    /v1/patients`` would write them), and tokens minted with the API's token
    secret; with ``redis_url``, also the binding mirror that the bind writes
    and holds read. Writes ``token<TAB>patient_id`` lines to ``path``;
    returns n."""
    crypto = dev_crypto()
    signer = TokenSigner(TOKEN_SECRET, 4 * 3600)
    accounts: list[tuple[str, str]] = []
    patients: list[tuple[Any, ...]] = []
    lines: list[str] = []
    for i in range(offset, offset + n):
        acct = f"abench{i:08d}"
        pid = str(uuid.uuid4())
        nid = national_id(i)
        accounts.append((acct, crypto.openid_hash(f"bench-openid-{i}")))

        def enc(column: str, value: str, pid: str = pid) -> bytes:
            return crypto.encrypt(value, table="patients", column=column, row_id=pid)

        patients.append((uuid.UUID(pid), acct, crypto.id_hash(nid), enc("name_enc", "测试"),
                         enc("phone_enc", "13800000000"), enc("national_id_enc", nid),
                         crypto.active_key_id, "data"))
        lines.append(f"{signer.mint(acct)[0]}\t{pid}\n")
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("accounts", records=accounts,
                                             columns=["id", "openid_hash"])
            await conn.copy_records_to_table(
                "patients", records=patients,
                columns=["id", "account_id", "id_hash", "name_enc", "phone_enc",
                         "national_id_enc", "key_id", "verification"])
    finally:
        await conn.close()
    if redis_url is not None:
        async with Engine.connect(redis_url, EngineConfig()) as eng:
            for i in range(0, len(patients), 2000):
                await asyncio.gather(*(eng.mirror_binding(p[1], str(p[0]), p[2])
                                       for p in patients[i:i + 2000]))
    await asyncio.to_thread(path.write_text, "".join(lines))
    return n


# --------------------------------------------------------------------------- wrk
#: Prepended to every wrk script: a wall clock (LuaJIT ffi), per-thread
#: counts by status and problem type, a per-second timeline, the first
#: request and the first/last 201, all printed by done() as one JSON line.
LUA_COMMON = r"""
local ffi = require("ffi")
pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } hy_ts;" ..
                "int clock_gettime(int, hy_ts *);")
local hy_ts = ffi.new("hy_ts")
local function now_ms()
  ffi.C.clock_gettime(0, hy_ts)
  return tonumber(hy_ts.tv_sec) * 1000 + tonumber(hy_ts.tv_nsec) / 1e6
end

local hy_threads = {}
function setup(thread)
  thread:set("tid", #hy_threads)
  table.insert(hy_threads, thread)
end

counts = {}
buckets = {}
first_ms = 0
first_ok_ms = 0
last_ok_ms = 0

local function hy_mark()
  if first_ms == 0 then first_ms = now_ms() end
end

local function load_rows(path)
  local xs = {}
  for line in io.lines(path) do
    local row = {}
    for cell in line:gmatch("[^\t]+") do row[#row + 1] = cell end
    xs[#xs + 1] = row
  end
  return xs
end

function response(status, headers, body)
  local t = now_ms()
  local key
  if status >= 300 then
    key = status .. ":" .. ((body and body:match("/problems/([%w%-]+)")) or "other")
  else
    key = tostring(status)
  end
  counts[key] = (counts[key] or 0) + 1
  local b = math.floor(t / 1000) .. "|" .. key
  buckets[b] = (buckets[b] or 0) + 1
  if status == 201 then
    last_ok_ms = t
    if first_ok_ms == 0 then first_ok_ms = t end
  end
end

local function jmap(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local c, bk = {}, {}
  local first, first_ok, last_ok = 0, 0, 0
  for _, th in ipairs(hy_threads) do
    for k, v in pairs(th:get("counts")) do c[k] = (c[k] or 0) + v end
    for k, v in pairs(th:get("buckets")) do bk[k] = (bk[k] or 0) + v end
    local f = th:get("first_ms")
    if f > 0 and (first == 0 or f < first) then first = f end
    f = th:get("first_ok_ms")
    if f > 0 and (first_ok == 0 or f < first_ok) then first_ok = f end
    f = th:get("last_ok_ms")
    if f > last_ok then last_ok = f end
  end
  local e = summary.errors
  io.write(string.format(
    'HYJSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,' ..
    '"mean":%.1f,"max":%d},"first_request_ms":%.3f,"first_ok_ms":%.3f,"last_ok_ms":%.3f,' ..
    '"counts":%s,"buckets":%s}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max, first, first_ok, last_ok,
    jmap(c), jmap(bk)))
end
"""


@dataclass
class Wrk:
    """One wrk run, started now, stopped by its duration or by ``interrupt()``
    (SIGINT: wrk stops within ~100 ms and still prints its statistics)."""

    url: str
    script: Path
    args: list[str]
    threads: int = 2
    connections: int = 200
    duration_s: float = 30.0
    timeout_s: float = 10.0
    proc: asyncio.subprocess.Process | None = None
    launched_at: float = 0.0
    _out: bytes = field(default=b"", repr=False)

    async def start(self) -> Wrk:
        cmd = ["wrk", "-t", str(self.threads), "-c", str(self.connections),
               "-d", f"{max(1, round(self.duration_s))}s", "--timeout",
               f"{max(1, round(self.timeout_s))}s", "--latency", "-s", str(self.script),
               self.url, "--", *self.args]
        self.launched_at = time.time()
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def interrupt(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)

    async def result(self) -> dict[str, Any]:
        assert self.proc is not None
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), self.duration_s + 30)
        except TimeoutError:
            self.proc.kill()
            out, _ = await self.proc.communicate()
        text = out.decode(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("HYJSON ")), None)
        if line is None or "Requests/sec" not in text:
            raise RuntimeError(f"wrk failed: {text[-800:]}")
        res: dict[str, Any] = json.loads(line[7:])
        res["wrk_summary"] = _parse_wrk(text)
        res["launched_at_ms"] = self.launched_at * 1000
        return res


def latency_ms(res: dict[str, Any]) -> dict[str, float]:
    lat = res["latency_us"]
    return {k: round(float(lat[k]) / 1000, 2) for k in ("p50", "p90", "p99", "p999", "mean",
                                                        "max")}


def status_mix(res: dict[str, Any]) -> dict[str, int]:
    return dict(sorted(res["counts"].items(), key=lambda kv: -kv[1]))


def count_5xx(res: dict[str, Any]) -> int:
    return sum(v for k, v in res["counts"].items() if k.startswith("5"))


def socket_errors(res: dict[str, Any]) -> int:
    e = res["errors"]
    return int(e["connect"] + e["read"] + e["write"] + e["timeout"])


# --------------------------------------------------------------------------- CPU sampling
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, utime+stime ticks, comm) for every process."""
    out: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:
            continue
        lpar, rpar = raw.find("("), raw.rfind(")")
        rest = raw[rpar + 2:].split()
        if len(rest) < 13:
            continue
        out[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), raw[lpar + 1:rpar])
    return out


def _machine() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs."""
    with open("/proc/stat") as fh:
        cells = [int(x) for x in fh.readline().split()[1:]]
    idle = cells[3] + (cells[4] if len(cells) > 4 else 0)
    steal = cells[7] if len(cells) > 7 else 0
    total = sum(cells[:8])
    return total - idle - steal, steal, total


async def background_busy_pct(seconds: float = 1.0) -> float:
    """Busy share of the whole machine (percent of all cores) over ``seconds``
    while this benchmark drives nothing: other work on a shared machine."""
    a = _machine()
    await asyncio.sleep(seconds)
    b = _machine()
    return round(100.0 * (b[0] - a[0]) / max(1, b[2] - a[2]), 1)


async def settle(max_wait_s: float, threshold_pct: float = 15.0) -> float:
    """On a shared machine: wait (at most ``max_wait_s``) until other work
    leaves it below ``threshold_pct`` busy; the last reading either way."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = await background_busy_pct(0.5)
        if busy < threshold_pct or time.monotonic() >= deadline:
            return busy


#: A run during which processes that are not ours took more than this (percent
#: of one core) is repeated: another session's work was sharing the machine.
NOISY_OTHER_PCT = 25.0


def noisy(cpu: dict[str, Any]) -> bool:
    return float(cpu.get("mean", {}).get("other", 0.0)) > NOISY_OTHER_PCT


class CpuSampler:
    """CPU of process groups (a root pid and its descendants) while a run
    lasts, from /proc, every ``interval_s``: mean and peak percent of ONE
    core per group (200% = both cores of this machine), the busiest single
    processes, and the machine's busy and steal share."""

    def __init__(self, roots: dict[str, int], interval_s: float = 0.5) -> None:
        self.roots = dict(roots)
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._series: dict[str, list[float]] = {}
        self._per_pid: dict[int, list[float]] = {}
        self._names: dict[int, tuple[str, str]] = {}
        self._machine: list[tuple[int, int, int]] = []
        self._stop = asyncio.Event()

    def add_root(self, name: str, pid: int) -> None:
        self.roots[name] = pid

    def _group(self, pid: int, table: dict[int, tuple[int, int, str]],
               by_pid: dict[int, str]) -> str:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in by_pid:
                return by_pid[pid]
            pid = table.get(pid, (0, 0, ""))[0]
            seen += 1
        return "other"

    async def _run(self) -> None:
        prev = _proc_table()
        prev_m = _machine()
        t_prev = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            now = _proc_table()
            m = _machine()
            t = time.monotonic()
            dt = max(1e-3, t - t_prev)
            groups: dict[str, float] = {k: 0.0 for k in self.roots}
            by_pid = {v: k for k, v in self.roots.items()}
            for pid, (_ppid, ticks, comm) in now.items():
                d = ticks - prev.get(pid, (0, 0, ""))[1] if pid in prev else ticks
                if d <= 0:
                    continue
                pct = 100.0 * d / _TICK / dt
                g = self._group(pid, now, by_pid)
                groups[g] = groups.get(g, 0.0) + pct
                self._per_pid.setdefault(pid, []).append(pct)
                self._names[pid] = (comm, g)
            for g, v in groups.items():
                self._series.setdefault(g, []).append(v)
            self._machine.append(tuple(a - b for a, b in zip(m, prev_m, strict=True)))  # type: ignore[arg-type]
            prev, prev_m, t_prev = now, m, t

    def start(self) -> CpuSampler:
        self._stop.clear()
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._task is not None:
            await self._task
        n = max((len(v) for v in self._series.values()), default=0)
        mean = {g: round(sum(v) / n, 1) for g, v in self._series.items() if n}
        peak = {g: round(max(v), 1) for g, v in self._series.items() if v}
        top = sorted(((sum(v) / n, pid) for pid, v in self._per_pid.items() if n),
                     reverse=True)[:8]
        busy = sum(x[0] for x in self._machine)
        steal = sum(x[1] for x in self._machine)
        total = sum(x[2] for x in self._machine) or 1
        return {
            "unit": "percent of one core (this machine has 2: 200% = all of it)",
            "samples": n,
            "interval_s": self.interval_s,
            "mean": dict(sorted(mean.items(), key=lambda kv: -kv[1])),
            "peak": dict(sorted(peak.items(), key=lambda kv: -kv[1])),
            "top_processes": [{"pid": pid, "comm": self._names[pid][0],
                               "group": self._names[pid][1], "mean": round(v, 1)}
                              for v, pid in top],
            "machine_busy_pct": round(100.0 * busy / total, 1),
            "machine_steal_pct": round(100.0 * steal / total, 1),
        }

    def window(self, started: float, stopped: float, a: float, b: float) -> dict[str, Any]:
        """Mean CPU per group (percent of one core) and the machine's busy share
        over the samples that ended in [a, b] (wall-clock seconds); the samples
        are taken as evenly spaced between ``started`` and ``stopped``, and
        every group's series ends at the last sample (groups added late start later)."""
        series = self._series
        machine = self._machine
        n = len(machine)
        if n == 0:
            return {"samples": 0, "mean": {}, "machine_busy_pct": 0.0}
        step = (stopped - started) / n
        idx = [i for i in range(n) if a <= started + (i + 1) * step <= b]
        if not idx:
            return {"samples": 0, "mean": {}, "machine_busy_pct": 0.0}
        mean: dict[str, float] = {}
        for g, vals in series.items():
            off = n - len(vals)
            got = [vals[i - off] for i in idx if i - off >= 0]
            mean[g] = round(sum(got) / len(idx), 1)
        busy = sum(machine[i][0] for i in idx)
        total = sum(machine[i][2] for i in idx) or 1
        return {"samples": len(idx), "window_s": [round(a, 2), round(b, 2)],
                "mean": dict(sorted(mean.items(), key=lambda kv: -kv[1])),
                "machine_busy_pct": round(100.0 * busy / total, 1)}


# --------------------------------------------------------------------------- end to end
async def confirm_and_persist(eng: Any, pool: asyncpg.Pool, sids: list[str]) -> dict[str, Any]:
    """After a run: pay every hold (``Engine.confirm``, as the payment
    callback would), drain the outbox into PostgreSQL with the writer, and
    audit Redis against PostgreSQL for these sessions."""
    import msgspec

    from engine.audit import run_audit
    from engine.outcomes import Booked
    from engine.writer import OutboxWriter, WriterConfig

    held: list[str] = []
    for sid in sids:
        snap = await eng.snapshot(sid)
        for _unit, raw, rec_id in (snap or {}).get("used", []):
            if raw is not False and msgspec.json.decode(raw).get("st") == "h":
                held.append(rec_id)
    sem = asyncio.Semaphore(256)

    async def pay(hold_id: str) -> bool:
        async with sem:
            return isinstance(await eng.confirm(hold_id, f"bench-pay-{hold_id}"), Booked)

    confirmed = sum(await asyncio.gather(*(pay(h) for h in held)))
    writer = OutboxWriter(eng, pool, WriterConfig(block_ms=50))
    await asyncio.wait_for(writer.run(asyncio.Event(), burst=True), 120)
    report = await run_audit(eng, pool, session_ids=sids)
    return {
        "holds_paid": confirmed,
        "written_by_writer": writer.written,
        "booked_redis": sum(s.booked_redis for s in report.sessions),
        "booked_postgres": sum(s.booked_postgres or 0 for s in report.sessions),
        "free": sum(s.free for s in report.sessions),
        "held": sum(s.held for s in report.sessions),
        "audit_ok": report.ok,
        "breaches": report.breaches[:10],
    }
