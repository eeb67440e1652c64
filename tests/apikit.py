"""Helpers for API tests: databases, app settings, a granian server, and the
calls every test makes (log in, bind a patient, import sessions, pay)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import redis.asyncio as aioredis
from litestar import Litestar

from api.app import create_app
from api.auth import sign_payment
from api.context import Api
from api.settings import Settings
from engine.config import EngineConfig
from engine.model import SessionSpec
from engine.pii import Crypto, check_digit
from engine.testing.servers import free_port

ADMIN_TOKEN = "test-admin-token-0123456789"
PAYMENT_SECRET = "test-payment-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parent.parent


_ids = itertools.count(1)


def next_id() -> int:
    """A new number for this test run (national IDs, openids)."""
    return next(_ids)


def uid(prefix: str) -> str:
    """A new id for this test run (``H1``, ``H2``, ...)."""
    return f"{prefix}{next_id()}"


def national_id(i: int, *, year: int = 1960) -> str:
    """A valid 18-character ID number (distinct for distinct ``i`` < 10**6)."""
    first = f"110101{year + i // 1000 % 50:04d}{1 + i % 12:02d}{1 + i % 28:02d}{i % 1000:03d}"
    return first + check_digit(first)


#: A test host is shared and slow at times: a hold is not shed for its age
#: (500 ms in production) unless a test asks for it (tests/test_fairness.py).
NO_AGE_SHEDDING: dict[str, Any] = {"max_request_age_ms": 60_000}

#: Every test client comes from one address: the per-client limits are off
#: unless a test turns them on (tests/test_identity.py does).
NO_CLIENT_LIMITS: dict[str, Any] = dict(
    admin_failures_interval_s=0, login_failures_interval_s=0, new_accounts_interval_s=0)


def settings(redis_url: str, pg_dsn: str, **kw: Any) -> Settings:
    """Development settings for tests; keyword arguments that name an
    ``EngineConfig`` field (``patient_rules=True``, ``socket_timeout_s=0.5``)
    go to the engine's configuration, the rest to ``Settings``."""
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine_kw = {k: kw.pop(k) for k in list(kw) if k in engine_fields}
    opts: dict[str, Any] = dict(
        env="development", redis_url=redis_url, pg_dsn=pg_dsn, crypto=Crypto.generate_dev(),
        admin_token=ADMIN_TOKEN, payment_secret=PAYMENT_SECRET, log_level="warning",
        engine=EngineConfig(**engine_kw), **NO_CLIENT_LIMITS, **NO_AGE_SHEDDING,
    )
    opts.update(kw)
    return Settings(**opts)


async def flushed_app(redis_url: str, pg_dsn: str, **kw: Any) -> Litestar:
    """The app with ``settings(redis_url, pg_dsn, **kw)``, Redis emptied first (FLUSHALL)."""
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    return create_app(settings(redis_url, pg_dsn, **kw))


def api(app: Litestar) -> Api:
    """The app's shared context (engine, pool, settings)."""
    a: Api = app.state.api
    return a


def server_env(redis_url: str, pg_dsn: str, **kw: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HAOYUAN_ENV": "development", "HAOYUAN_REDIS_URL": redis_url, "HAOYUAN_PG_DSN": pg_dsn,
        "HAOYUAN_ADMIN_TOKEN": ADMIN_TOKEN, "HAOYUAN_PAYMENT_SECRET": PAYMENT_SECRET,
        "HAOYUAN_LOG_LEVEL": "warning", "HAOYUAN_ACCESS_LOG": "0",
        "HAOYUAN_ADMIN_FAILURES_INTERVAL_S": "0", "HAOYUAN_LOGIN_FAILURES_INTERVAL_S": "0",
        "HAOYUAN_NEW_ACCOUNTS_INTERVAL_S": "0", "HAOYUAN_MAX_REQUEST_AGE_MS": "60000",
    })
    env.update(kw)
    return env


@contextlib.contextmanager
def granian(env: dict[str, str], workers: int = 2) -> Iterator[str]:
    """``python -m api.serve`` on a free port; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.serve", "--port", str(port), "--workers", str(workers)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise RuntimeError(f"api.serve did not come up: {err}")
            time.sleep(0.1)
        time.sleep(0.5)  # the other workers' lifespans
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ------------------------------------------------------------------ calls


async def login(client: httpx.AsyncClient, openid: str) -> dict[str, str]:
    r = await client.post("/v1/auth/wechat", json={"code": f"dev-{openid}"})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def bind(client: httpx.AsyncClient, headers: dict[str, str], i: int) -> str:
    r = await client.post("/v1/patients", headers=headers, json={
        "name": "张三丰", "phone": "13812345678", "national_id": national_id(i)})
    assert r.status_code == 201, r.text
    pid: str = r.json()["patient_id"]
    return pid


async def import_sessions(client: httpx.AsyncClient, specs: Sequence[SessionSpec]) -> Any:
    r = await client.post("/v1/admin/sessions", content=msgspec.json.encode(list(specs)),
                          headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def payment_headers(body: bytes, *, path: str, ts: int | None = None,
                    secret: str = PAYMENT_SECRET, method: str = "POST") -> dict[str, str]:
    """The payment side's headers for ``body`` sent to ``path`` (the signature binds both)."""
    t = int(time.time()) if ts is None else ts
    return {"X-Payment-Timestamp": str(t),
            "X-Payment-Signature": sign_payment(secret, t, body, method=method, path=path),
            "Content-Type": "application/json"}


async def pay(client: httpx.AsyncClient, hold_id: str, amount: int,
              ref: str | None = None) -> httpx.Response:
    """The payment callback for ``hold_id``; the reference defaults to one of its own
    (a payment reference books one hold, ever)."""
    body = msgspec.json.encode({"payment_ref": ref or f"pay-{hold_id}", "amount": amount})
    path = f"/v1/holds/{hold_id}/confirm"
    return await client.post(path, content=body, headers=payment_headers(body, path=path))


async def raw_request(base: str, method: str, path: str, headers: dict[str, str],
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on its own connection (``Connection: close``).

    httpx's pool slows to a few hundred requests/s with thousands of waiters;
    this keeps the load generator out of the way of the server under test.
    """
    u = urlsplit(base)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, payload


async def gather_limited(n: int, coros: Sequence[Any]) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))
