"""Engine: the embeddable async core.

    async with Engine.connect("redis://127.0.0.1:6379/0") as eng:
        await eng.load_session(spec)
        held = await eng.hold("S1", "0800", patient=ref, account="a1")
        if held.ok:
            booked = await eng.confirm(held.hold_id, payment_ref="pay-1")

Every decision is one Lua script (``lua/``) run atomically in Redis; every
refusal comes back as a ``Refused`` value with a ``Reason``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from engine import keys as K
from engine import replies as R
from engine.config import EngineConfig
from engine.conservation import audit_snapshot
from engine.model import SessionSpec
from engine.outcomes import (
    MESSAGES,
    Availability,
    Booked,
    Cancelled,
    Code,
    Held,
    Loaded,
    Reason,
    Record,
    RecordState,
    Refused,
    Released,
    Rescheduled,
    Restore,
    SessionAudit,
    SessionAvailability,
    SlotAvailability,
    SlotLoad,
    Suspended,
    Waitlisted,
    decode_record,
)
from engine.replies import HoldReply, LineReply, Reply
from engine.scripts import AnyRedis, ScriptError, ScriptRunner

__all__ = ["Engine", "EngineConfig", "ScriptError", "SessionRef"]



@dataclass(frozen=True, slots=True)
class SessionRef:
    """What the engine must know of a session to name its keys."""

    session_id: str
    partition: int
    dept: str
    doctor: str
    date: str
    scope: str
    starts_ms: int = 0
    #: The hospital's limit of active holds and bookings per patient (0: the
    #: engine's default).
    max_active: int = 0

    @property
    def keys(self) -> K.SessionKeys:
        return K.SessionKeys(self.partition, self.session_id)

    @property
    def bundle(self) -> list[str]:
        return self.keys.bundle(self.rule_key)

    @property
    def rule_key(self) -> str:
        return K.PartitionKeys(self.partition).rule(self.scope, self.dept, self.doctor, self.date)


def _rnd() -> str:
    """A random number in [0, 1) for the anti-scalper delay of returned units.
    Truncated, not rounded, to six decimals: ``f"{0.9999996:.6f}"`` is
    "1.000000", which the scripts rightly refuse (once in ~2 million calls)."""
    return f"{int(random.random() * 1_000_000) / 1_000_000:.6f}"


def _gcra(rate_per_s: float) -> int:
    return 0 if rate_per_s <= 0 else max(1, round(1000.0 / rate_per_s))


@dataclass
class Engine:
    client: AnyRedis
    config: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        c = self.config
        if c.durability not in ("none", "aof-always", "aof-everysec", "wait"):
            raise ValueError(f"unknown durability mode {c.durability!r}")
        self.runner = ScriptRunner(
            self.client, batch=c.batch, in_flight=c.pipelines_in_flight,
            wait_replicas=c.wait_replicas if c.durability == "wait" else 0,
            wait_timeout_ms=c.wait_timeout_ms,
        )
        self._refs: dict[str, SessionRef] = {}
        self._ref_lookups: dict[str, asyncio.Future[SessionRef | None]] = {}
        self._own_client = False
        # Request ids for holds without a client key: unique per process run.
        self._process_tag = f"e{uuid.uuid4().hex[:12]}-"
        self._requests = 0

    # -- lifecycle -------------------------------------------------------
    @classmethod
    def connect(cls, url: str, config: EngineConfig | None = None) -> Engine:
        config = config or EngineConfig()
        client: AnyRedis
        if config.cluster:
            client = RedisCluster.from_url(
                url, socket_timeout=config.socket_timeout_s,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
            )
        else:
            # A blocking pool: a burst waits for a connection instead of failing.
            # Every script is idempotent (request ids, hold ids), so a command
            # whose connection broke may safely run again: retry a few times.
            pool = BlockingConnectionPool.from_url(
                url, socket_timeout=config.socket_timeout_s, max_connections=64, timeout=10,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
            )
            client = Redis(connection_pool=pool)
        eng = cls(client, config)
        eng._own_client = True
        return eng

    async def __aenter__(self) -> Engine:
        await self.check_durability()
        await self.runner.load_all()
        return self

    async def check_durability(self) -> None:
        """Refuse to run when Redis does not provide the configured mode."""
        mode = self.config.durability
        if mode not in ("aof-always", "aof-everysec"):
            return
        want = mode.removeprefix("aof-")
        conf: dict[Any, Any] = await self.client.config_get("append*")
        got = {_txt(k): _txt(v) for k, v in conf.items()}
        if got.get("appendonly") != "yes" or got.get("appendfsync") != want:
            raise RuntimeError(
                f"durability {mode!r} needs appendonly yes and appendfsync {want}; Redis has "
                f"appendonly {got.get('appendonly')} and appendfsync {got.get('appendfsync')}"
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    @property
    def _off(self) -> int:
        return self.config.clock_offset_ms

    async def server_time_ms(self) -> int:
        sec, usec = await self.client.time()
        return int(sec) * 1000 + int(usec) // 1000 + self._off

    # -- sessions --------------------------------------------------------
    async def load_session(
        self, spec: SessionSpec, *, open_partition: bool = True, epoch: str | None = None
    ) -> Loaded:
        """Create or update a session (never resetting live inventory).

        ``open_partition``: a partition without a recovery marker is opened
        with ``epoch`` (a new one if None): right for a new partition. A
        caller that knows the partition lost its data (``engine.recovery``)
        passes False: the session loads, but nothing in the partition sells
        until ``haoyuan rebuild`` reopens it."""
        p = K.partition_of(spec.dept, spec.date)
        sk, pk = K.SessionKeys(p, spec.session_id), K.PartitionKeys(p)
        marker = (epoch or new_epoch()) if open_partition else ""
        d = await self.runner.call(
            R.LOAD_SESSION,
            [sk.meta, sk.free, sk.units, pk.dept_day(spec.dept, spec.date), pk.sessions, pk.epoch],
            [spec.session_id, spec.lua_json(), marker, p],
        )
        await self.client.hset(K.SESSION_INDEX, spec.session_id, p)
        self._refs[spec.session_id] = SessionRef(
            spec.session_id, p, spec.dept, spec.doctor, spec.date, spec.scope, spec.starts_ms,
            spec.max_active_per_patient,
        )
        return Loaded(
            session_id=spec.session_id,
            partition=p,
            created=d.created,
            slots=[SlotLoad(s.id, s.cap, s.requested) for s in d.slots],
            open=bool(d.open),
        )

    # -- the recovery marker (lua/includes/bundle.lua ``recovering``) --------
    async def partition_epoch(self, partition: int) -> str | None:
        """The partition's recovery marker, or None: it lost its data or is
        being rebuilt, and nothing in it sells."""
        v = await self.client.get(K.PartitionKeys(partition).epoch)
        return None if v is None else _txt(v)

    async def partition_epochs(self, partitions: Sequence[int]) -> dict[int, str | None]:
        pipe = self.client.pipeline(transaction=False)
        for p in partitions:
            pipe.get(K.PartitionKeys(p).epoch)
        got = await pipe.execute()
        return {p: None if v is None else _txt(v) for p, v in zip(partitions, got, strict=True)}

    async def close_partition(self, partition: int) -> None:
        """Stop every decision of the partition (they answer ``recovering``)."""
        await self.client.delete(K.PartitionKeys(partition).epoch)

    async def open_partition(self, partition: int, epoch: str) -> None:
        """Let the partition sell again under ``epoch`` (after a rebuild)."""
        await self.client.set(K.PartitionKeys(partition).epoch, epoch)

    async def ref(self, session_id: str) -> SessionRef | None:
        """The session's partition and rule scope (cached in process: they never change)."""
        ref = self._refs.get(session_id)
        if ref is not None:
            return ref
        if not K.ID_RE.match(session_id):
            return None
        # A thousand callers missing the cache at once share one lookup.
        pending = self._ref_lookups.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[SessionRef | None] = asyncio.get_running_loop().create_future()
        self._ref_lookups[session_id] = fut
        try:
            ref = await self._lookup_ref(session_id)
            fut.set_result(ref)
            return ref
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: callers that share it re-raise it
            raise
        finally:
            del self._ref_lookups[session_id]

    async def _lookup_ref(self, session_id: str) -> SessionRef | None:
        p = await self.client.hget(K.SESSION_INDEX, session_id)
        if p is None:
            return None
        meta = await self.client.hmget(
            K.SessionKeys(int(p), session_id).meta,
            ["dept", "doctor", "date", "scope", "starts_ms", "max_active"],
        )
        if meta[0] is None:
            return None
        dept, doctor, date, scope, starts, max_active = (
            "" if v is None else _txt(v) for v in meta)
        ref = SessionRef(session_id, int(p), dept, doctor, date, scope, int(starts or 0),
                         int(max_active or 0))
        self._refs[session_id] = ref
        return ref

    async def _not_found(self, what: str) -> Refused:
        return Reply(o=Code.NOT_FOUND, now=await self.server_time_ms(), what=what).refused()

    async def set_capacity(
        self, session_id: str, slot_id: str, capacity: int
    ) -> SlotLoad | Refused:
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        d = await self.runner.call(
            R.SET_CAPACITY, [ref.keys.meta, ref.keys.free], [slot_id, capacity]
        )
        if not d.ok:
            return d.refused()
        return SlotLoad(slot_id, d.cap, d.requested)

    async def suspend(self, session_id: str, reason: str = "doctor_stopped") -> Suspended | Refused:
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        d = await self.runner.call(R.SUSPEND_SESSION, ref.bundle, [reason, self._off])
        await self._settle(d)
        if not d.ok:
            return d.refused()
        return Suspended(session_id, d.cancelled, d.released, d.now)

    async def pause(self, session_id: str, reason: str = "paused") -> Refused | None:
        """Pause sales of a session (暂停放号): holds and waitlist joins answer
        ``paused`` until ``resume``; bookings and holds stand. None when
        paused; a refusal for an unknown or suspended (停诊) session."""
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        d = await self.runner.call(R.PAUSE_SESSION, [ref.keys.meta], [reason, self._off])
        return None if d.ok else d.refused()

    async def dept_day_sessions(self, dept: str, date: str) -> list[str]:
        """The sessions of a department-day that Redis has."""
        p = K.partition_of(dept, date)
        return sorted(_txt(s) for s in await self.client.smembers(
            K.PartitionKeys(p).dept_day(dept, date)))

    async def resume(self, session_id: str) -> bool:
        ref = await self.ref(session_id)
        if ref is None:
            return False
        d = await self.runner.call(R.RESUME_SESSION, [ref.keys.meta], [self._off])
        return d.ok

    # -- the grab ----------------------------------------------------------
    async def hold(
        self,
        session_id: str,
        slot_id: str,
        *,
        patient: str,
        account: str,
        idempotency_key: str | None = None,
        channel: str = "app",
        arrived_ms: int = 0,
        reservation: str | None = None,
    ) -> Held | Refused:
        """Hold the lowest free unit of a slot for a patient.

        ``patient`` is the keyed hash of the patient's national ID (never the
        raw number); ``account`` the logged-in account; ``channel`` picks the
        pools (号源池) it may draw from. Without an idempotency key one is made
        up, so that a retry inside the client cannot hold twice.
        ``arrived_ms`` (Redis time, 0 = now) is when the caller received the
        request: one that arrived before the release instant is "not open",
        however late it is decided (a fair start). ``reservation`` names the
        patient-wide place the hold takes (default: its own request): a
        reschedule across partitions passes the old booking's, so the
        patient-wide count never sees two.
        """
        if not patient or not account or "|" in patient or "|" in account:
            raise ScriptError("patient and account are required (no '|')")
        pools = self.config.channel_pools.get(channel)
        if pools is None:
            raise ScriptError(f"unknown channel {channel!r}")
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        rq = idempotency_key or self._request_id()
        member = reservation or f"{account}:{rq}"
        c = self.config
        reserved = False  # a new patient-wide place, to give back if the hold fails
        if c.patient_rules:
            r = await self._reserve_patient(patient, member,
                                            ref.max_active or c.max_active_per_patient)
            if isinstance(r, Refused):
                return r
            reserved = r
        pk = sk_part(ref)
        d = await self.runner.call(
            R.HOLD_UNIT,
            [*ref.bundle, pk.idempotency(account, rq), pk.rate_account(account),
             pk.rate_patient(patient)],
            [session_id, slot_id, patient, account, pools,
             _gcra(c.account_rate_per_s), c.account_burst,
             _gcra(c.patient_rate_per_s), c.patient_burst,
             c.idempotency_ttl_ms, c.reclaim_per_hold, self._off,
             "0" if idempotency_key is None else "1", _rnd(), member,
             int(arrived_ms)],
        )
        await self._settle(d)
        if not d.ok:
            if reserved:  # compensation: the place this call reserved goes back
                await self._settle_patient(patient, member, 0)
            return d.refused()
        return _held(d)

    async def remember_refusal(
        self, session_id: str, slot_id: str, *, patient: str, account: str, idempotency_key: str
    ) -> Held | Refused:
        """A keyed hold answered "sold out" from a caller's cache: store that
        answer under the key (one tiny script, batched with the holds), so a
        retry with the key gets it again wherever it lands. If the key has an
        answer already (a retry, or a twin that won), that answer comes back
        instead, a hold included."""
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        key = K.PartitionKeys(ref.partition).idempotency(account, idempotency_key)
        d = await self.runner.call(
            R.REMEMBER_REFUSAL, [key],
            [session_id, slot_id, patient, int(Code.SOLD_OUT), self.config.idempotency_ttl_ms,
             self._off],
        )
        return _held(d) if d.ok else d.refused()

    async def binding(self, account: str, patient_id: str) -> str | None:
        """The patient ref of one of the account's patients from the binding
        mirror: the ref, ``""`` if the binding is known to be gone, ``None``
        if the mirror does not know it (ask the store). Batched with the holds."""
        got = await self.runner.call(R.READ_BINDING, [K.binding_mirror(account)], [patient_id])
        if got is None:
            return None
        return got.decode() if isinstance(got, bytes) else str(got)

    async def mirror_binding(self, account: str, patient_id: str, ref: str | None, *,
                             fill: bool = False) -> bool:
        """Write the mirror entry of a binding: its ref, or a tombstone
        (``ref=None``: unbound). ``fill=True`` writes only where the mirror has
        no entry (a miss filled from the store), so it never undoes a tombstone
        that an unbind wrote meanwhile. True if written."""
        if fill and ref is None:
            raise ValueError("fill needs a ref")
        n = await self.runner.call(R.WRITE_BINDING, [K.binding_mirror(account)],
                                   [patient_id, ref or "", "fill" if fill else "set"])
        return bool(n)

    async def unmirror_binding(self, account: str, patient_id: str) -> bool:
        """Drop a binding's ref from the mirror unless it is a tombstone (the
        binding is no longer verified: holds ask the store). True if dropped."""
        n = await self.runner.call(R.WRITE_BINDING, [K.binding_mirror(account)],
                                   [patient_id, "", "drop"])
        return bool(n)

    async def access(self, account: str, patient_id: str, token_id: str, token_exp_s: int
                     ) -> tuple[bool, str | None]:
        """One read for an account request (batched with the holds): whether
        the token was revoked, and the patient's ref from the binding mirror
        as ``binding`` answers it (``patient_id=""``: the token only)."""
        got = await self.runner.call(R.READ_ACCESS, [K.binding_mirror(account)],
                                     [patient_id, token_id, token_exp_s])
        ref = got[1]
        return bool(got[0]), (ref.decode() if isinstance(ref, bytes) else ref)

    async def revoke_tokens(self, account: str, token_id: str | None, until_s: int, *,
                            restore: bool = False) -> int:
        """Revoke one token (its id and expiry) or, with ``token_id=None``,
        every token of the account expiring at or before ``until_s`` (or one
        second past the previous bound, if that is later; ``restore``: the
        larger of the two). The bound written."""
        got = await self.runner.call(R.REVOKE_TOKENS, [K.binding_mirror(account)],
                                     [token_id or "", int(until_s), "restore" if restore else ""])
        return int(got)

    async def tokens_revoked_until(self, account: str) -> int:
        """The bound of the account's "every token" revocation (unix s; 0: none)."""
        got = await self.client.hget(K.binding_mirror(account), "~all")
        return int(got) if got is not None else 0

    async def limit(self, kind: str, client: str, *, take: bool, interval_ms: int,
                    burst: int) -> int:
        """A per-client limiter (``limitAttempts``): 0 if one more is allowed
        (and, with ``take``, counted), else the milliseconds to wait."""
        wait = await self.runner.call(R.LIMIT_ATTEMPTS, [K.limiter(kind, client)],
                                      ["take" if take else "peek", interval_ms, burst])
        return int(wait)

    async def take_place(self, account: str, *, rate_per_s: float, window_ms: int
                         ) -> LineReply:
        """A place in the waiting room's line for ``account`` (its existing
        one while that is waiting or admitted within ``window_ms``); the line
        is served at ``rate_per_s`` positions a second (``lua/takeTicket-2``)."""
        if not account or "|" in account:
            raise ScriptError("account is required (no '|')")
        got: LineReply = await self.runner.call(
            R.TAKE_TICKET, [K.WAITING_LINE, K.WAITING_PLACES],
            [account, repr(float(rate_per_s)), int(window_ms), self._off])
        return got

    async def read_line(self, *, rate_per_s: float) -> LineReply:
        """The waiting room's line now: served and issued positions (read only)."""
        got: LineReply = await self.runner.call(R.READ_LINE, [K.WAITING_LINE],
                                                [repr(float(rate_per_s))])
        return got

    async def _reserve_patient(self, patient: str, rq: str, limit: int) -> Refused | bool:
        """The hospital-wide step on the patient's partition (bans, active limit):
        a refusal, or whether a new place was reserved (False: this request id
        had one already, a retry)."""
        pk = K.PartitionKeys(K.partition_of_patient(patient))
        d = await self.runner.call(
            R.RESERVE_PATIENT, [pk.patient_active(patient), pk.patient_ban(patient)],
            [rq, limit, self.config.patient_reservation_ms,
             self._off],
        )
        return d.refused() if not d.ok else not d.rp

    async def _settle(self, d: Reply) -> None:
        """Apply the patient-wide settlements a script noted (every record it
        started or ended, offers included), in order."""
        if self.config.patient_rules:
            for patient, member, until_ms in d.settle:
                await self._settle_patient(patient, member, until_ms)

    async def _settle_patient(self, patient: str, rq: str, until_ms: int) -> None:
        pk = K.PartitionKeys(K.partition_of_patient(patient))
        await self.runner.call(R.SETTLE_PATIENT, [pk.patient_active(patient)], [rq, until_ms])

    async def active_count(self, patient: str) -> int:
        """The patient's active holds and bookings, hospital-wide (patient rules on)."""
        pk = K.PartitionKeys(K.partition_of_patient(patient))
        now = await self.server_time_ms()
        return int(await self.client.zcount(pk.patient_active(patient), now, "+inf"))

    async def ban(self, patient: str, until_ms: int) -> None:
        """Bar a patient from holding until a time (no-show policy); 0 lifts it."""
        pk = K.PartitionKeys(K.partition_of_patient(patient))
        if until_ms <= 0:
            await self.client.delete(pk.patient_ban(patient))
            return
        ttl = max(1, until_ms - await self.server_time_ms())
        await self.client.set(pk.patient_ban(patient), str(until_ms), px=ttl)

    async def join_waitlist(
        self, session_id: str, *, patient: str, account: str, channel: str = "app"
    ) -> Waitlisted | Refused:
        """候补: wait for a returned unit of a sold-out session."""
        pools = self.config.channel_pools.get(channel)
        if pools is None:
            raise ScriptError(f"unknown channel {channel!r}")
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        if self.config.patient_rules:
            # A banned patient may not queue for an offer either (the ban lives on
            # the patient's partition: read before the join, which changes nothing
            # for anyone else).
            pk = K.PartitionKeys(K.partition_of_patient(patient))
            until = await self.client.get(pk.patient_ban(patient))
            now = await self.server_time_ms()
            if until is not None and int(until) > now:
                return Reply(o=Code.BANNED, now=now, until_ms=int(until)).refused()
        d = await self.runner.call(R.JOIN_WAITLIST, ref.bundle,
                                   [patient, account, pools, self._off])
        if not d.ok:
            return d.refused()
        return Waitlisted(session_id, d.position, d.now, replay=bool(d.rp))

    async def leave_waitlist(self, session_id: str, *, patient: str, account: str) -> bool:
        ref = await self.ref(session_id)
        if ref is None:
            return False
        d = await self.runner.call(R.LEAVE_WAITLIST, [ref.keys.waitlist], [patient, account])
        return bool(d.removed)

    def _request_id(self) -> str:
        self._requests += 1
        return f"{self._process_tag}{self._requests:x}"

    async def _record_ref(self, record_id: str) -> SessionRef | None:
        try:
            K.partition_of_record(record_id)
            sid = K.session_of_record(record_id)
        except ValueError:
            return None
        return await self.ref(sid)

    async def confirm(self, hold_id: str, payment_ref: str) -> Booked | Refused:
        """Payment done: the hold becomes a booking (or refund due if it was lost)."""
        ref = await self._record_ref(hold_id)
        if ref is None:
            return await self._not_found("hold")
        d = await self.runner.call(R.CONFIRM_HOLD, ref.bundle,
                                   [hold_id, payment_ref, self._off, _rnd()])
        await self._settle(d)
        if not d.ok:
            return d.refused()
        return Booked(
            booking_id=d.id, session_id=d.sid, slot_id=d.slot, unit=d.unit,
            server_ms=d.now, late=bool(d.late), replay=bool(d.rp),
        )

    async def release(self, hold_id: str, *, account: str = "") -> Released | Refused:
        """The patient backs out of a hold. ``account`` restricts it to its owner."""
        ref = await self._record_ref(hold_id)
        if ref is None:
            return await self._not_found("hold")
        d = await self.runner.call(R.RELEASE_HOLD, ref.bundle,
                                   [hold_id, account, self._off, _rnd()])
        await self._settle(d)
        if not d.ok:
            return d.refused()
        return Released(hold_id, d.now, replay=bool(d.rp))

    async def reschedule(
        self,
        booking_id: str,
        *,
        account: str,
        session_id: str,
        slot_id: str,
        channel: str = "app",
        idempotency_key: str | None = None,
        max_reschedules: int = 0,
    ) -> Rescheduled | Refused:
        """改约: move a booking to another session or slot of the same
        partition in one atomic step (``lua/rescheduleBooking-20.lua``): the
        new unit is certain before the old one goes, the patient never holds
        both, and the per-patient rules see one booking throughout. Sessions
        of two partitions: ``NOT_FOUND`` (what = ``partition``); the API
        moves those with a hold, a swap and a compensation
        (``reschedule_across``)."""
        old = await self._record_ref(booking_id)
        if old is None:
            return await self._not_found("booking")
        new = await self.ref(session_id)
        if new is None:
            return await self._not_found("session")
        if new.partition != old.partition:
            return await self._not_found("partition")
        pools = self.config.channel_pools.get(channel)
        if pools is None:
            raise ScriptError(f"unknown channel {channel!r}")
        rq = idempotency_key or self._request_id()
        nk = new.keys
        rule = new.rule_key
        d = await self.runner.call(
            R.RESCHEDULE_BOOKING,
            [*old.bundle, nk.meta, nk.free, nk.units, nk.deadlines, nk.waitlist, nk.delayed,
             rule, sk_part(old).idempotency(account, f"rs:{rq}")],
            [booking_id, account, session_id, slot_id, pools, self.config.idempotency_ttl_ms,
             self._off, _rnd(), int(max_reschedules)])
        await self._settle(d)
        if not d.ok:
            return d.refused()
        return Rescheduled(booking_id=d.id, previous_id=d.old, session_id=d.sid,
                           slot_id=d.slot, unit=d.unit, fee=d.fee, previous_fee=d.old_fee,
                           server_ms=d.now, late=bool(d.late), replay=bool(d.rp))

    async def reschedule_across(
        self,
        booking_id: str,
        *,
        account: str,
        session_id: str,
        slot_id: str,
        channel: str = "app",
        max_reschedules: int = 0,
        idempotency_key: str | None = None,
    ) -> Rescheduled | Refused:
        """改约 to a session of another partition: a hold on the new unit (its
        patient-wide place is the old booking's: the count never sees two),
        booked with the old booking's payment, then the old booking cancelled
        ("rescheduled"); if that is refused (its deadline passed meanwhile),
        the new booking is cancelled ("reschedule_undone", no refund) and the
        old one stands. Nothing is lost either way: the patient ends with one
        booking, the old or the new."""
        old = await self.record(booking_id)
        if old is None or old.account != account:
            return await self._not_found("booking")
        if old.state is not RecordState.BOOKED:
            return Refused(Reason.INVALID_STATE, await self.server_time_ms(),
                           MESSAGES[Reason.INVALID_STATE], state=old.state.label)
        if max_reschedules and old.reschedules >= max_reschedules:
            return Refused(Reason.LIMIT_REACHED, await self.server_time_ms(),
                           MESSAGES[Reason.LIMIT_REACHED], what="reschedules")
        # The hold's key: the caller's (a retry finds the same hold) or a new one.
        key = f"rs-{idempotency_key}"[:64] if idempotency_key else self._request_id()
        held = await self.hold(session_id, slot_id, patient=old.patient, account=account,
                               idempotency_key=key, channel=channel,
                               reservation=old.request_id or None)
        if isinstance(held, Refused):
            return held
        booked = await self.confirm(held.hold_id, old.payment_ref or f"rs:{booking_id}")
        if isinstance(booked, Refused):
            await self.release(held.hold_id)
            return booked
        ended = await self.cancel(booking_id, account=account, reason="rescheduled")
        if isinstance(ended, Refused):
            await self.cancel(booked.booking_id, reason="reschedule_undone", force=True)
            if self.config.patient_rules:  # the old booking's place stands
                await self._settle_patient(old.patient, old.request_id,
                                           await self._booking_until(booking_id))
            return ended
        if self.config.patient_rules:
            # The old booking's place (shared by the new one) was dropped with
            # it: it is the new booking's now.
            await self._settle_patient(old.patient, old.request_id,
                                       await self._booking_until(booked.booking_id))
        return Rescheduled(booking_id=booked.booking_id, previous_id=booking_id,
                           session_id=session_id, slot_id=slot_id, unit=booked.unit,
                           fee=0 if old.fee is None else old.fee,
                           previous_fee=0 if old.fee is None else old.fee,
                           server_ms=booked.server_ms, late=ended.late, replay=booked.replay)

    async def _booking_until(self, booking_id: str) -> int:
        """Until when a booking counts patient-wide: the day after its visit
        (as ``confirmHold`` settles it)."""
        ref = await self._record_ref(booking_id)
        if ref is not None and ref.starts_ms > 0:
            return ref.starts_ms + 86_400_000
        return await self.server_time_ms() + 30 * 86_400_000

    async def cancel(
        self, booking_id: str, *, account: str = "", reason: str = "patient", force: bool = False
    ) -> Cancelled | Refused:
        """Cancel a booking. ``account`` restricts it to its owner; ``force`` skips
        the cancellation deadline (admin, HIS compensation)."""
        ref = await self._record_ref(booking_id)
        if ref is None:
            return await self._not_found("booking")
        d = await self.runner.call(
            R.CANCEL_BOOKING, ref.bundle,
            [booking_id, account, reason, "1" if force else "0", self._off, _rnd()],
        )
        await self._settle(d)
        if not d.ok:
            return d.refused()
        return Cancelled(booking_id, d.now, reason=d.reason or reason, late=bool(d.late),
                         replay=bool(d.rp))

    async def restore_booking(
        self,
        *,
        booking_id: str,
        session_id: str,
        slot_id: str,
        unit: int,
        patient: str,
        account: str,
        fee: int = 0,
        payment_ref: str = "",
        booked_at_ms: int = 0,
    ) -> Restore | Refused:
        """Put a booking PostgreSQL holds back on its own unit (rebuild,
        conflict compensation). Never revives a record Redis holds as
        cancelled, refunded or displaced (``Restore.KEPT_*``)."""
        ref = await self.ref(session_id)
        if ref is None:
            return await self._not_found("session")
        body = msgspec.json.encode({
            "id": booking_id, "sid": session_id, "slot": slot_id, "unit": unit,
            "pat": patient, "acct": account, "fee": fee, "pay": payment_ref,
            "bt": booked_at_ms or None,
        })
        d = await self.runner.call(R.RESTORE_BOOKING, ref.bundle, [body, self._off])
        await self._settle(d)
        if not d.ok:
            return d.refused()
        if d.ended:
            return Restore.kept(d.ended)
        return Restore.RESTORED if d.restored else Restore.ALREADY

    async def restore_stored(self, row: Mapping[str, Any]) -> Restore | Refused:
        """``restore_booking`` of a ``bookings`` row of PostgreSQL (id,
        session_id, slot_id, unit, patient_ref, account_id, fee_cents,
        payment_ref, booked_at)."""
        booked_at = row["booked_at"]
        return await self.restore_booking(
            booking_id=row["id"], session_id=row["session_id"], slot_id=row["slot_id"],
            unit=row["unit"], patient=row["patient_ref"], account=row["account_id"],
            fee=row["fee_cents"] or 0, payment_ref=row["payment_ref"] or "",
            booked_at_ms=int(booked_at.timestamp() * 1000) if booked_at else 0)

    async def raise_sequence(self, record_id: str) -> bool:
        """Keep new ids of the record's partition above ``record_id`` (a hold
        or booking id PostgreSQL holds, whatever its state). True if raised."""
        p = K.partition_of_record(record_id)
        seq = record_id.rsplit(".", 1)[1]
        return bool(await self.runner.call(R.RAISE_SEQUENCE, [K.PartitionKeys(p).seq], [seq]))

    async def note_mine(self, account: str, *entries: str, ttl_s: int = 2 * 86_400) -> None:
        """Index what an account has going: a hold or offer id, or a waitlist
        place ``w:<session>:<patient ref>``. A display index, not a decision:
        ``mine`` reads each entry's real state and drops what has ended."""
        if not entries:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(K.mine(account), *entries)
        pipe.expire(K.mine(account), ttl_s)
        await pipe.execute()

    async def mine(self, account: str) -> tuple[list[Record], list[tuple[str, str, int]]]:
        """The account's live holds (waitlist offers included) and its
        waitlist places ``(session, patient ref, position)``, from the index
        ``note_mine`` keeps; entries that have ended leave the index."""
        key = K.mine(account)
        now = await self.server_time_ms()
        holds: list[Record] = []
        places: list[tuple[str, str, int]] = []
        gone: list[str] = []
        for raw in sorted(await self.client.smembers(key)):
            entry = _txt(raw)
            if entry.startswith("w:"):
                _, sid, pat = entry.split(":", 2)
                ref = await self.ref(sid)
                rank: Any = None if ref is None else await self.client.zrank(
                    ref.keys.waitlist, f"{pat}|{account}")
                if isinstance(rank, int):
                    places.append((sid, pat, rank + 1))
                else:
                    gone.append(entry)
                continue
            rec = await self.record(entry)
            if rec is None or rec.account != account or rec.state is not RecordState.HELD \
                    or rec.deadline_ms <= now:
                gone.append(entry)
            else:
                holds.append(rec)
        if gone:
            await self.client.srem(key, *gone)
        return holds, places

    async def record(self, record_id: str) -> Record | None:
        """The stored hold/booking record (state and owner), or None."""
        try:
            p = K.partition_of_record(record_id)
        except ValueError:
            return None
        raw = await self.client.hget(K.PartitionKeys(p).records, record_id)
        return None if raw is None else decode_record(raw)

    # -- expiry --------------------------------------------------------------
    async def sweep(self, *, limit: int = 1000) -> int:
        """Reclaim every expired hold in every partition, release units whose
        anti-scalper delay has passed, and close waitlists past the cut-off.
        Returns how many holds expired."""
        now = await self.server_time_ms()
        total = 0
        for p in range(K.PARTITIONS):
            pk = K.PartitionKeys(p)
            due: set[str] = set()
            raw = await self.client.zrangebyscore(pk.deadlines, "-inf", now, start=0, num=limit)
            due |= {K.session_of_record(_txt(i)) for i in raw}
            due |= await self._sessions_with_delayed_work(p, now)
            for sid in sorted(due):
                ref = await self.ref(sid)
                if ref is None:
                    stale = [_txt(i) for i in raw if K.session_of_record(_txt(i)) == sid]
                    if stale:
                        await self.client.zrem(pk.deadlines, *stale)
                    continue
                while True:
                    d = await self.runner.call(R.EXPIRE_HOLDS, ref.bundle,
                                               [limit, self._off, _rnd()])
                    await self._settle(d)
                    total += d.expired
                    if d.expired + d.requeued + d.closed < limit:
                        break
        return total

    async def _sessions_with_delayed_work(self, p: int, now: int) -> set[str]:
        """Sessions of a partition with delayed units due or a waitlist to close."""
        sids = [_txt(x) for x in await self.client.smembers(K.PartitionKeys(p).sessions)]
        if not sids:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for sid in sids:
            sk = K.SessionKeys(p, sid)
            pipe.zcount(sk.delayed, "-inf", now)
            pipe.zcard(sk.waitlist)
            pipe.hget(sk.meta, "cutoff_ms")
        res = await pipe.execute()
        out = set()
        for i, sid in enumerate(sids):
            delayed, waiting, cutoff = res[3 * i : 3 * i + 3]
            cut = int(cutoff or 0)
            if int(delayed) > 0 or (int(waiting) > 0 and 0 < cut <= now):
                out.add(sid)
        return out

    # -- reads -----------------------------------------------------------------
    async def availability(
        self, session_id: str, channel: str = "app"
    ) -> SessionAvailability | None:
        ref = await self.ref(session_id)
        if ref is None:
            return None
        a = await self._availability([ref], self.config.channel_pools.get(channel, "0"))
        return a.sessions[0] if a.sessions else None

    async def dept_day_availability(
        self, dept: str, date: str, channel: str = "app"
    ) -> Availability:
        """Every session of a department-day, in one round trip."""
        p = K.partition_of(dept, date)
        members = await self.client.smembers(K.PartitionKeys(p).dept_day(dept, date))
        sids = sorted(_txt(s) for s in members)
        refs = [r for r in [await self.ref(s) for s in sids] if r is not None]
        if not refs:
            return Availability(server_ms=await self.server_time_ms(), sessions=[])
        return await self._availability(refs, self.config.channel_pools.get(channel, "0"))

    async def availabilities(
        self, session_ids: Sequence[str], channel: str = "app", *, chunk: int = 100
    ) -> tuple[int, dict[str, SessionAvailability]]:
        """Server time and the availability of many sessions (unknown ones
        left out): one read-only script per partition and ``chunk`` sessions,
        run concurrently (batched like every call)."""
        refs = [r for r in [await self.ref(s) for s in dict.fromkeys(session_ids)]
                if r is not None]
        groups: dict[int, list[SessionRef]] = {}
        for r in refs:
            groups.setdefault(r.partition, []).append(r)
        pools = self.config.channel_pools.get(channel, "0")
        calls = [self._availability(g[i:i + chunk], pools)
                 for g in groups.values() for i in range(0, len(g), chunk)]
        if not calls:
            return await self.server_time_ms(), {}
        got = await asyncio.gather(*calls)
        return (min(a.server_ms for a in got),
                {s.session_id: s for a in got for s in a.sessions})

    async def _availability(self, refs: list[SessionRef], pools: str = "0") -> Availability:
        keys: list[str] = []
        for r in refs:
            keys += [r.keys.meta, r.keys.free, r.keys.waitlist, r.keys.part.epoch]
        d = await self.runner.call(R.GET_AVAILABILITY, keys, [self._off, pools])
        return Availability(
            server_ms=d.now,
            sessions=[
                SessionAvailability(
                    session_id=s.sid, status=s.status, release_at_ms=s.release_ms,
                    cutoff_ms=s.cutoff_ms, waiting=s.waiting,
                    slots=[SlotAvailability(x.id, x.start, x.end, x.cap, x.free)
                           for x in s.slots],
                )
                for s in d.sessions
            ],
        )

    async def snapshot(self, session_id: str) -> dict[str, Any] | None:
        """An atomic read of a session: meta, free units, units in use with records."""
        ref = await self.ref(session_id)
        if ref is None:
            return None
        sk = ref.keys
        d = await self.runner.call(
            R.READ_SESSION,
            [sk.meta, sk.free, sk.units, sk_part(ref).records, sk.delayed, sk.waitlist],
            [self._off],
        )
        if d["meta"] is False:
            return None
        for k in ("free", "used", "delayed"):
            if d[k] == {}:
                d[k] = []
        return d

    async def session_status(self, session_id: str) -> str | None:
        """"open" or "suspended" as Redis has it; None for an unknown session."""
        ref = await self.ref(session_id)
        if ref is None:
            return None
        v = await self.client.hget(ref.keys.meta, "status")
        return None if v is None else _txt(v)

    async def session_ids(self) -> list[str]:
        return sorted(_txt(k) for k in await self.client.hkeys(K.SESSION_INDEX))

    # -- the HIS change poller's wake-ups ------------------------------------------
    async def poke_his(self) -> None:
        """The HIS notified a change: wake the change poller (coalesced: one
        pending wake-up at most)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(K.HIS_WAKE, "1")
        pipe.ltrim(K.HIS_WAKE, 0, 0)
        await pipe.execute()

    async def wait_his_poke(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a wake-up; True if one came."""
        # Under the socket timeout: a blocking read must not look like a dead server.
        wait = min(timeout_s, self.config.socket_timeout_s * 0.8)
        got = await self.client.blpop([K.HIS_WAKE], timeout=max(0.01, wait))
        return got is not None

    # -- audit -------------------------------------------------------------------
    async def audit(self, session_id: str) -> SessionAudit:
        """Check conservation (capacity = free + held + booked, per slot) and
        that no unit is free and in use at once, or held or booked twice."""
        snap = await self.snapshot(session_id)
        if snap is None:
            return SessionAudit(session_id, 0, 0, 0, 0, 0, False, ["session not found"], [])
        return audit_snapshot(session_id, snap)  # engine.conservation


def new_epoch() -> str:
    """A fresh recovery marker value."""
    return uuid.uuid4().hex[:16]


def _held(d: HoldReply) -> Held:
    return Held(hold_id=d.id, session_id=d.sid, slot_id=d.slot, unit=d.unit,
                expires_at_ms=d.dl, server_ms=d.now, replay=bool(d.rp))


def _txt(v: object) -> str:
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


def sk_part(ref: SessionRef) -> K.PartitionKeys:
    return K.PartitionKeys(ref.partition)



