"""Shared helpers for engine tests: specs, an engine on the private Redis,
bookings through the engine, draining the outbox writer, and throwaway
PostgreSQL databases."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from engine import Booked, Engine, EngineConfig, Held, SessionSpec, SlotSpec
from engine.writer import OutboxWriter, WriterConfig

NO_LIMITS = dict(account_rate_per_s=0.0, patient_rate_per_s=0.0)


async def wipe_and_rebuild(redis_url: str, pg_dsn: str) -> None:
    """Redis loses everything (FLUSHALL); ``rebuild`` puts PostgreSQL's back."""
    import redis.asyncio as aioredis

    from engine.rebuild import rebuild

    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    async with Engine.connect(redis_url) as eng:
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        try:
            await rebuild(eng, pool)
        finally:
            await pool.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def make_spec(
    sid: str = "S1",
    *,
    dept: str = "D1",
    doctor: str = "DR1",
    date: str = "2026-12-01",
    caps: Sequence[int] = (3, 2),
    release_at_ms: int | None = None,
    hold_ttl_ms: int = 600_000,
    scope: str = "dept",
    cutoff_ms: int = 0,
    starts_ms: int = 0,
    cancel_before_ms: int = 0,
) -> SessionSpec:
    slots = [
        SlotSpec(
            slot_id=f"{8 + i // 2:02d}{(i % 2) * 30:02d}",
            start=f"{8 + i // 2:02d}:{(i % 2) * 30:02d}",
            end=f"{8 + (i + 1) // 2:02d}:{((i + 1) % 2) * 30:02d}",
            capacity=c,
        )
        for i, c in enumerate(caps)
    ]
    return SessionSpec(
        session_id=sid,
        hospital="H1",
        dept=dept,
        doctor=doctor,
        date=date,
        period="AM",
        fee=5000,
        release_at_ms=now_ms() - 60_000 if release_at_ms is None else release_at_ms,
        slots=slots,
        hold_ttl_ms=hold_ttl_ms,
        scope=scope,  # type: ignore[arg-type]
        cutoff_ms=cutoff_ms,
        starts_ms=starts_ms,
        cancel_before_ms=cancel_before_ms,
    )


def config(**kw: object) -> EngineConfig:
    opts: dict[str, object] = dict(NO_LIMITS)
    opts.update(kw)
    return EngineConfig(**opts)  # type: ignore[arg-type]


async def book_many(eng: Engine, sid: str, n: int, prefix: str = "p") -> list[str]:
    """Hold and pay ``n`` units of slot 0800 of ``sid``; the booking ids."""
    ids = []
    for i in range(n):
        h = await eng.hold(sid, "0800", patient=f"{prefix}{i}", account=f"a{i}")
        assert isinstance(h, Held)
        b = await eng.confirm(h.hold_id, f"pay{i}")
        assert isinstance(b, Booked)
        ids.append(b.booking_id)
    return ids


async def drain(eng: Engine, pool: asyncpg.Pool, *, within_s: float = 60,
                **kw: Any) -> OutboxWriter:
    """Run the outbox writer in burst mode until the outbox is empty (at most
    ``within_s`` seconds); ``kw`` goes to its WriterConfig."""
    w = OutboxWriter(eng, pool, WriterConfig(block_ms=20, **kw))
    await asyncio.wait_for(w.run(asyncio.Event(), burst=True), timeout=within_s)
    return w


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@contextlib.asynccontextmanager
async def new_database(pg_dsn: str, name: str | None = None) -> AsyncIterator[str]:
    """CREATE DATABASE ``name`` (default: a unique ``api_...``) on the server of
    ``pg_dsn``; yields its DSN and drops it (WITH FORCE) afterwards."""
    if name is None:
        name = f"api_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(pg_dsn, name)
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
