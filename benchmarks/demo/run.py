"""``haoyuan demo``: a release morning on one machine, end to end.

Starts what is missing (private Redis with AOF ``always`` and PostgreSQL
unless ``HAOYUAN_REDIS_URL`` / ``HAOYUAN_PG_DSN`` are set, the HIS
simulator, the WeChat Pay simulator, the outbox writer, the HIS forwarder
with its change poller, the refund worker and the hold sweeper),
imports a demo hospital, sets the release instant a few seconds ahead, runs
the spike for a bounded time, waits for the writer and forwarder to drain,
runs the audit, stops everything it started and prints a report (with a
JSON summary and PNG plots under ``--out``). Patients pay through the WeChat
Pay simulator (its signed notification reaches the API, or the payment
intake in process); after the spike the HIS stops a session or two (停诊) and
cancels a few appointments at its window, every refund goes through the
refund worker, and the day is reconciled against the simulator's bill.

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
import secrets
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
    #: The WeChat Pay simulator and a client of it; the HIS simulator if ours.
    pay_url: str = ""
    wx: Any = None
    his_sim: bool = False
    api_env: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def start_stack(*, say: Any, cluster: bool = False) -> AsyncIterator[Stack]:
    from engine.forwarder import ForwarderConfig, HisForwarder
    from engine.his.fhir import FhirHisClient
    from engine.his.inbound import HisInbound, InboundConfig
    from engine.payments.wechat import WechatPay
    from engine.pii import worker_crypto
    from engine.refunds import RefundConfig, RefundWorker
    from engine.store.migrate import migrate
    from engine.testing.his_simulator import SimConfig, SimulatorProcess
    from engine.testing.payment_simulator import PaymentSimulatorProcess, PaySimConfig, wxpay_env
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
        his_sim = not his_url
        notify_token = secrets.token_urlsafe(32)
        if not his_url:
            sim = await asyncio.to_thread(
                lambda: SimulatorProcess(SimConfig(latency_ms=5.0, error_rate=0.02, seed=7)
                                         ).start())
            started.append(sim)
            his_url = sim.url
            say(f"started the HIS simulator (FHIR R4) at {his_url}")
        paysim = await asyncio.to_thread(
            lambda: PaymentSimulatorProcess(PaySimConfig(seed=7)).start())
        started.append(paysim)
        wxcfg = await asyncio.to_thread(paysim.wechat_config)
        say(f"started the WeChat Pay simulator (API v3) at {paysim.url}")
        # The forwarder decrypts patients with the API's keys (development ones
        # unless HAOYUAN_DATA_KEYS is set, as the API does).
        crypto = worker_crypto({**os.environ, "HAOYUAN_ENV": "development"}, worker="demo")
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=8)
        cfg = EngineConfig(account_rate_per_s=2.0, account_burst=6,
                           patient_rate_per_s=2.0, patient_burst=6, cluster=cluster)
        async with Engine.connect(redis_url, cfg) as eng:
            if not cluster:
                await eng.client.flushall()
            wx = WechatPay(wxcfg)
            stack = Stack(redis_url, pg_dsn, his_url, eng, pool,
                          cluster=started[0] if cluster else None, pay_url=paysim.url, wx=wx,
                          his_sim=his_sim,
                          api_env={**wxpay_env(wxcfg), "HAOYUAN_HIS_NOTIFY_TOKEN": notify_token,
                                   # the ops dashboard's link (a staff token of the demo)
                                   "HAOYUAN_ADMIN_TOKEN": secrets.token_urlsafe(24)})
            writer = OutboxWriter(eng, pool, WriterConfig(block_ms=50))
            his = FhirHisClient(his_url, timeout=2.0)
            fwd = HisForwarder(eng, pool, his, ForwarderConfig(), crypto=crypto)
            inbound = HisInbound(eng, pool, his, InboundConfig(interval_s=2.0))
            refunds = RefundWorker(pool, wx, RefundConfig(backoff_base_s=0.2, backoff_cap_s=2.0,
                                                          idle_s=0.2))
            stack.tasks += [
                asyncio.create_task(writer.run(stack.stop)),
                asyncio.create_task(fwd.run(stack.stop)),
                asyncio.create_task(inbound.run(stack.stop)),
                asyncio.create_task(refunds.run(stack.stop)),
                asyncio.create_task(Sweeper(eng, interval_s=0.5).run(stack.stop)),
            ]
            say("writer, HIS forwarder (and its change poller), refund worker and sweeper "
                "running")
            try:
                yield stack
            finally:
                stack.stop.set()
                await asyncio.gather(*stack.tasks, return_exceptions=True)
                await his.aclose()
                await wx.aclose()
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
        self.stack = stack
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
        b = await self.call("confirm", self.pay_wechat(h.hold_id,
                                                       self.specs[h.session_id].fee))
        if b is not None and b.ok:
            self.booked[pat] = h.hold_id
            self.wanting.discard(pat)
            if prng.random() < 0.03:
                await asyncio.sleep(prng.uniform(0.5, 3))
                c = await self.call("cancel", self.eng.cancel(h.hold_id, account=acct))
                if c is not None and c.ok:
                    del self.booked[pat]

    async def pay_wechat(self, hold_id: str, fee: int) -> Any:
        """The patient pays in WeChat Pay (the simulator); its signed notification
        is verified and taken in as the API's notification route does."""
        import datetime as dt

        import httpx

        from engine.payments.intake import Incoming, take_payment

        async with httpx.AsyncClient(base_url=self.stack.pay_url, timeout=30) as http:
            got = (await http.post("/_sim/pay", json={"hold_id": hold_id, "amount": fee,
                                                     "deliver": False})).json()
        n = self.stack.wx.parse_notification(got["headers"], got["body"].encode())
        taken = await take_payment(self.eng, self.stack.pool, Incoming(
            provider=n.provider, transaction_id=n.transaction_id, hold_id=n.hold_id,
            payment_ref=n.transaction_id, amount=n.amount,
            paid_at=dt.datetime.fromisoformat(n.paid_at), out_trade_no=n.out_trade_no))
        out = taken.booked or taken.refused
        if out is None:
            raise RuntimeError(f"payment of {hold_id}: {taken.kind} {taken.reason}")
        return out

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
                if a is not None and a.free > 0 and a.status == "open":
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
                demo_http.api_server(stack.redis_url, stack.pg_dsn, out,
                                     extra_env=stack.api_env))
            if stack.his_sim:  # the HIS pushes its changes (a Subscription rest-hook)
                import httpx

                async with httpx.AsyncClient(timeout=5) as http:
                    await http.post(f"{stack.his_url}/_sim/config", json={
                        "notify_url": f"{api.url}/v1/his/notify",
                        "notify_token": stack.api_env["HAOYUAN_HIS_NOTIFY_TOKEN"]})
            say(f"API up at {api.url} (granian, 2 workers)")
            say(f"ops dashboard, live: {api.url}/ops/#token="
                f"{stack.api_env['HAOYUAN_ADMIN_TOKEN']}")
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
                    total_s=hscale.total_s, seed=seed, pay_url=stack.pay_url)
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
        disrupted = await disrupt(stack, specs, quick, say)
        if locust is not None:
            # Patients of the last call come in through the engine: everyone
            # who lost in the spike and still wants a unit.
            crowd.wanting = {f"demo-pat-{i}" for i in range(scale.patients)}
        # Each grab waits for its own payment (through WeChat Pay).
        await crowd.last_call(timeout_s=30)
        if killer is not None:
            await killer
            await _recover(stack, say, failover_figures)
        await _drain(stack, timeout_s=60)
        stop_sampling.set()
        await sampler
        money = await _money(stack, say)
        report = await run_audit(stack.engine, stack.pool, his=None)
        from engine.his.fhir import FhirHisClient

        his = FhirHisClient(stack.his_url, timeout=5.0)
        try:
            his_report = await run_audit(stack.engine, stack.pool, his)
        finally:
            await his.aclose()
        stopped = {sid for sid in disrupted.get("his_stopped_sessions", [])}
        summary = _summary(stats, scale, specs, report, his_report, sampled,
                           len(crowd.wanting), release_at - t0, spike_end - t0, locust,
                           stopped=stopped, money={**money, **disrupted})
        summary.update(await _day_stats(stack, date, http=locust is not None))
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
                                     and summary["undersold"] == 0 and summary["errors"] == 0
                                     and summary["reconcile_ok"]
                                     and summary["refunds_done"] == summary["refunds_due"])
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


async def _day_stats(stack: Stack, date: str, *, http: bool) -> dict[str, Any]:
    """The day's statistics (``haoyuan stats``): ``unmet_demand`` (accounts
    told "sold out" with no booking in that department-day at the end; the
    API counts demand, so None when the crowd called the engine in process),
    ``sold_out_ms`` per session (release to the first instant no unit was
    free; None: never), and the figures per department."""
    import datetime as dt

    from engine.stats import fold, stats, totals

    async with stack.pool.acquire() as conn:
        await fold(stack.engine, conn)
    day = dt.date.fromisoformat(date)
    rows = await stats(stack.pool, date_from=day, date_to=day)
    return {"unmet_demand": sum(r.unmet_demand for r in rows) if http else None,
            "sold_out_ms": {r.session_id: r.sold_out_after_release_ms for r in rows},
            "stats_by_department": totals(rows, ("date", "dept_id"))}


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
    from engine.refunds import refund_lag

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        lag = await outbox_lag(stack.engine.client)
        h = await his_lag(stack.pool)
        r = await refund_lag(stack.pool)
        if lag.pending == 0 and lag.undelivered == 0 and h.pending == 0 and \
                r.due + r.requested + r.failed == 0:
            return
        await asyncio.sleep(0.2)


async def disrupt(stack: Stack, specs: list[SessionSpec], quick: bool, say: Any
                  ) -> dict[str, Any]:
    """The HIS's own changes: a 停诊 or two and a few window cancels, entered in
    the HIS (the simulator) once the bookings reached it; the change poller
    (woken by the HIS's notification, or its own timer) applies them."""
    if not stack.his_sim:
        return {}
    import httpx

    await _drain(stack, timeout_s=60)
    rows = await stack.pool.fetch(
        "SELECT id, session_id FROM bookings WHERE status = 'booked' AND his_status ="
        " 'accepted' ORDER BY booked_at")
    by_session: dict[str, list[str]] = {}
    for r in rows:
        by_session.setdefault(r["session_id"], []).append(r["id"])
    order = [s.session_id for s in specs if by_session.get(s.session_id)]
    stop = order[-(1 if quick else 2):]  # the least wanted doctors stop
    cancels = [b for sid in order if sid not in stop for b in by_session[sid][:1]][
        :(3 if quick else 5)]
    async with httpx.AsyncClient(base_url=stack.his_url, timeout=10) as http:
        for sid in stop:
            await http.post("/_sim/his/suspend", json={"session_id": sid, "reason": "停诊"})
        for b in cancels:
            await http.post("/_sim/his/cancel", json={"booking_id": b, "reason": "window"})
    await stack.engine.poke_his()
    end = time.monotonic() + 30
    while time.monotonic() < end:
        recs = [await stack.engine.record(b) for b in cancels]
        states = [await stack.engine.session_status(sid) for sid in stop]
        if all(r is not None and r.state.value == "c" for r in recs) and \
                all(st == "suspended" for st in states):
            break
        await asyncio.sleep(0.2)
    say(f"the HIS stopped {len(stop)} session(s) (停诊) and cancelled {len(cancels)} "
        "appointment(s) at its window: units back, refunds due")
    return {"his_stopped_sessions": stop, "window_cancels": cancels}


async def _money(stack: Stack, say: Any) -> dict[str, Any]:
    """Refunds and payments once everything drained, and the day's reconciliation."""
    import datetime as dt

    import httpx

    from engine.reconcile import reconcile

    # WeChat Pay notifications still on their way (a payer who left mid-request
    # is notified all the same): the ledger must have them before the books close.
    async with httpx.AsyncClient(base_url=stack.pay_url, timeout=10) as http:
        for _ in range(300):
            if (await http.get("/_sim/deliveries")).json()["pending"] == 0:
                break
            await asyncio.sleep(0.1)
    await _drain(stack, timeout_s=60)
    row = await stack.pool.fetchrow(
        "SELECT (SELECT count(*) FROM refund_orders) AS due,"
        " (SELECT count(*) FROM refund_orders WHERE state = 'succeeded') AS done,"
        " (SELECT count(*) FROM payments) AS payments")
    causes = {r["cause"]: int(r["n"]) for r in await stack.pool.fetch(
        "SELECT cause, count(*) AS n FROM refund_orders GROUP BY cause ORDER BY cause")}
    days = [r["d"].isoformat() for r in await stack.pool.fetch(
        "SELECT DISTINCT (paid_at AT TIME ZONE 'Asia/Shanghai')::date AS d FROM payments")]
    days = days or [dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).date().isoformat()]
    reports = [await reconcile(stack.pool, stack.wx, d) for d in sorted(days)]
    counts: dict[str, int] = {}
    for r in reports:
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    ok = all(r.ok for r in reports)
    say(f"money: {row['payments']} payments, {row['due']} refunds due, {row['done']} done; "
        f"reconciliation {'OK' if ok else counts}")
    return {"refunds_due": int(row["due"]), "refunds_done": int(row["done"]),
            "payments": int(row["payments"]), "reconcile_ok": ok, "reconcile_counts": counts,
            "refund_causes": causes}


def _summary(stats: Stats, scale: Scale, specs: list[SessionSpec], audit: Any, his_audit: Any,
             sampled: dict[str, Any], still_wanting: int, release_t: float,
             end_t: float, locust: dict[str, Any] | None = None, *,
             stopped: set[str] | None = None, money: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    all_ms = [x for v in stats.lat.values() for x in v]
    n = len(all_ms)
    duration = max(1e-9, end_t - (release_t - 2.0))
    # A session stopped by the HIS (停诊) no longer offers its units.
    stopped = stopped or set()
    open_ = [s for s in audit.sessions if s.session_id not in stopped]
    booked_redis = sum(s.booked_redis for s in audit.sessions)
    booked_pg = sum(s.booked_postgres or 0 for s in audit.sessions)
    booked_his = sum(s.booked_his or 0 for s in his_audit.sessions)
    capacity = sum(s.capacity for s in open_)
    free = sum(s.free for s in open_)
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
    m = money or {}
    money_ok = bool(m.get("reconcile_ok", True)) and m.get("refunds_done") == m.get(
        "refunds_due")
    return {
        "ok": bool(audit.ok and his_audit.ok and oversold == 0 and undersold == 0
                   and head["errors"] == 0 and head["http_5xx"] == 0 and money_ok),
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
        #: Refund orders created and done (through the WeChat Pay simulator),
        #: payments in the ledger, and the day's reconciliation against its bill.
        "refunds_due": m.get("refunds_due", 0),
        "refunds_done": m.get("refunds_done", 0),
        "payments": m.get("payments", 0),
        "reconcile_ok": bool(m.get("reconcile_ok", False)),
        "reconcile_counts": m.get("reconcile_counts", {}),
        "refund_causes": m.get("refund_causes", {}),
        "his_stopped_sessions": m.get("his_stopped_sessions", []),
        "window_cancels": len(m.get("window_cancels", [])),
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
    print(f"money: {s['payments']} payments (WeChat Pay simulator), refunds due "
          f"{s['refunds_due']}, done {s['refunds_done']}; the HIS stopped "
          f"{len(s['his_stopped_sessions'])} session(s) (停诊) and cancelled "
          f"{s['window_cancels']} at its window; reconciliation "
          f"{'OK' if s['reconcile_ok'] else s['reconcile_counts']}")
    if s.get("plots"):
        print("plots: " + ", ".join(s["plots"]))
    print(f"verdict: {'OK' if s['ok'] else 'FAILED'}")
