"""The release-morning spike over HTTP: the API under granian (2 workers)
and the Locust scenario (loadtest/) with its release-spike shape, both as
child processes of the demo; the report reads Locust's CSV and summary."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.testing.servers import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages)
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def available() -> bool:
    """HTTP mode needs the API package and the Locust scenario (a checkout)."""
    from importlib.util import find_spec

    # Never import locust here: it monkey-patches the whole process for gevent.
    return (find_spec("locust") is not None and find_spec("api") is not None
            and LOCUSTFILE.exists())


@dataclass
class Api:
    url: str
    env: dict[str, str]
    proc: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def api_server(redis_url: str, pg_dsn: str, out: Path, workers: int = 2,
                     extra_env: dict[str, str] | None = None) -> AsyncIterator[Api]:
    port = free_port()
    env = dict(os.environ)
    env.update({
        # A development instance, asked for explicitly: the crowd logs in with
        # dev-<openid> codes and the patients are made up (development keys).
        "HAOYUAN_ENV": "development",
        "HAOYUAN_REDIS_URL": redis_url, "HAOYUAN_PG_DSN": pg_dsn,
        "HAOYUAN_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "HAOYUAN_PAYMENT_SECRET": secrets.token_urlsafe(24),
        "HAOYUAN_TOKEN_SECRET": secrets.token_urlsafe(24),
        "HAOYUAN_ACCESS_LOG": "0",
        # The crowd comes from one address: no per-client limit on new accounts.
        "HAOYUAN_NEW_ACCOUNTS_INTERVAL_S": "0",
        **(extra_env or {}),
    })
    log = (out / "api.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.serve", "--port", str(port), "--workers", str(workers),
        cwd=str(ROOT), env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2.0) as c:
            for _ in range(150):
                if proc.returncode is not None:
                    raise RuntimeError(f"the API exited ({proc.returncode}); see {out}/api.log")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(f"{url}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"the API did not become ready; see {out}/api.log")
        yield Api(url, env, proc)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 2)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                await proc.wait()
        log.close()


async def run_locust(api: Api, out: Path, *, date: str, release_at_ms: int, peak_users: int,
                     quiet_users: int, ramp_s: float, hold_s: float, decay_s: float,
                     total_s: float, seed: int, pay_url: str = "") -> dict[str, Any]:
    summary = out / "locust.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--host", api.url, "--csv", str(out / "spike"), "--html", str(out / "spike.html"),
           "--only-summary", "--loglevel", "WARNING",
           "--hy-date", date, "--hy-release-at-ms", str(release_at_ms),
           "--hy-summary", str(summary), "--hy-seed", str(seed),
           "--hy-peak-users", str(peak_users), "--hy-quiet-users", str(quiet_users),
           "--hy-ramp-s", str(ramp_s), "--hy-hold-s", str(hold_s), "--hy-decay-s", str(decay_s),
           "--hy-total-s", str(total_s), "--hy-think", "0.5-2"]
    if pay_url:  # the crowd pays in WeChat Pay (the simulator notifies the API)
        cmd += ["--hy-pay-url", pay_url]
    env = dict(api.env)
    log = (out / "locust.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=str(ROOT), env=env, stdout=log,
                                                stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True)
    try:
        await asyncio.wait_for(proc.wait(), total_s + 60)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise RuntimeError("the Locust run did not stop by itself") from None
    finally:
        log.close()
    import msgspec

    if not summary.exists():
        raise RuntimeError(f"Locust wrote no summary; see {out}/locust.log")
    data: dict[str, Any] = msgspec.json.decode(summary.read_bytes())
    data["history"] = read_history(out / "spike_stats_history.csv")
    return data


def read_history(path: Path) -> list[dict[str, float]]:
    """Per-second aggregated rows of Locust's history CSV."""
    if not path.exists():
        return []
    rows: list[dict[str, float]] = []
    with path.open() as f:
        for r in csv.DictReader(f):
            if r.get("Name") != "Aggregated":
                continue
            try:
                rows.append({"t": float(r["Timestamp"]), "rps": float(r["Requests/s"]),
                             "fail_s": float(r["Failures/s"]),
                             "p50": float(r["50%"] or 0), "p95": float(r["95%"] or 0),
                             "p99": float(r["99%"] or 0), "users": float(r["User Count"])})
            except (KeyError, ValueError):
                continue
    return rows


def now_s() -> float:
    return time.time()
