"""The outbox writer: Redis streams -> PostgreSQL, at least once, idempotent.

Each partition's outbox stream (``hy:{p}:outbox``) is read with one consumer
group (``writers``); several writers share it. A batch is written in one
PostgreSQL transaction (``ON CONFLICT`` makes a redelivered entry a no-op)
and acknowledged only after commit. Entries of a dead writer are claimed with
``XAUTOCLAIM`` after ``claim_idle_ms``. An entry that fails ``max_deliveries``
times goes to the dead-letter stream and table, and the writer goes on.

A booking PostgreSQL refuses as a second booking of one unit (Redis lost a
write: the partial unique index is the arbiter) is recorded as a conflict,
refunded, cancelled in Redis and the earlier booking put back on its unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from redis.asyncio.cluster import RedisCluster

from engine import keys as K
from engine.engine import Engine, _txt
from engine.events import (
    Booked,
    Cancelled,
    OfferLapsed,
    OutboxEvent,
    RefundDue,
    WaitlistClosed,
    WaitlistOffer,
    decode_event,
)
from engine.store import outbox as store

log = logging.getLogger("haoyuan.writer")

GROUP = "writers"
DEAD_LETTERS = f"{K.PREFIX}:deadletter"




class OutboxLag(msgspec.Struct, frozen=True):
    pending: int
    undelivered: int
    oldest_pending_age_ms: int
    stream_length: int
    dead_letters: int


def _ts(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def outbox_lag(client: Any, partitions: Sequence[int] | None = None) -> OutboxLag:
    """Pending (delivered, not acknowledged) and undelivered entries, and the
    age of the oldest pending one, over every partition (or these)."""
    parts = list(range(K.PARTITIONS)) if partitions is None else list(partitions)
    now_s, now_us = await client.time()
    now = int(now_s) * 1000 + int(now_us) // 1000
    pipe = client.pipeline(transaction=False)
    for p in parts:
        s = K.PartitionKeys(p).outbox
        pipe.xlen(s)
        pipe.xpending(s, GROUP)
        pipe.execute_command("XINFO", "GROUPS", s)
    pipe.xlen(DEAD_LETTERS)
    res = await pipe.execute(raise_on_error=False)
    pending = undelivered = length = 0
    oldest = 0
    for i in range(len(parts)):
        xlen, xp, groups = res[3 * i : 3 * i + 3]
        length += int(xlen) if isinstance(xlen, int) else 0
        if isinstance(xp, dict) and xp.get("pending"):
            pending += int(xp["pending"])
            low = xp.get("min")
            if low:
                oldest = max(oldest, now - _entry_ms(_txt(low)))
        if isinstance(groups, list):
            for g in groups:
                info = _pairs(g)
                if info.get("name") == GROUP:
                    lag = info.get("lag")
                    undelivered += int(lag) if lag not in (None, "") else 0
                    break
            else:
                undelivered += int(xlen) if isinstance(xlen, int) else 0
    dead = res[-1] if isinstance(res[-1], int) else 0
    return OutboxLag(pending, undelivered, oldest, length, dead)


def _pairs(g: Any) -> dict[str, Any]:
    if isinstance(g, dict):
        return {_txt(k): (_txt(v) if isinstance(v, bytes) else v) for k, v in g.items()}
    it = iter(g)
    return {_txt(k): (_txt(v) if isinstance(v, bytes) else v) for k, v in zip(it, it, strict=False)}


@dataclass(slots=True)
class WriterConfig:
    batch_size: int = 500
    block_ms: int = 200
    claim_idle_ms: int = 5_000
    max_deliveries: int = 5
    consumer: str = ""
    #: Test hook: called after commit and before XACK (kill -9 lands here).
    after_commit: Callable[[int], Awaitable[None]] | None = None
    #: How often (seconds) the writer checks that Redis did not lose writes
    #: PostgreSQL committed, and closes a partition that did (engine.recovery);
    #: 0 = never (a rebuild's own drain).
    guard_interval_s: float = 2.0
    #: How often (seconds) the writer trims the outbox streams (0 = never):
    #: below the oldest entry any consumer group has not acknowledged, and
    #: never an entry younger than ``retain_ms`` (kept for inspection).
    trim_interval_s: float = 5.0
    retain_ms: int = 15 * 60_000
    #: How often (seconds), when idle, the writer moves the demand counts and
    #: sold-out instants from Redis into PostgreSQL (engine.stats.fold; 0 = never).
    fold_interval_s: float = 5.0


class OutboxWriter:
    def __init__(self, engine: Engine, pool: asyncpg.Pool, config: WriterConfig | None = None,
                 *, partitions: Sequence[int] | None = None):
        self.engine = engine
        self.client = engine.client
        self.pool = pool
        self.config = config or WriterConfig()
        if not self.config.consumer:
            self.config.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.partitions = list(range(K.PARTITIONS)) if partitions is None else list(partitions)
        self.streams = [K.PartitionKeys(p).outbox for p in self.partitions]
        self._partition_of = dict(zip(self.streams, self.partitions, strict=True))
        self.written = 0
        self.conflicts = 0
        self.dead = 0
        self.closed: list[int] = []
        self._last_claim = 0.0
        self._last_guard = -1e9
        self._last_trim = 0.0
        self._last_fold = 0.0
        self.trimmed = 0
        self._reported: set[tuple[int, str]] = set()

    async def ensure_groups(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for s in self.streams:
            pipe.xgroup_create(s, GROUP, id="0", mkstream=True)
        for r in await pipe.execute(raise_on_error=False):
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise r

    # -- the loop ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Write until ``stop`` is set (or, with ``burst``, until nothing is left)."""
        await self.ensure_groups()
        backoff = 0.1
        while not stop.is_set():
            try:
                n = await self.step()
                backoff = 0.1
                if burst and n == 0:
                    lag = await outbox_lag(self.client, self.partitions)
                    if lag.pending == 0 and lag.undelivered == 0:
                        return
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    ConnectionError, TimeoutError) as exc:
                log.warning("writer: store or redis unavailable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("writer step failed")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                continue
            # After any failure: check again before reading, and recreate the
            # consumer groups if Redis came back without them (NOGROUP).
            self._last_guard = -1e9
            with contextlib.suppress(Exception):
                await self.ensure_groups()

    async def guard(self) -> None:
        """Close every partition whose Redis lost writes PostgreSQL committed
        (engine.recovery): sales there wait for ``haoyuan rebuild``."""
        from engine.recovery import close_damaged

        found = await close_damaged(self.engine, self.pool)
        for c in found:
            if c.state != "lost" and c.partition not in self.closed:
                self.closed.append(c.partition)
            if (c.partition, c.state) not in self._reported:
                log.error("writer: partition %d needs `haoyuan rebuild` (%s: %s); its sales are"
                          " closed", c.partition, c.state, c.detail)
        self._reported = {(c.partition, c.state) for c in found}

    async def step(self) -> int:
        """One batch: claim dead writers' entries now and then, read new ones, write."""
        entries: list[tuple[str, str, dict[Any, Any]]] = []
        loop = asyncio.get_running_loop()
        every = self.config.guard_interval_s
        if every > 0 and loop.time() - self._last_guard >= every:
            # Before reading: entries written after a Redis restart would
            # otherwise hide that the stream lost its tail.
            await self.guard()
            self._last_guard = loop.time()
        if loop.time() - self._last_claim > self.config.claim_idle_ms / 2000:
            self._last_claim = loop.time()
            entries += await self._claim()
        if not entries:
            entries = await self._read_new()
        if not entries:
            if self.config.trim_interval_s > 0 and \
                    loop.time() - self._last_trim >= self.config.trim_interval_s:
                self._last_trim = loop.time()
                self.trimmed += await self.trim()
            if self.config.fold_interval_s > 0 and \
                    loop.time() - self._last_fold >= self.config.fold_interval_s:
                from engine.stats import fold

                self._last_fold = loop.time()
                async with self.pool.acquire() as conn:
                    await fold(self.engine, conn, self.partitions)
            return 0
        await self._write(entries)
        return len(entries)

    async def trim(self) -> int:
        """Trim each stream below the oldest entry that some consumer group
        still needs (its oldest pending entry, or its last delivered one) and
        below ``now - retain_ms``: an entry the writer (or
        any other consumer) has not acknowledged is never dropped. Returns
        how many entries went."""
        now = await self.engine.server_time_ms()
        floor = (max(0, now - self.config.retain_ms), 0)
        pipe = self.client.pipeline(transaction=False)
        for s in self.streams:
            pipe.execute_command("XINFO", "GROUPS", s)
        infos = await pipe.execute(raise_on_error=False)
        need: dict[str, tuple[int, int]] = {}
        pending_of: list[tuple[str, str]] = []
        for s, groups in zip(self.streams, infos, strict=True):
            if not isinstance(groups, list) or not groups:
                continue  # no consumer yet: nothing is known to be written
            low = floor
            for g in groups:
                info = _pairs(g)
                last = _stream_id(str(info.get("last-delivered-id") or "0-0"))
                # The last delivered entry itself stays: engine.recovery reads
                # the newest entry PostgreSQL committed to see a lost tail.
                low = min(low, last)
                if int(info.get("pending") or 0) > 0:
                    pending_of.append((s, str(info["name"])))
            need[s] = low
        if pending_of:
            pipe = self.client.pipeline(transaction=False)
            for s, g in pending_of:
                pipe.xpending(s, g)
            for (s, _g), xp in zip(pending_of, await pipe.execute(), strict=True):
                if isinstance(xp, dict) and xp.get("min"):
                    need[s] = min(need[s], _stream_id(_txt(xp["min"])))
        if not need:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for s, low in need.items():
            pipe.xtrim(s, minid=f"{low[0]}-{low[1]}", approximate=False)
        return sum(int(n) for n in await pipe.execute() if isinstance(n, int))

    async def _read_new(self) -> list[tuple[str, str, dict[Any, Any]]]:
        """New entries of every stream. One blocking XREADGROUP over all the
        streams on one Redis; on a cluster, where one command may not cross
        hash slots, one XREADGROUP per stream, pipelined per node by the
        cluster client (which follows slot moves and failovers), and a short
        sleep when nothing came."""
        entries: list[tuple[str, str, dict[Any, Any]]] = []
        if not isinstance(self.client, RedisCluster):
            res: Any = await self.client.xreadgroup(
                GROUP, self.config.consumer, {s: ">" for s in self.streams},
                count=self.config.batch_size, block=self.config.block_ms,
            )
            for stream, items in res or []:
                for eid, fields in items:
                    entries.append((_txt(stream), _txt(eid), fields))
            return entries
        per_stream = max(1, self.config.batch_size // max(1, len(self.streams)) * 4)
        pipe = self.client.pipeline(transaction=False)
        for s in self.streams:
            pipe.xreadgroup(GROUP, self.config.consumer, {s: ">"}, count=per_stream)
        for res in await pipe.execute():
            for stream, items in res or []:
                for eid, fields in items:
                    entries.append((_txt(stream), _txt(eid), fields))
        if not entries:
            await asyncio.sleep(self.config.block_ms / 1000)
        return entries

    async def _claim(self) -> list[tuple[str, str, dict[Any, Any]]]:
        out: list[tuple[str, str, dict[Any, Any]]] = []
        for s in self.streams:
            res: Any = await self.client.xautoclaim(
                s, GROUP, self.config.consumer, self.config.claim_idle_ms, "0-0",
                count=self.config.batch_size,
            )
            for eid, fields in res[1]:
                if fields is not None:
                    out.append((s, _txt(eid), fields))
            if len(out) >= self.config.batch_size:
                break
        return out

    # -- writing ----------------------------------------------------------------
    async def _write(self, entries: list[tuple[str, str, dict[Any, Any]]]) -> None:
        decoded: list[tuple[str, str, OutboxEvent]] = []
        poison: list[tuple[str, str, str, str]] = []
        for stream, eid, fields in entries:
            raw = fields.get(b"e", fields.get("e"))
            try:
                if raw is None:
                    raise TypeError("entry has no field e")
                decoded.append((stream, eid, decode_event(raw)))
            except (msgspec.DecodeError, TypeError) as exc:
                poison.append((stream, eid, _txt(raw) if raw is not None else "", str(exc)))
        conflicts: list[tuple[OutboxEvent, str | None]] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                for _stream, eid, ev in decoded:
                    c = await self._apply(conn, ev, eid)
                    if c is not None:
                        conflicts.append((ev, c or None))
                await self._record_applied(conn, [(s, e) for s, e, _ in decoded])
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
            raise
        except asyncpg.PostgresError:
            # One entry is poison: write them one by one to find it.
            await self._write_one_by_one(decoded)
            decoded = []
        if self.config.after_commit is not None:
            await self.config.after_commit(len(entries))
        for ev, winner in conflicts:
            await self._compensate(ev, winner)
        for stream, eid, payload, err in poison:
            await self._dead_letter(stream, eid, payload, err, deliveries=1)
        # A waitlist offer is a hold made for someone else: the patient's
        # account finds it in GET /v1/holds (before the ack: at least once).
        for _s, _e, ev in decoded:
            if isinstance(ev, WaitlistOffer):
                with contextlib.suppress(Exception):
                    await self.engine.note_mine(ev.acct, ev.id)
        await self._ack([(s, e) for s, e, _ in decoded])
        self.written += len(decoded)
        for _s, _e, ev in decoded:
            if isinstance(ev, Cancelled) and ev.late:
                await self._late_cancel(ev)

    async def _late_cancel(self, ev: OutboxEvent) -> None:
        """A patient's late cancel counts toward the no-show policy: check the
        ban now that the cancel is recorded (after commit; a failure here is
        logged and the next strike checks again)."""
        from engine.rules import Rules, check_ban, load_rules

        try:
            row = await self.pool.fetchrow(
                "SELECT hospital_id, dept_id FROM sessions WHERE id = $1", ev.sid)
            rules = (await load_rules(self.pool, row["hospital_id"])).for_dept(
                row["dept_id"]) if row is not None else Rules()
            await check_ban(self.pool, self.engine, ev.pat, rules)
        except Exception:
            log.exception("writer: no-show policy check after a late cancel of %s failed", ev.id)

    async def _write_one_by_one(self, decoded: list[tuple[str, str, OutboxEvent]]) -> None:
        for stream, eid, ev in decoded:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    winner = await self._apply(conn, ev, eid)
                    await self._record_applied(conn, [(stream, eid)])
                if winner is not None:
                    await self._compensate(ev, winner or None)
                await self._ack([(stream, eid)])
                self.written += 1
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                raise
            except asyncpg.PostgresError as exc:
                deliveries = await self._deliveries(stream, eid)
                if deliveries >= self.config.max_deliveries:
                    await self._dead_letter(stream, eid, msgspec.json.encode(ev).decode(),
                                            f"{type(exc).__name__}: {exc}", deliveries)
                else:
                    log.warning("writer: entry %s failed (%s); will retry", eid,
                                type(exc).__name__)

    async def _record_applied(self, conn: Any, done: list[tuple[str, str]]) -> None:
        """In the batch's transaction: the newest entry of each partition that
        PostgreSQL now holds (engine.recovery compares it with Redis)."""
        newest: dict[int, tuple[int, int]] = {}
        for stream, eid in done:
            p = self._partition_of.get(stream)
            if p is None:
                continue
            ms, _, seq = eid.partition("-")
            at = (int(ms), int(seq or 0))
            if at > newest.get(p, (0, 0)):
                newest[p] = at
        if newest:
            await conn.executemany(
                "INSERT INTO redis_partitions (partition, applied_ms, applied_seq)"
                " VALUES ($1, $2, $3) ON CONFLICT (partition) DO UPDATE SET"
                " applied_ms = $2, applied_seq = $3 WHERE (redis_partitions.applied_ms,"
                " redis_partitions.applied_seq) < ($2, $3)",
                [(p, at[0], at[1]) for p, at in sorted(newest.items())])

    async def _deliveries(self, stream: str, eid: str) -> int:
        rows = await self.client.xpending_range(stream, GROUP, min=eid, max=eid, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _ack(self, done: list[tuple[str, str]]) -> None:
        by_stream: dict[str, list[str]] = {}
        for s, e in done:
            by_stream.setdefault(s, []).append(e)
        if not by_stream:
            return
        pipe = self.client.pipeline(transaction=False)
        for s, ids in by_stream.items():
            pipe.xack(s, GROUP, *ids)
        await pipe.execute()

    async def _dead_letter(self, stream: str, eid: str, payload: str, error: str,
                           deliveries: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox_dead_letters (stream, entry_id, payload, error, deliveries)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream, entry_id) DO NOTHING",
                stream, eid, payload, error[:2000], deliveries,
            )
        await self.client.xadd(DEAD_LETTERS, {"stream": stream, "id": eid, "payload": payload,
                                              "error": error[:2000]}, maxlen=100_000)
        await self._ack([(stream, eid)])
        self.dead += 1
        log.error("writer: entry %s of %s dead-lettered after %d deliveries", eid, stream,
                  deliveries)

    async def _apply(self, conn: Any, ev: OutboxEvent, eid: str) -> str | None:
        """Write one event (its SQL: ``engine.store.outbox``). Returns None, or
        the winning booking id ('' if unknown) when a booked event hit a unit
        PostgreSQL already has booked."""
        result: str | None = None
        match ev:
            case Booked():
                result = await store.record_booked(conn, ev, eid)
            case Cancelled():
                await store.record_cancelled(conn, ev, eid)
            case RefundDue():
                await store.record_refund_due(conn, ev, eid)
            case WaitlistOffer() | WaitlistClosed() | OfferLapsed():
                pass  # the notification itself: in the history below
        await store.record_event(conn, ev, eid)
        return result

    async def _compensate(self, ev: OutboxEvent, winner: str | None) -> None:
        """The later booking of a unit loses: cancelled in Redis (its refund is
        recorded), and the earlier one is put back on its unit."""
        self.conflicts += 1
        log.error("writer: conflict on session %s unit %d: booking %s cancelled, winner %s",
                  ev.sid, ev.unit, ev.id, winner)
        await self.engine.cancel(ev.id, reason="conflict", force=True)
        if not winner:
            return
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT id, session_id, slot_id, unit, patient_ref, account_id, fee_cents,"
                " payment_ref, booked_at FROM bookings WHERE id = $1 AND status = 'booked'",
                winner,
            )
        if row is not None:
            await self.engine.restore_stored(row)
