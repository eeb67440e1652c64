"""Shared fixtures: private Redis / PostgreSQL / Redis Cluster on loopback.

By default every server is a private process started from the local binaries
(see engine/testing/servers.py) and removed at the end of the session, also when a test
fails or the run is interrupted. To use servers you already run instead:

    HAOYUAN_TEST_REDIS_URL=redis://127.0.0.1:6379/15   (FLUSHALL is run on it!)
    HAOYUAN_TEST_PG_DSN=postgresql://postgres@127.0.0.1:5432/postgres
    HAOYUAN_TEST_REDIS_CLUSTER_NODES=127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis

from engine.testing.servers import PostgresServer, RedisClusterServer, RedisServer


@dataclass(frozen=True)
class ExternalRedis:
    """A Redis given by HAOYUAN_TEST_REDIS_URL: only its URL is known."""

    url: str


@dataclass(frozen=True)
class ExternalPostgres:
    """A PostgreSQL given by HAOYUAN_TEST_PG_DSN: only its DSN is known."""

    dsn: str


@dataclass(frozen=True)
class ExternalRedisCluster:
    startup_nodes: list[tuple[str, int]]

    @classmethod
    def parse(cls, nodes: str) -> ExternalRedisCluster:
        """From ``host:port,host:port,...``."""
        parsed = []
        for item in nodes.split(","):
            host, _, port = item.strip().rpartition(":")
            parsed.append((host, int(port)))
        return cls(parsed)

    @property
    def url(self) -> str:
        host, port = self.startup_nodes[0]
        return f"redis://{host}:{port}/0"


class _Server(Protocol):
    def start(self) -> object: ...

    def cleanup(self) -> None: ...


E = TypeVar("E")
S = TypeVar("S", bound=_Server)


def _external_or_private(
    env: str, external: Callable[[str], E], private: Callable[[], S]
) -> Iterator[E | S]:
    """The server named by the environment variable ``env`` if it is set (not
    managed here); else a private one, started here and cleaned up at the end,
    also when a test fails or the run is interrupted."""
    value = os.environ.get(env)
    if value:
        yield external(value)
        return
    server = private()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


# ------------------------------------------------------------------ Redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | ExternalRedis]:
    """Session Redis: private, AOF with appendfsync always (or HAOYUAN_TEST_REDIS_URL)."""
    yield from _external_or_private(
        "HAOYUAN_TEST_REDIS_URL",
        ExternalRedis,
        lambda: RedisServer(appendonly=True, appendfsync="always"),
    )


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | ExternalRedis) -> str:
    return redis_server.url


@pytest.fixture
async def fresh_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio Redis client on an empty server (FLUSHALL before the test)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushall()
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer | ExternalRedisCluster]:
    """A 3-master loopback Redis Cluster, built only when a test asks for it."""
    yield from _external_or_private(
        "HAOYUAN_TEST_REDIS_CLUSTER_NODES",
        ExternalRedisCluster.parse,
        lambda: RedisClusterServer(masters=3),
    )


# ------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | ExternalPostgres]:
    """Session PostgreSQL: private cluster run as the postgres OS user (or HAOYUAN_TEST_PG_DSN)."""
    yield from _external_or_private("HAOYUAN_TEST_PG_DSN", ExternalPostgres, PostgresServer)


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PostgresServer | ExternalPostgres) -> str:
    return pg_server.dsn


@pytest.fixture
async def fresh_pg_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """A new empty database (unique name) on the session server; dropped afterwards."""
    from tests.enginekit import new_database

    async with new_database(pg_dsn, f"t_{uuid.uuid4().hex[:16]}") as dsn:
        yield dsn


# ------------------------------------------------------------- shared by the engine tests


@pytest.fixture
async def db_pool(fresh_pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated, empty database of its own and a pool on it."""
    from engine.store.migrate import migrate

    await migrate(fresh_pg_dsn)
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def engine_on_fresh_redis(fresh_redis: Any, redis_url: str) -> AsyncIterator[Any]:
    """An engine (rate limits off) on the flushed private Redis."""
    from engine import Engine
    from tests.enginekit import config

    async with Engine.connect(redis_url, config()) as e:
        yield e


# ------------------------------------------------------------- shared by the API tests


@pytest.fixture(scope="module")
async def db(pg_dsn: str) -> AsyncIterator[str]:
    """A database of the module's own (its DSN; the app migrates it). Modules
    that want a pool instead define their own ``db``."""
    from tests.enginekit import new_database

    async with new_database(pg_dsn) as dsn:
        yield dsn


@pytest.fixture(scope="module")
async def client(app: Any) -> AsyncIterator[Any]:
    """A test client of the module's ``app`` fixture."""
    from litestar.testing import AsyncTestClient

    async with AsyncTestClient(app) as c:
        yield c
