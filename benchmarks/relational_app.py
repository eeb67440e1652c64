"""The relational design of the seed documents, as a peer for the spike benchmark.

What a Spring Boot + MySQL booking service does at release time, here on
PostgreSQL behind the same HTTP stack as haoyuan's API (Litestar, msgspec,
granian, uvloop, the same worker count): one ``@Transactional`` method per
hold, on a pool of 10 connections per worker (HikariCP's default)::

    BEGIN;
    UPDATE slots SET remaining = remaining - 1
     WHERE session_id = $1 AND slot_id = $2 AND remaining > 0
    RETURNING remaining;                     -- no row: sold out, ROLLBACK
    INSERT INTO bookings (session_id, slot_id, patient_id) VALUES ($1, $2, $3);
    COMMIT;

The row lock taken by the UPDATE serialises every buyer of one slot: that is
the design's correctness (no oversell) and its bottleneck (one hot row).
A UNIQUE (session_id, patient_id) index is the relational form of "one
booking per patient per session"; a violation rolls the transaction back.

It does *less* than haoyuan's API on purpose: no token check, no
patient-ownership lookup, no rate limit, no idempotency record, no hold
expiry. The request is the same (``POST /v1/holds`` with
``{"session_id", "slot_id", "patient_id"}``) and so are the answers: 201 with
the booking, 409 ``application/problem+json`` of type ``/problems/sold-out``
or ``/problems/duplicate``, 503 when PostgreSQL fails.

    python -m benchmarks.relational_app --port 8001 --workers 2

Settings come from the environment: ``RELATIONAL_PG_DSN`` (required),
``RELATIONAL_POOL_MAX`` (default 10). ``SCHEMA`` below is what the benchmark
creates in its own database.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
from litestar import Litestar, Response, get, post
from litestar.datastructures import State

__all__ = ["SCHEMA", "create_app", "main"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS slots (
    session_id text NOT NULL,
    slot_id    text NOT NULL,
    capacity   integer NOT NULL,
    remaining  integer NOT NULL,
    PRIMARY KEY (session_id, slot_id)
);
CREATE TABLE IF NOT EXISTS bookings (
    id         bigserial PRIMARY KEY,
    session_id text NOT NULL,
    slot_id    text NOT NULL,
    patient_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_id, patient_id)
);
"""

_UPDATE = ("UPDATE slots SET remaining = remaining - 1"
           " WHERE session_id = $1 AND slot_id = $2 AND remaining > 0 RETURNING remaining")
_INSERT = ("INSERT INTO bookings (session_id, slot_id, patient_id) VALUES ($1, $2, $3)"
           " RETURNING id")


class HoldIn(msgspec.Struct, frozen=True):
    session_id: str
    slot_id: str
    patient_id: str


class BookingOut(msgspec.Struct, frozen=True):
    booking_id: int
    session_id: str
    slot_id: str
    remaining: int


_encode = msgspec.json.Encoder().encode


def _problem(status: int, slug: str, title: str) -> Response[bytes]:
    body = _encode({"type": f"/problems/{slug}", "title": title, "status": status})
    return Response(body, status_code=status, media_type="application/problem+json")


class _SoldOut(Exception):
    pass


def create_app() -> Litestar:
    dsn = os.environ["RELATIONAL_PG_DSN"]
    pool_max = int(os.environ.get("RELATIONAL_POOL_MAX", "10"))
    state = State({"pool": None})

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state.pool = await asyncpg.create_pool(dsn, min_size=pool_max, max_size=pool_max,
                                               command_timeout=30)
        try:
            yield
        finally:
            await state.pool.close()

    @post("/v1/holds", status_code=201)
    async def hold(data: HoldIn) -> Response[Any]:
        pool: asyncpg.Pool = state.pool
        try:
            async with pool.acquire() as conn, conn.transaction():
                remaining = await conn.fetchval(_UPDATE, data.session_id, data.slot_id)
                if remaining is None:
                    raise _SoldOut
                bid = await conn.fetchval(_INSERT, data.session_id, data.slot_id,
                                          data.patient_id)
        except _SoldOut:
            return _problem(409, "sold-out", "Sold out")
        except asyncpg.UniqueViolationError:
            return _problem(409, "duplicate", "This patient already booked this session")
        except (asyncpg.PostgresError, OSError):
            return _problem(503, "unavailable", "The database is unavailable")
        body = BookingOut(bid, data.session_id, data.slot_id, remaining)
        return Response(_encode(body), status_code=201, media_type="application/json")

    @get("/healthz")
    async def healthz() -> Response[bytes]:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Litestar(route_handlers=[hold, healthz], lifespan=[lifespan], state=state,
                    logging_config=None, debug=False, openapi_config=None)


def main(argv: list[str] | None = None) -> int:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    p = argparse.ArgumentParser(prog="python -m benchmarks.relational_app",
                                description="the relational peer of the spike benchmark")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backlog", type=int, default=2048)
    a = p.parse_args(argv)
    Granian("benchmarks.relational_app:create_app", factory=True, address=a.host, port=a.port,
            interface=Interfaces.ASGI, workers=a.workers, backlog=a.backlog, loop=Loops.uvloop,
            log_access=False, respawn_failed_workers=True).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
