"""``Api``: what one worker process holds — the engine, the PostgreSQL pool,
keys, the hot-path caches, metrics — opened and closed by the app's lifespan.

Handlers reach it as ``api_of(request)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Literal, NamedTuple

import asyncpg
import msgspec
import structlog
from redis.exceptions import RedisError

from api.auth import (
    Bearer,
    Code2SessionVerifier,
    CodeVerifier,
    DevCodeVerifier,
    TokenSigner,
    client_address,
)
from api.demand import DemandLog
from api.hardening import BodyDeadlines
from api.hotpath import Admission, MicroCache, ReleaseTimes, ServerClock, SoldOut
from api.metrics import Metrics
from api.settings import DEV_WARNING, Settings, SettingsError
from api.waiting import WaitingRoom
from engine.engine import Engine
from engine.forwarder import his_lag
from engine.identity import RealNameVerifier
from engine.identity.http import HttpRealNameVerifier
from engine.identity.simulator import SimulatedRealName
from engine.keys import ID_RE, partition_of_record
from engine.outcomes import Availability
from engine.payments.wechat import WechatPay
from engine.refunds import refund_lag
from engine.store import bindings
from engine.store.migrate import migrate
from engine.writer import outbox_lag

__all__ = ["Access", "Api", "LimitKind", "OpsStatus", "api_of"]

log = structlog.get_logger("haoyuan.api")


class OpsStatus(msgspec.Struct, kw_only=True):
    redis: bool
    postgres: bool
    writer_known: bool = False
    writer_pending: int = 0
    writer_undelivered: int = 0
    dead_letters: int = 0
    writer_oldest_pending_age_ms: int = 0
    outbox_stream_length: int = 0
    his_pending: int = 0
    his_oldest_pending_age_s: float = 0.0
    #: Terminal HIS states waiting for an operator (haoyuan his resolve).
    his_lookup_cancelled: int = 0
    his_cancel_refused: int = 0
    #: Refund orders not done yet, and those failed past their attempts.
    refunds_due: int = 0
    refunds_requested: int = 0
    refunds_failed: int = 0
    refunds_stuck: int = 0
    refunds_oldest_open_age_s: float = 0.0
    checked_at_ms: int = 0
    mode: str = "production"
    warning: str | None = None


class Access(NamedTuple):
    """What an account request may do with one of its patients (``Api.patient_access``)."""

    revoked: bool = False
    #: The engine's patient ref; None: not bound to the account.
    ref: str | None = None
    verified: bool = False


LimitKind = Literal["admin-failure", "login-failure", "new-account"]


class Api:
    def __init__(self, settings: Settings) -> None:
        s = self.settings = settings
        self.crypto = s.resolved_crypto()
        self.tokens = TokenSigner(s.token_secret, s.token_ttl_s)
        self.verifier: CodeVerifier
        if s.wechat_mode == "code2session":
            self.verifier = Code2SessionVerifier(s.wechat_url, s.wechat_appid, s.wechat_secret,
                                                 timeout_s=s.wechat_timeout_s)
        elif s.development:  # dev-<openid> codes: only ever in development mode
            self.verifier = DevCodeVerifier()
        else:  # pragma: no cover - Settings refuses it
            raise SettingsError("the development login verifier exists only in development")
        self.metrics = Metrics()
        self.clock = ServerClock()
        self.release_times = ReleaseTimes(s.release_cache_ttl_ms)
        self.soldout = SoldOut(s.soldout_ttl_ms)
        self.availability_cache: MicroCache[str, bytes] = MicroCache(s.availability_ttl_ms)
        self.catalog_cache: MicroCache[Any, bytes] = MicroCache(s.catalog_ttl_ms)
        self.admission = Admission(s.max_inflight, s.max_loop_lag_ms)
        self.realname: RealNameVerifier = (
            HttpRealNameVerifier(s.realname_url, s.realname_key, timeout_s=s.realname_timeout_s)
            if s.realname_mode == "http"
            else SimulatedRealName()
        )
        self.body_deadlines = BodyDeadlines(s.body_timeout_s)
        #: WeChat Pay (verifies and decrypts notifications); None: not configured.
        self.wxpay: WechatPay | None = WechatPay(s.wxpay) if s.wxpay is not None else None
        self.engine: Engine = Engine.connect(s.redis_url, s.engine_config())
        self.demand = DemandLog(self.engine)
        self.waiting = WaitingRoom(self.engine, s.token_secret, rate_per_s=s.waiting_room_rate,
                                   window_s=s.waiting_room_window_s,
                                   refresh_ms=s.waiting_room_refresh_ms)
        self._pool: asyncpg.Pool | None = None
        self._ops: MicroCache[str, OpsStatus] = MicroCache(int(s.ops_cache_s * 1000))
        #: Partitions PostgreSQL knows, and session -> partition, for telling
        #: "recovering" (Redis lost it) from "not found" (engine.recovery).
        self._known_parts: MicroCache[str, frozenset[int]] = MicroCache(5000)
        self._session_parts: MicroCache[str, int | None] = MicroCache(2000)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        if s.development:  # every worker, every start: never silently
            log.warning("development_mode", mode="development", detail=DEV_WARNING)
        else:
            log.info("starting", mode="production")
        try:
            # The configured durability must hold before any write is
            # acknowledged (HAOYUAN_DURABILITY): a mismatch refuses to start.
            await self.engine.check_durability()
        except (OSError, RedisError) as exc:
            log.error("redis_unavailable_at_startup", error=type(exc).__name__)
        try:
            await self.engine.runner.load_all()
            await self.clock.calibrate(self.engine.server_time_ms)
        except Exception as exc:  # Redis down at startup: serve 503s, readiness says so
            log.error("redis_unavailable_at_startup", error=type(exc).__name__)
        if s.migrate:
            try:
                await migrate(s.pg_dsn)
            except Exception as exc:
                log.error("migrations_failed", error=type(exc).__name__)
        self._pool = await asyncpg.create_pool(
            s.pg_dsn, min_size=0, max_size=s.pg_pool_max, command_timeout=10
        )
        self._tasks.append(asyncio.create_task(self._recalibrate()))
        self._tasks.append(asyncio.create_task(self.body_deadlines.watch(self._stop)))
        if s.max_loop_lag_ms > 0:
            self._tasks.append(asyncio.create_task(self.admission.watch_loop(self._stop)))
        if self.waiting.enabled:
            self._tasks.append(asyncio.create_task(self.waiting.watch(self._stop)))
        self._tasks.append(asyncio.create_task(self.demand.run(self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):  # the last second's demand
            await self.demand.flush()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._pool is not None:
            await self._pool.close()
        await self.engine.aclose()
        await self.verifier.aclose()
        await self.realname.aclose()
        if self.wxpay is not None:
            await self.wxpay.aclose()

    async def _recalibrate(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 30)
                return
            try:
                await self.clock.calibrate(self.engine.server_time_ms, samples=3)
            except Exception as exc:
                log.warning("clock_calibration_failed", error=type(exc).__name__)

    async def recovering(self, partition: int) -> bool:
        """Whether a partition PostgreSQL knows is closed in Redis (no recovery
        marker: it lost its data, or a rebuild runs). Only asked on a path
        that found nothing in Redis."""
        if await self.engine.partition_epoch(partition) is not None:
            return False

        async def load() -> frozenset[int]:
            rows = await self.pool.fetch(
                "SELECT partition FROM redis_partitions WHERE epoch <> ''"
                " UNION SELECT DISTINCT partition FROM sessions")
            return frozenset(r["partition"] for r in rows)

        return partition in await self._known_parts.get("all", load)

    async def record_recovering(self, record_id: str) -> bool:
        """A hold or booking Redis does not have, in a partition that is recovering."""
        try:
            partition = partition_of_record(record_id)
        except ValueError:
            return False
        return await self.recovering(partition)

    async def session_recovering(self, session_id: str) -> bool:
        """A session PostgreSQL has that Redis lost (the engine answered
        not-found): its partition is recovering."""
        if not ID_RE.match(session_id):
            return False

        async def load() -> int | None:
            p = await self.pool.fetchval("SELECT partition FROM sessions WHERE id = $1",
                                         session_id)
            return None if p is None else int(p)

        part = await self._session_parts.get(session_id, load)
        return part is not None and await self.recovering(part)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the API is not started")
        return self._pool

    # ------------------------------------------------------------------ helpers
    async def patient_access(self, who: Bearer, patient_id: str) -> Access:
        """Whether the token was revoked, and the patient ref of one of the
        account's patients with its verification, in one batched Redis read
        (``Engine.access``): every hold sees a revocation, an unbind or a
        verification at once, on every worker. The binding mirror carries a
        ref only for verified bindings, so a hit needs nothing else; a miss
        asks PostgreSQL and fills the mirror for a verified binding (only
        where it has no entry: a late fill never undoes a tombstone)."""
        # "-" is no patient id (nor is a "~" field of the account's hash).
        field = "-" if not patient_id or patient_id[0] == "~" else patient_id
        revoked, ref = await self.engine.access(who.account, field, who.token_id, who.exp)
        if revoked:
            return Access(revoked=True)
        if ref == "":
            return Access()  # unbound (tombstone)
        if ref is not None:
            return Access(ref=ref, verified=True)
        st = await bindings.binding_state(self.pool, who.account, patient_id)
        if st is None:
            return Access()
        if st.verified:
            await self.engine.mirror_binding(who.account, patient_id, st.ref, fill=True)
        return Access(ref=st.ref, verified=st.verified)

    async def token_revoked(self, who: Bearer) -> bool:
        revoked, _ = await self.engine.access(who.account, "", who.token_id, who.exp)
        return revoked

    async def limit(self, kind: LimitKind, scope: Any, *, take: bool) -> int:
        """A per-client limit (see ``Settings``): 0 if one more is allowed (and,
        with ``take``, counted), else the milliseconds to wait. Open while
        Redis is unreachable: a limit slows abuse down, it authorises nothing
        (a token's revocation, which does, fails closed)."""
        s = self.settings
        burst, interval_s = {
            "admin-failure": (s.admin_failures_burst, s.admin_failures_interval_s),
            "login-failure": (s.login_failures_burst, s.login_failures_interval_s),
            "new-account": (s.new_accounts_burst, s.new_accounts_interval_s),
        }[kind]
        if interval_s <= 0 or burst < 1:
            return 0
        client = self.crypto.client_hash(client_address(scope, s.client_ip_header))
        try:
            return await self.engine.limit(kind, client, take=take,
                                           interval_ms=max(1, int(interval_s * 1000)),
                                           burst=burst)
        except (RedisError, OSError) as exc:
            log.warning("client_limit_unavailable", kind=kind, error=type(exc).__name__)
            return 0

    def learn(self, availability: Availability) -> None:
        """Feed an availability read into the local caches and the inventory gauges."""
        for s in availability.sessions:
            self.release_times.set(s.session_id, s.release_at_ms)
            for slot in s.slots:
                if slot.free > 0:
                    self.soldout.clear(s.session_id, slot.slot_id)
            self.metrics.inventory(s.session_id, s.free, s.capacity)

    async def ops_status(self) -> OpsStatus:
        return await self._ops.get("ops", self._check_ops)

    async def _check_ops(self) -> OpsStatus:
        redis_ok = pg_ok = False
        st = OpsStatus(redis=False, postgres=False, checked_at_ms=int(time.time() * 1000),
                       mode=self.settings.env,
                       warning=DEV_WARNING if self.settings.development else None)
        try:
            redis_ok = bool(await asyncio.wait_for(self.engine.client.ping(), 2))
        except Exception:
            redis_ok = False
        try:
            async with asyncio.timeout(2):
                pg_ok = (await self.pool.fetchval("SELECT 1")) == 1
                if pg_ok:
                    his = await his_lag(self.pool)  # the forwarder's own measure
                    st.his_pending = his.pending
                    st.his_oldest_pending_age_s = his.oldest_pending_age_ms / 1000
                    st.his_lookup_cancelled = his.lookup_cancelled
                    st.his_cancel_refused = his.cancel_refused
                    money = await refund_lag(self.pool)  # the refund worker's own measure
                    st.refunds_due, st.refunds_requested = money.due, money.requested
                    st.refunds_failed, st.refunds_stuck = money.failed, money.stuck
                    st.refunds_oldest_open_age_s = money.oldest_open_age_s
        except Exception:
            pg_ok = False
        st.redis, st.postgres = redis_ok, pg_ok
        if redis_ok:
            try:
                lag = await asyncio.wait_for(outbox_lag(self.engine.client), 2)
                st.writer_known = True
                st.writer_pending = int(lag.pending)
                st.writer_undelivered = lag.undelivered
                st.dead_letters = lag.dead_letters
                st.writer_oldest_pending_age_ms = int(lag.oldest_pending_age_ms)
                st.outbox_stream_length = int(lag.stream_length)
            except Exception as exc:
                log.warning("writer_lag_unknown", error=type(exc).__name__)
        m = self.metrics
        m.writer_pending.set(st.writer_pending)
        m.writer_undelivered.set(st.writer_undelivered)
        m.dead_letters.set(st.dead_letters)
        m.writer_age.set(st.writer_oldest_pending_age_ms / 1000)
        m.stream_length.set(st.outbox_stream_length)
        m.his_pending.set(st.his_pending)
        m.his_age.set(st.his_oldest_pending_age_s)
        m.his_attention.labels("lookup_cancelled").set(st.his_lookup_cancelled)
        m.his_attention.labels("cancel_refused").set(st.his_cancel_refused)
        for state in ("due", "requested", "failed", "stuck"):
            m.refund_orders.labels(state).set(getattr(st, f"refunds_{state}"))
        m.refund_age.set(st.refunds_oldest_open_age_s)
        return st


def api_of(request: Any) -> Api:
    api: Api = request.app.state.api
    return api
