"""``haoyuan demo``: a release morning on one machine, end to end.

Starts what is missing (private Redis with AOF ``always`` and PostgreSQL
unless ``HAOYUAN_REDIS_URL`` / ``HAOYUAN_PG_DSN`` are set, the HIS
simulator, the outbox writer, the HIS forwarder and the hold sweeper),
imports a demo hospital, sets the release instant a few seconds ahead, runs
the spike for a bounded time, waits for the writer and forwarder to drain,
runs the audit, stops everything it started and prints a report (with a
JSON summary and PNG plots under ``--out``).

The spike runs patients as asyncio tasks against the HTTP API when it is
available (``benchmarks.demo.http``), else through the engine in process.
Load generator and server share this machine's cores: the figures say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from benchmarks.demo.hospital import demo_sessions, zipf_weights
from engine.audit import run_audit
from engine.engine import Engine, EngineConfig
from engine.model import SessionSpec
from engine.outcomes import Held, Reason
from engine.sweeper import Sweeper
from engine.writer import OutboxWriter, WriterConfig, outbox_lag


@dataclass
class Scale:
    departments: int
    doctors_per_dept: int
    slots_per_session: int
    units_per_slot: int
    patients: int
    bots: int
    spike_s: float
    release_in_s: float
    hold_ttl_ms: int

    @property
    def capacity(self) -> int:
        return (self.departments * self.doctors_per_dept * 2 * self.slots_per_session
                * self.units_per_slot)


QUICK = Scale(departments=4, doctors_per_dept=3, slots_per_session=4, units_per_slot=10,
              patients=2500, bots=20, spike_s=12, release_in_s=3, hold_ttl_ms=8_000)
FULL = Scale(departments=8, doctors_per_dept=4, slots_per_session=8, units_per_slot=6,
             patients=8000, bots=50, spike_s=45, release_in_s=5, hold_ttl_ms=15_000)


@dataclass
class Stack:
    redis_url: str
    pg_dsn: str
    his_url: str
    engine: Engine
    pool: asyncpg.Pool
    #: The private Redis Cluster (``--cluster``), for ``--failover``.
    cluster: Any = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def start_stack(*, say: Any, cluster: bool = False) -> AsyncIterator[Stack]:
    from engine.forwarder import ForwarderConfig, HisForwarder
    from engine.his.fhir import FhirHisClient
    from engine.store.migrate import migrate
    from engine.testing.his_simulator import SimConfig, SimulatorProcess
    from engine.testing.servers import PostgresServer, RedisClusterServer, RedisServer

    started: list[Any] = []
    try:
        redis_url = os.environ.get("HAOYUAN_REDIS_URL")
        if cluster:
            # A local cluster with a replica per primary; the API and every
            # worker read HAOYUAN_REDIS_CLUSTER (the one setting).
            rc = await asyncio.to_thread(lambda: RedisClusterServer(
                masters=3, replicas=1, node_timeout_ms=1000, appendonly=True,
                appendfsync="always").start())
            started.append(rc)
            redis_url = rc.url
            os.environ["HAOYUAN_REDIS_CLUSTER"] = "1"
            say(f"started a private Redis Cluster (3 primaries, 3 replicas, AOF always) at "
                f"{redis_url}")
        elif not redis_url:
            r = await asyncio.to_thread(
                lambda: RedisServer(appendonly=True, appendfsync="always").start())
            started.append(r)
            redis_url = r.url
            say(f"started private Redis (AOF always) at {redis_url}")
        pg_dsn = os.environ.get("HAOYUAN_PG_DSN")
        if not pg_dsn:
            pg = await asyncio.to_thread(lambda: PostgresServer().start())
            started.append(pg)
            pg_dsn = pg.dsn
            say(f"started private PostgreSQL at {pg_dsn}")
        await migrate(pg_dsn)
        his_url = os.environ.get("HAOYUAN_HIS_URL")
        if not his_url:
            sim = await asyncio.to_thread(
                lambda: SimulatorProcess(SimConfig(latency_ms=5.0, error_rate=0.02, seed=7)
                                         ).start())
            started.append(sim)
            his_url = sim.url
            say(f"started the HIS simulator (FHIR R4) at {his_url}")
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=8)
        cfg = EngineConfig(account_rate_per_s=2.0, account_burst=6,
                           patient_rate_per_s=2.0, patient_burst=6, cluster=cluster)
        async with Engine.connect(redis_url, cfg) as eng:
            if not cluster:
                await eng.client.flushall()
            stack = Stack(redis_url, pg_dsn, his_url, eng, pool,
                          cluster=started[0] if cluster else None)
            writer = OutboxWriter(eng, pool, WriterConfig(block_ms=50))
            his = FhirHisClient(his_url, timeout=2.0)
            fwd = HisForwarder(eng, pool, his, ForwarderConfig())
            stack.tasks += [
                asyncio.create_task(writer.run(stack.stop)),
                asyncio.create_task(fwd.run(stack.stop)),
                asyncio.create_task(Sweeper(eng, interval_s=0.5).run(stack.stop)),
            ]
            say("writer, HIS forwarder and sweeper running")
            try:
                yield stack
            finally:
                stack.stop.set()
                await asyncio.gather(*stack.tasks, return_exceptions=True)
                await his.aclose()
                await pool.close()
    finally:
        for s in reversed(started):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(s.stop)
            with contextlib.suppress(Exception):
                cleanup = getattr(s, "cleanup", None)
                if cleanup is not None:
                    await asyncio.to_thread(cleanup)


# -- the spike through the engine (in process) ---------------------------------------


@dataclass
class Stats:
    t0: float
    lat: dict[str, list[float]] = field(default_factory=dict)
    timeline: list[tuple[float, str, str, float]] = field(default_factory=list)
    errors: int = 0

    def record(self, op: str, outcome: str, started: float) -> None:
        now = time.perf_counter()
        ms = (now - started) * 1000
        self.lat.setdefault(f"{op} [{outcome}]", []).append(ms)
        self.timeline.append((now - self.t0, op, outcome, ms))


class Crowd:
    """Patients (and bots) grabbing through the engine, as the mini-program
    would: look at availability, press on a slot with units, fall back to
    another slot or doctor on sold-out, pay after a think time; some
    abandon, some cancel later; bots never pay and never wait."""

    def __init__(self, stack: Stack, specs: list[SessionSpec], stats: Stats, seed: int) -> None:
        self.eng = stack.engine
        self.specs = {s.session_id: s for s in specs}
        self.by_doctor: dict[str, list[SessionSpec]] = {}
        for s in specs:
            self.by_doctor.setdefault(s.doctor, []).append(s)
        self.doctors = sorted(self.by_doctor, key=lambda d: (d.split("-DR")[1], d))
        self.weights = zipf_weights(len(self.doctors), 1.2)  # experts first, most wanted
        self.stats = stats
        self.seed = seed
        self.sem = asyncio.Semaphore(256)
        self.booked: dict[str, str] = {}  # patient -> booking id
        self.wanting: set[str] = set()  # still want a booking (never abandoned one)

    async def call(self, op: str, coro: Any) -> Any:
        async with self.sem:  # the generator's own queue is not server latency
            t = time.perf_counter()
            try:
                r = await coro
            except Exception:
                self.stats.errors += 1
                self.stats.record(op, "error", t)
                return None
        outcome = "ok" if getattr(r, "ok", True) else r.reason.value
        self.stats.record(op, outcome, t)
        return r

    async def grab(self, i: int, sessions: list[SessionSpec], prng: random.Random,
                   deadline: float, bot: bool) -> None:
        pat, acct = f"demo-pat-{i}", f"demo-acct-{i}"
        for spec in sessions:
            a = await self.call("availability", self.eng.availability(spec.session_id))
            slots = [x.slot_id for x in (a.slots if a else []) if x.free > 0]
            prng.shuffle(slots)
            for slot in slots:
                while True:
                    if time.perf_counter() > deadline:
                        return
                    r = await self.call("hold", self.eng.hold(spec.session_id, slot,
                                                              patient=pat, account=acct))
                    if r is None:
                        break
                    if isinstance(r, Held):
                        if bot:
                            return  # scalpers never pay: the hold expires
                        await self.pay(i, pat, acct, r, prng)
                        return
                    if r.reason is Reason.RATE_LIMITED and r.retry_after_ms:
                        await asyncio.sleep(r.retry_after_ms / 1000)
                        continue
                    if r.reason in (Reason.DUPLICATE, Reason.SUSPENDED, Reason.CLOSED):
                        return
                    break  # sold out: the next slot, then the next doctor

    async def pay(self, i: int, pat: str, acct: str, h: Held, prng: random.Random) -> None:
        await asyncio.sleep(prng.uniform(0.3, 2.0))  # paying in WeChat Pay
        if prng.random() < 0.08:
            await self.call("release", self.eng.release(h.hold_id, account=acct))
            self.wanting.discard(pat)
            return
        b = await self.call("confirm", self.eng.confirm(h.hold_id, f"pay-{i}"))
        if b is not None and b.ok:
            self.booked[pat] = h.hold_id
            self.wanting.discard(pat)
            if prng.random() < 0.03:
                await asyncio.sleep(prng.uniform(0.5, 3))
                c = await self.call("cancel", self.eng.cancel(h.hold_id, account=acct))
                if c is not None and c.ok:
                    del self.booked[pat]

    async def spike(self, scale: Scale, release_at: float) -> None:
        deadline = release_at + scale.spike_s

        async def patient(i: int, bot: bool) -> None:
            prng = random.Random(self.seed * 100_003 + i)
            wanted = prng.choices(self.doctors, self.weights)[0]
            others = prng.sample(self.doctors, k=min(3, len(self.doctors)))
            sessions = [s for d in [wanted, *others] for s in self.by_doctor[d]]
            if not bot:
                self.wanting.add(f"demo-pat-{i}")
            # The refresh storm: look before the instant, press at the instant.
            await asyncio.sleep(max(0.0, release_at - time.perf_counter() - prng.uniform(0, 2)))
            await self.call("availability", self.eng.availability(sessions[0].session_id))
            await asyncio.sleep(max(0.0, release_at - time.perf_counter()
                                    + prng.expovariate(1.5)))
            await self.grab(i, sessions, prng, deadline, bot)

        await asyncio.gather(*(patient(i, bot=i < scale.bots) for i in range(scale.patients)))

    async def last_call(self, timeout_s: float) -> None:
        """After holds settle, patients still wanting a booking try the
        sessions that show free units (expired holds came back), in waves."""
        deadline = time.perf_counter() + timeout_s
        prng = random.Random(self.seed)
        waiting = sorted(self.wanting)
        while waiting and time.perf_counter() < deadline:
            free: list[SessionSpec] = []
            units = 0
            for spec in self.specs.values():
                a = await self.eng.availability(spec.session_id)
                if a is not None and a.free > 0:
                    free.append(spec)
                    units += a.free
            if not free:
                return
            wave, waiting = waiting[: 2 * units], waiting[2 * units:]

            async def one(pat: str, sessions: list[SessionSpec]) -> None:
                order = list(sessions)
                prng.shuffle(order)
                await self.grab(int(pat.rsplit("-", 1)[1]), order, prng, deadline, bot=False)

            await asyncio.gather(*(one(p, free) for p in wave))


# -- sampling while the spike runs ----------------------------------------------------


async def sample(stack: Stack, specs: list[SessionSpec], t0: float, stop: asyncio.Event,
                 out: dict[str, Any]) -> None:
    """Inventory, writer lag and HIS lag over time; the first instant each
    session is sold out."""
    from engine.forwarder import his_lag

    sold_out: dict[str, float] = {}
    series: list[dict[str, Any]] = []
    depts = sorted({(s.dept, s.date) for s in specs})
    while not stop.is_set():
        t = time.perf_counter() - t0
        free = 0
        try:
            for dept, date in depts:
                a = await stack.engine.dept_day_availability(dept, date)
                seen = time.perf_counter() - t0  # sold out at the latest when the read came back
                for s in a.sessions:
                    free += s.free
                    if s.free == 0 and s.session_id not in sold_out:
                        sold_out[s.session_id] = seen
            lag = await outbox_lag(stack.engine.client)
            h = await his_lag(stack.pool)
        except Exception:
            if stop.is_set():
                break
            # A Redis node failing over (--failover): no sample this round.
            await asyncio.sleep(0.25)
            continue
        series.append({"t": round(t, 2), "free": free, "writer_pending": lag.pending +
                       lag.undelivered, "his_pending": h.pending})
        out["live"] = series
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    out["series"] = series
    out["sold_out_at"] = sold_out


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@dataclass
class HttpScale:
    peak_users: int
    quiet_users: int
    ramp_s: float
    hold_s: float
    decay_s: float
    total_s: float
    lead_s: float  # from the Locust start to the release instant


QUICK_HTTP = (Scale(departments=4, doctors_per_dept=3, slots_per_session=4, units_per_slot=2,
                    patients=500, bots=10, spike_s=12, release_in_s=0, hold_ttl_ms=5_000),
              HttpScale(peak_users=220, quiet_users=20, ramp_s=3, hold_s=6, decay_s=4,
                        total_s=19, lead_s=5))
FULL_HTTP = (Scale(departments=8, doctors_per_dept=4, slots_per_session=6, units_per_slot=1,
                   patients=1500, bots=30, spike_s=40, release_in_s=0, hold_ttl_ms=10_000),
             HttpScale(peak_users=700, quiet_users=40, ramp_s=5, hold_s=15, decay_s=10,
                       total_s=45, lead_s=8))


async def run_demo(*, quick: bool = False, json_only: bool = False,
                   out_dir: str = "reports/demo", seed: int = 1,
                   engine_only: bool = False, cluster: bool = False,
                   failover: bool = False) -> dict[str, Any]:
    from benchmarks.demo import http as demo_http

    use_http = not engine_only and demo_http.available()
    scale, hscale = (QUICK_HTTP if quick else FULL_HTTP) if use_http else (
        QUICK if quick else FULL, None)

    def say(msg: str) -> None:
        if not json_only:
            print(f"[demo] {msg}", flush=True)

    # Absolute: the Locust child and the plots run in other working directories.
    out = Path.cwd() / out_dir  # an absolute out_dir stays as it is
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    # The workers' routine retries (HIS answering 500 now and then) are not news here.
    logging.getLogger("haoyuan").setLevel(logging.WARNING)
    if failover and not cluster:
        raise ValueError("--failover needs --cluster")
    async with start_stack(say=say, cluster=cluster) as stack, \
            contextlib.AsyncExitStack() as ctx:
        from engine.schedule_import import import_sessions

        api = None
        if use_http:
            api = await ctx.enter_async_context(
                demo_http.api_server(stack.redis_url, stack.pg_dsn, out))
            say(f"API up at {api.url} (granian, 2 workers)")
        lead_s = hscale.lead_s if hscale else scale.release_in_s
        server_ms = await stack.engine.server_time_ms()
        read_at = time.perf_counter()  # the release instant on this clock: read_at + lead_s
        release_ms = server_ms + int(lead_s * 1000)
        date = time.strftime("%Y-%m-%d", time.localtime(server_ms / 1000 + 7 * 86400))
        specs = demo_sessions(release_at_ms=release_ms, date=date,
                              departments=scale.departments,
                              doctors_per_dept=scale.doctors_per_dept,
                              slots_per_session=scale.slots_per_session,
                              units_per_slot=scale.units_per_slot,
                              hold_ttl_ms=scale.hold_ttl_ms)
        await import_sessions(stack.engine, stack.pool, specs)
        t0 = time.perf_counter()
        release_at = read_at + lead_s
        stats = Stats(t0=t0)
        sampled: dict[str, Any] = {}
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample(stack, specs, t0, stop_sampling, sampled))
        failover_figures: dict[str, Any] = {}
        killer = (asyncio.create_task(_fail_over(stack, specs, release_at, say, failover_figures))
                  if failover else None)
        crowd = Crowd(stack, specs, stats, seed)
        locust: dict[str, Any] | None = None
        if api is not None and hscale is not None:
            say(f"imported {len(specs)} sessions, {scale.capacity} units for {date}; release "
                f"in {lead_s:.0f} s; Locust: up to {hscale.peak_users} patients and bots, "
                f"{hscale.total_s:.0f} s")
            progress = asyncio.create_task(_progress_http(say, sampled, t0))
            try:
                locust = await demo_http.run_locust(
                    api, out, date=date, release_at_ms=release_ms,
                    peak_users=hscale.peak_users, quiet_users=hscale.quiet_users,
                    ramp_s=hscale.ramp_s, hold_s=hscale.hold_s, decay_s=hscale.decay_s,
                    total_s=hscale.total_s, seed=seed)
            finally:
                progress.cancel()
                spike_end = time.perf_counter()
        else:
            say(f"imported {len(specs)} sessions, {scale.capacity} units; release in "
                f"{lead_s:.0f} s; {scale.patients} patients and {scale.bots} bots wait "
                "(in process, through the engine)")
            progress = asyncio.create_task(_progress(stats, say, scale, t0))
            try:
                await crowd.spike(scale, release_at)
            finally:
                progress.cancel()
                spike_end = time.perf_counter()
        say("spike over; holds settle (unpaid ones expire), then a last call for "
            "patients still waiting")
        await asyncio.sleep(scale.hold_ttl_ms / 1000 + 0.5)
        await stack.engine.sweep()
        if locust is not None:
            # Patients of the last call come in through the engine: everyone
            # who lost in the spike and still wants a unit.
            crowd.wanting = {f"demo-pat-{i}" for i in range(scale.patients)}
        await crowd.last_call(timeout_s=30)  # each grab waits for its own payment
        if killer is not None:
            await killer
            await _recover(stack, say, failover_figures)
        await _drain(stack, timeout_s=60)
        stop_sampling.set()
        await sampler
        report = await run_audit(stack.engine, stack.pool, his=None)
        from engine.his.fhir import FhirHisClient

        his = FhirHisClient(stack.his_url, timeout=5.0)
        try:
            his_report = await run_audit(stack.engine, stack.pool, his)
        finally:
            await his.aclose()
        summary = _summary(stats, scale, specs, report, his_report, sampled,
                           len(crowd.wanting), release_at - t0, spike_end - t0, locust)
        if cluster:
            summary["redis"] = "cluster"
        if failover:
            # While a primary fails over, the API answers 503 with Retry-After
            # (nothing decided, the client retries): the one 5xx allowed here.
            only_503 = all("[503 " in k for k in summary["by_endpoint"] if " [5" in k)
            failover_figures["http_503_during_failover"] = summary["http_5xx"]
            summary["failover"] = failover_figures
            if only_503 and summary["http_5xx"] and not summary["ok"]:
                summary["ok"] = bool(summary["audit_ok"] and summary["oversold"] == 0
                                     and summary["undersold"] == 0 and summary["errors"] == 0)
    try:
        from benchmarks.demo.report import plot

        summary["plots"] = await asyncio.to_thread(
            plot, stats.timeline, sampled.get("series", []), release_at - t0, out,
            (locust or {}).get("history", []))
    except ImportError:  # matplotlib is in the [load] extra
        summary["plots"] = []
    await asyncio.to_thread((out / "summary.json").write_bytes, msgspec.json.encode(summary))
    if not json_only:
        _print_report(summary)
    return summary


async def _fail_over(stack: Stack, specs: list[SessionSpec], release_at: float, say: Any,
                     figures: dict[str, Any]) -> None:
    """``--failover``: two seconds into the spike, kill -9 the primary that owns
    the first (most popular) session's partition, wait for its replica to take
    over, and bring the dead node back as a replica."""
    from engine import keys as K

    await asyncio.sleep(max(0.0, release_at - time.perf_counter()) + 2.0)
    p = K.partition_of(specs[0].dept, specs[0].date)
    key = K.PartitionKeys(p).outbox
    victim = await asyncio.to_thread(stack.cluster.primary_of, key)
    t_kill = time.perf_counter()
    await asyncio.to_thread(victim.kill)
    say(f"failover: killed -9 the primary {victim.port} (partition {p}) mid-spike")
    new = await asyncio.to_thread(stack.cluster.wait_failover, key, 60.0)
    figures["killed_primary"] = victim.port
    figures["promoted_replica"] = new.port
    figures["failover_s"] = round(time.perf_counter() - t_kill, 2)
    say(f"failover: replica {new.port} took over in {figures['failover_s']} s")
    await asyncio.to_thread(victim.restart)
    await asyncio.to_thread(stack.cluster.wait_replicas_synced, 60.0)


async def _recover(stack: Stack, say: Any, figures: dict[str, Any]) -> None:
    """After a failover: what the writer found damaged (Redis lost writes
    PostgreSQL had) is rebuilt before the last call sells on."""
    from engine.rebuild import rebuild
    from engine.recovery import check_partitions

    await _drain(stack, timeout_s=60)
    damaged = await check_partitions(stack.engine, stack.pool)
    figures["partitions_damaged"] = [c.partition for c in damaged]
    figures["conflicts_caught"] = int(await stack.pool.fetchval(
        "SELECT count(*) FROM booking_conflicts"))
    if damaged:
        ids = [r["id"] for r in await stack.pool.fetch(
            "SELECT id FROM sessions WHERE partition = ANY($1)", figures["partitions_damaged"])]
        reports = await rebuild(stack.engine, stack.pool, ids)
        figures["rebuilt_sessions"] = len(reports)
        say(f"failover: rebuilt {len(reports)} sessions of partitions "
            f"{figures['partitions_damaged']}")
    else:
        figures["rebuilt_sessions"] = 0
        say("failover: Redis lost nothing PostgreSQL had; no rebuild needed")


async def _progress_http(say: Any, sampled: dict[str, Any], t0: float) -> None:
    while True:
        await asyncio.sleep(3.0)
        series = sampled.get("live", [])
        if series:
            p = series[-1]
            say(f"t={time.perf_counter() - t0:5.1f}s  free units {p['free']:>5}  "
                f"outbox not yet in PostgreSQL {p['writer_pending']:>4}  "
                f"not yet in HIS {p['his_pending']:>4}")


async def _progress(stats: Stats, say: Any, scale: Scale, t0: float) -> None:
    last = 0
    while True:
        await asyncio.sleep(2.0)
        n = len(stats.timeline)
        say(f"t={time.perf_counter() - t0:5.1f}s  decisions {n:>7}  "
            f"({(n - last) / 2.0:,.0f}/s)")
        last = n


async def _drain(stack: Stack, timeout_s: float) -> None:
    from engine.forwarder import his_lag

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        lag = await outbox_lag(stack.engine.client)
        h = await his_lag(stack.pool)
        if lag.pending == 0 and lag.undelivered == 0 and h.pending == 0:
            return
        await asyncio.sleep(0.2)


def _summary(stats: Stats, scale: Scale, specs: list[SessionSpec], audit: Any, his_audit: Any,
             sampled: dict[str, Any], still_wanting: int, release_t: float,
             end_t: float, locust: dict[str, Any] | None = None) -> dict[str, Any]:
    all_ms = [x for v in stats.lat.values() for x in v]
    n = len(all_ms)
    duration = max(1e-9, end_t - (release_t - 2.0))
    booked_redis = sum(s.booked_redis for s in audit.sessions)
    booked_pg = sum(s.booked_postgres or 0 for s in audit.sessions)
    booked_his = sum(s.booked_his or 0 for s in his_audit.sessions)
    capacity = sum(s.capacity for s in audit.sessions)
    free = sum(s.free for s in audit.sessions)
    held = sum(s.held for s in audit.sessions)
    oversold = sum(max(0, s.booked_redis - s.capacity) for s in audit.sessions)
    # Undersold: units left free while a patient who wanted one got nothing.
    undersold = min(free, still_wanting)
    by = {k: {"count": len(v), "p50_ms": round(_pct(v, 50), 2),
              "p95_ms": round(_pct(v, 95), 2), "p99_ms": round(_pct(v, 99), 2)}
          for k, v in sorted(stats.lat.items())}
    sold_out = {k: round(v - release_t, 2) for k, v in
                sorted(sampled.get("sold_out_at", {}).items(), key=lambda kv: kv[1])}
    head: dict[str, Any] = {
        "mode": "engine",
        "requests": n,
        "requests_per_s": round(n / duration),
        #: what requests_per_s is: the mean over the run (in process)
        "requests_per_s_is": "mean",
        "http_5xx": 0,
        "errors": stats.errors,
        "p50_ms": round(_pct(all_ms, 50), 2),
        "p95_ms": round(_pct(all_ms, 95), 2),
        "p99_ms": round(_pct(all_ms, 99), 2),
        "by_endpoint": by,
    }
    if locust is not None:
        hist = locust.get("history", [])
        head = {
            "mode": "http",
            "requests": int(locust["requests"]),
            "requests_per_s": round(max((h["rps"] for h in hist), default=0.0)),
            #: the busiest second Locust saw (over HTTP)
            "requests_per_s_is": "peak",
            "http_5xx": int(locust["status_5xx"]),
            "errors": int(locust["transport_errors"]) + int(locust["failures"])
            - int(locust["status_5xx"]),
            "p50_ms": float(locust.get("p50", 0)),
            "p95_ms": float(locust.get("p95", 0)),
            "p99_ms": float(locust.get("p99", 0)),
            "by_endpoint": {k: {"count": v["requests"], "p50_ms": v.get("p50", 0),
                                "p95_ms": v.get("p95", 0), "p99_ms": v.get("p99", 0)}
                            for k, v in sorted(locust.get("by_name", {}).items())},
            "locust": {k: locust[k] for k in ("holds", "confirms", "releases", "cancels",
                                              "net_holds", "net_bookings", "rps")
                       if k in locust},
            "last_call_decisions": {k: len(v) for k, v in sorted(stats.lat.items())},
        }
    return {
        "ok": bool(audit.ok and his_audit.ok and oversold == 0 and undersold == 0
                   and head["errors"] == 0 and head["http_5xx"] == 0),
        **head,
        "capacity": capacity,
        "booked_redis": booked_redis,
        "booked_postgres": booked_pg,
        "booked_his": booked_his,
        "held_after_settle": held,
        "free_after_settle": free,
        "oversold": oversold,
        "undersold": undersold,
        "audit_ok": bool(audit.ok and his_audit.ok),
        "audit_breaches": list(audit.breaches) + list(his_audit.breaches),
        "sold_out_after_release_s": sold_out,
        "sessions": len(specs),
        "patients": scale.patients,
        "patients_without_booking": still_wanting,
        "bots": scale.bots,
        "lag_series": sampled.get("series", []),
        "hardware": {"cpus": os.cpu_count(),
                     "note": "load generator, API/engine, Redis, PostgreSQL and the HIS "
                             "simulator share these cores"},
    }


def _print_report(s: dict[str, Any]) -> None:
    print()
    print("=== haoyuan release morning ===")
    rate = ("peak second" if s.get("requests_per_s_is") == "peak" else "mean")
    print(f"requests {s['requests']:,}  ({rate}: {s['requests_per_s']:,}/s)   "
          f"5xx {s['http_5xx']}   errors {s['errors']}")
    print(f"latency p50 {s['p50_ms']} ms  p95 {s['p95_ms']} ms  p99 {s['p99_ms']} ms")
    print(f"{'endpoint [outcome]':<34}{'count':>8}{'p50':>9}{'p95':>9}{'p99':>9}")
    for k, v in s["by_endpoint"].items():
        print(f"{k:<34}{v['count']:>8}{v['p50_ms']:>9}{v['p95_ms']:>9}{v['p99_ms']:>9}")
    print("sold out after the release instant (most popular first):")
    for sid, t in list(s["sold_out_after_release_s"].items())[:8]:
        print(f"  {sid:<32}{t:>7.2f} s")
    print(f"units: capacity {s['capacity']}, booked in Redis {s['booked_redis']}, "
          f"in PostgreSQL {s['booked_postgres']}, in HIS {s['booked_his']}; "
          f"free {s['free_after_settle']}, held {s['held_after_settle']}")
    print(f"oversold {s['oversold']} (units booked beyond capacity)   undersold "
          f"{s['undersold']} (units left free while a patient who wanted one got none)   "
          f"audit {'OK' if s['audit_ok'] else 'BREACH'}")
    for b in s["audit_breaches"][:10]:
        print(f"  BREACH {b}")
    if s.get("plots"):
        print("plots: " + ", ".join(s["plots"]))
    print(f"verdict: {'OK' if s['ok'] else 'FAILED'}")
