"""The test harness itself, on real processes: private servers and the fault proxy."""

from __future__ import annotations

import asyncio
import http.server
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster

from engine.testing.servers import (
    PostgresServer,
    RedisServer,
    ServerError,
    ensure_binaries,
    free_port,
)
from tests.faultproxy import FaultProxy, ThreadedFaultProxy

pytestmark = pytest.mark.slow


def _no_retry_async() -> Any:
    from redis.asyncio.retry import Retry

    return Retry(NoBackoff(), 0)


def _no_retry_sync() -> Any:
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


# ---------------------------------------------------------------- binaries


def test_binaries_and_free_port() -> None:
    found = ensure_binaries()
    assert os.access(found.redis_server, os.X_OK)
    assert os.access(os.path.join(found.postgres_bindir, "postgres"), os.X_OK)
    assert 0 < free_port() < 65536


def test_failed_start_raises_with_log_tail() -> None:
    server = RedisServer(extra={"no-such-directive": "1"})
    try:
        with pytest.raises(ServerError, match="no-such-directive"):
            server.start(timeout=5)
        assert server.pid is None
    finally:
        server.cleanup()
    assert not server.dir.exists()


def test_port_taken_by_another_redis_is_not_mistaken_for_ours(
    private_redis: RedisServer,
) -> None:
    # The newcomer cannot bind, but the port answers PING: it must notice the
    # answer comes from another process, fail, and leave that server alone.
    intruder = RedisServer(port=private_redis.port)
    try:
        with pytest.raises(ServerError):
            intruder.start(timeout=3)
    finally:
        intruder.cleanup()
    assert private_redis.command("PING") == "PONG"
    assert private_redis.pid is not None


def test_port_taken_by_another_postgres_is_not_mistaken_for_ours(pg_server: Any) -> None:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("external PostgreSQL")
    intruder = PostgresServer(port=pg_server.port)
    try:
        with pytest.raises(ServerError, match=r"could not|in use"):
            intruder.start(timeout=10)
    finally:
        intruder.cleanup()
    assert pg_server.psql("SELECT 1").strip() == "1"


# ------------------------------------------------------------------- Redis


def test_redis_kill9_restart_keeps_acknowledged_write(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url, retry=_no_retry_sync())
    try:
        assert client.set("acked", "yes")
        assert client.incr("n") == 1
    finally:
        client.close()
    port, old_pid = private_redis.port, private_redis.pid
    private_redis.kill()
    assert private_redis.pid is None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(private_redis.url, retry=_no_retry_sync()).ping()

    private_redis.restart()
    assert private_redis.port == port and private_redis.pid not in (None, old_pid)
    assert private_redis.info("persistence")["loading"] == "0"
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert client.get("acked") == b"yes"
        assert client.get("n") == b"1"
    finally:
        client.close()


def test_redis_sigstop_sigcont_and_pause(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url, socket_timeout=0.3, retry=_no_retry_sync())
    try:
        assert client.ping()
        private_redis.sigstop()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            private_redis.sigcont()
        assert client.ping()

        client2 = redis.Redis.from_url(private_redis.url, socket_timeout=5)
        try:
            started = time.monotonic()
            private_redis.pause(500)
            assert client2.set("k", "v")  # waits for the pause to end
            assert time.monotonic() - started >= 0.45
        finally:
            client2.close()
    finally:
        client.close()


# -------------------------------------------------------------- PostgreSQL


async def test_postgres_crash_and_restart_keep_committed_rows() -> None:
    server = PostgresServer()
    try:
        await asyncio.to_thread(server.start)
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
            await conn.execute("INSERT INTO t VALUES (1, 'committed')")
        finally:
            await conn.close()

        await asyncio.to_thread(server.crash)  # pg_ctl stop -m immediate
        assert server.pid is None
        await asyncio.to_thread(server.restart)
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT note FROM t WHERE id = 1") == "committed"
            await conn.execute("INSERT INTO t VALUES (2, 'before kill')")
        finally:
            await conn.close()

        await asyncio.to_thread(server.kill)  # SIGKILL of the postmaster
        await asyncio.to_thread(server.restart)
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM t") == 2
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.cleanup)
    assert not server.dir.exists()


async def test_fresh_pg_dsn_is_an_empty_database(fresh_pg_dsn: str, pg_dsn: str) -> None:
    assert fresh_pg_dsn != pg_dsn
    conn = await asyncpg.connect(fresh_pg_dsn)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
    finally:
        await conn.close()


# ------------------------------------------------------------------ cluster


@pytest.mark.cluster
def test_cluster_is_ok_and_refuses_cross_slot(redis_cluster: Any) -> None:
    nodes = [ClusterNode(host, port) for host, port in redis_cluster.startup_nodes]
    cluster = RedisCluster(startup_nodes=nodes)
    try:
        info = cluster.cluster_info(target_nodes=RedisCluster.ALL_NODES)
        for node_info in info.values():
            assert node_info["cluster_state"] == "ok"
            assert int(node_info["cluster_slots_ok"]) == 16384
        assert cluster.set("{s1}:a", "1") and cluster.get("{s1}:a") == b"1"
        assert cluster.mset_nonatomic({"a": "1", "b": "2"}) == [True, True]
    finally:
        cluster.close()

    # A plain connection to a node: the server itself refuses keys of two slots.
    host, port = redis_cluster.startup_nodes[0]
    plain = redis.Redis(host=host, port=port)
    try:
        # CROSSSLOT; redis-py strips the error code from the message
        with pytest.raises(redis.ResponseError, match="same slot"):
            plain.execute_command("MSET", "a", "1", "b", "2")  # slots 15495 and 3300
    finally:
        plain.close()


# -------------------------------------------------------------- fault proxy


@pytest.fixture
async def redis_proxy(redis_url: str, fresh_redis: aioredis.Redis) -> AsyncIterator[FaultProxy]:
    target = urlsplit(redis_url)
    assert target.hostname and target.port
    proxy = FaultProxy(target.hostname, target.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def _via(proxy: FaultProxy | ThreadedFaultProxy, redis_url: str) -> str:
    db = urlsplit(redis_url).path.lstrip("/") or "0"
    return f"redis://{proxy.host}:{proxy.port}/{db}"


async def test_proxy_passes_through_and_delays(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = aioredis.Redis.from_url(_via(redis_proxy, redis_url))
    try:
        assert await client.ping()
        assert redis_proxy.connections_total == 1
        redis_proxy.delay(0.1)
        started = time.monotonic()
        assert await client.ping()
        assert time.monotonic() - started >= 0.2  # both directions
        redis_proxy.heal()
        assert await client.ping()
        assert redis_proxy.bytes_up > 0 and redis_proxy.bytes_down > 0
    finally:
        await client.aclose()


async def test_drop_next_reply_runs_the_command_but_loses_the_reply(
    redis_proxy: FaultProxy, redis_url: str, fresh_redis: aioredis.Redis
) -> None:
    client = aioredis.Redis.from_url(_via(redis_proxy, redis_url), retry=_no_retry_async())
    try:
        assert await client.ping()  # connect (and CLIENT SETINFO) before arming
        redis_proxy.drop_next_reply()
        with pytest.raises(redis.ConnectionError):
            await client.incr("counter")
        assert redis_proxy.replies_dropped == 1
        assert await fresh_redis.get("counter") == b"1"  # it did run, once
        assert await client.incr("counter") == 2  # healed by itself: one reply only
    finally:
        await client.aclose()


async def test_redis_py_default_retries_double_the_effect(
    redis_proxy: FaultProxy, redis_url: str, fresh_redis: aioredis.Redis
) -> None:
    # Why mutating scripts must be idempotent: Redis(host=..., port=...) retries
    # (10 times by default in redis-py 8.1) on ConnectionError, so the lost reply
    # turns into a second INCR.
    client = aioredis.Redis(host=redis_proxy.host, port=redis_proxy.port)
    try:
        assert await client.ping()
        redis_proxy.drop_next_reply()
        assert await client.incr("counter") == 2
        assert await fresh_redis.get("counter") == b"2"
    finally:
        await client.aclose()


async def test_redis_py_from_url_does_not_retry(
    redis_proxy: FaultProxy, redis_url: str, fresh_redis: aioredis.Redis
) -> None:
    # ...whereas Redis.from_url(...) builds its pool without the constructor's
    # default Retry: 0 retries, the ConnectionError reaches the caller.
    client = aioredis.Redis.from_url(_via(redis_proxy, redis_url))
    try:
        assert await client.ping()
        redis_proxy.drop_next_reply()
        with pytest.raises(redis.ConnectionError):
            await client.incr("counter")
        assert await fresh_redis.get("counter") == b"1"
    finally:
        await client.aclose()


async def test_blackhole_times_out_then_heals(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = aioredis.Redis.from_url(
        _via(redis_proxy, redis_url), socket_timeout=0.3, retry=_no_retry_async()
    )
    try:
        assert await client.ping()
        redis_proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            await client.ping()
        redis_proxy.heal()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_reset_aborts_open_connections(redis_proxy: FaultProxy, redis_url: str) -> None:
    client = aioredis.Redis.from_url(_via(redis_proxy, redis_url), retry=_no_retry_async())
    try:
        assert await client.ping()
        assert redis_proxy.reset() == 1
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        assert await client.ping()  # a new connection goes through
        assert redis_proxy.connections_total == 2
    finally:
        await client.aclose()


def test_threaded_proxy_for_sync_clients(redis_server: Any, redis_url: str) -> None:
    target = urlsplit(redis_url)
    assert target.hostname and target.port
    direct = redis.Redis.from_url(redis_url)
    with ThreadedFaultProxy(target.hostname, target.port) as proxy:
        client = redis.Redis.from_url(_via(proxy, redis_url), retry=_no_retry_sync())
        try:
            direct.delete("tcounter")
            assert client.ping()
            proxy.drop_next_reply()
            with pytest.raises(redis.ConnectionError):
                client.incr("tcounter")
            assert direct.get("tcounter") == b"1"
            assert proxy.replies_dropped == 1
        finally:
            client.close()
            direct.close()


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_threaded_proxy_carries_http() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with ThreadedFaultProxy("127.0.0.1", httpd.server_address[1]) as proxy:
            with httpx.Client(timeout=0.5) as http_client:
                assert http_client.get(proxy.http_url("/")).text == "hello"
                proxy.blackhole()
                with pytest.raises(httpx.TimeoutException):
                    http_client.get(proxy.http_url("/"))
                proxy.heal()
                assert http_client.get(proxy.http_url("/")).text == "hello"
    finally:
        httpd.shutdown()
        httpd.server_close()
