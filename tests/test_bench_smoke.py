"""The benchmarks run (a tiny size; no timing is asserted here: figures live
in benchmarks/README.md). They exercise the same scripts as production, so a
changed script contract breaks them loudly here, not on the next bench run."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from benchmarks.engine_bench import run_durability_bench, run_engine_bench

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
async def test_engine_bench_runs_and_the_ceiling_does_real_holds() -> None:
    r = await run_engine_bench(repeats=1, n=300)
    assert r["holds_per_s"] > 0 and r["ceiling_per_s"] > 0 and r["soldout_per_s"] > 0
    assert 0 < r["ratio"]
    assert set(r) >= {"holds_per_s", "ceiling_per_s", "ratio", "hardware"}


@pytest.mark.timeout(120)
async def test_durability_bench_runs() -> None:
    r = await run_durability_bench(quick=True, n=300)
    assert {"aof_always", "aof_everysec", "none"} <= set(r)
    assert all(r[m]["confirms_per_s"] > 0 for m in ("aof_always", "aof_everysec", "none"))


@pytest.mark.timeout(30)
async def test_openloop_generator_accounts_for_every_request(tmp_path: Path) -> None:
    """benchmarks/openloop.c, compiled and run for ~2 s at a modest rate
    against a tiny local HTTP/1.1 server (keep-alive, a problem type, a
    chunked answer, Connection: close, one path that never answers)."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    from benchmarks.peking import build_openloop, run_openloop

    seen: list[bytes] = []
    handlers: set[asyncio.Task[None]] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                seen.append(head)
                path = head.split(b" ", 2)[1]
                if path == b"/hang":   # longer than the 0.5 s timeout
                    await asyncio.sleep(1.0)
                    return
                if path == b"/gone":
                    body = b'{"type":"https://x/problems/sold-out"}'
                    w.write(b"HTTP/1.1 409 Conflict\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body))
                elif path == b"/chunked":
                    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"2\r\nok\r\n0\r\n\r\n")
                elif path == b"/close":
                    w.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n"
                            b"Connection: close\r\n\r\nok")
                    await w.drain()
                    return
                else:
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reqs = tmp_path / "requests.bin"
    paths = ["/ok", "/ok", "/ok", "/gone", "/chunked", "/close", "/hang"]
    reqs.write_bytes(b"".join(
        f"GET {p} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k-{'@' * 12}\r\n\r\n\0".encode()
        for p in paths))
    exe = await asyncio.to_thread(build_openloop)
    t0_ms = int(time.time() * 1000) + 500
    try:
        r = await run_openloop(exe, port, reqs, [(0.0, 100.0), (1.0, 300.0), (2.0, 300.0)],
                               start_s=0.0, end_s=2.0, t0_ms=t0_ms, max_conns=30,
                               timeout_s=0.5, seed=3)
    finally:
        server.close()
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
    assert 450 <= r["offered"] <= 550   # the schedule's integral: 500
    assert r["offered"] == r["sent"] + r["unsent"]
    assert r["sent"] == r["answered"] + r["timeouts"] + r["errors"]
    assert r["answered"] == sum(r["answers"].values())
    assert {"200", "201", "409:sold-out"} <= set(r["answers"])
    assert r["timeouts"] > 0   # /hang
    rows = r["rows"]
    assert sum(x["offered"] for x in rows) == r["offered"]
    assert sum(x["answered_at"] for x in rows) == r["answered"]
    assert sum(sum(x["answered"].values()) for x in rows) == r["answered"]
    assert r["latency_ms"]["p50"] > 0 and r["latency_ms"]["max"] < 5000
    keys = {h.split(b"Idempotency-Key: ", 1)[1].split(b"\r\n", 1)[0] for h in seen}
    assert len(keys) == len(seen) and not any(b"@" in k for k in keys)
