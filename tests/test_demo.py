"""The release-morning demo as CI runs it: a small bounded spike through the
real API (granian workers, Locust) on private Redis, PostgreSQL and the HIS
simulator; the invariants hold at the end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
async def test_quick_demo_keeps_every_invariant(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HAOYUAN_REDIS_URL", "HAOYUAN_PG_DSN", "HAOYUAN_HIS_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "demo", "--quick", "--json", "--out", str(tmp_path),
        cwd=str(ROOT), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=220)
    assert proc.returncode == 0, err.decode()[-3000:]
    s = json.loads(out)
    assert s["mode"] == "http"
    assert s["requests"] > 1000
    assert s["http_5xx"] == 0 and s["errors"] == 0
    assert s["oversold"] == 0 and s["undersold"] == 0
    assert s["booked_redis"] == s["booked_postgres"] == s["booked_his"] == s["capacity"]
    assert s["audit_ok"] is True and s["ok"] is True
    # Money (issue 12): paid through the WeChat Pay simulator, every refund done,
    # the day reconciled against its bill; the HIS stopped a session and
    # cancelled some appointments at its window.
    assert s["payments"] >= s["booked_postgres"]
    assert s["refunds_due"] == s["refunds_done"] > 0
    assert s["reconcile_ok"] is True
    assert len(s["his_stopped_sessions"]) == 1 and s["window_cancels"] == 3
    assert s["refund_causes"].get("suspended", 0) >= 1
    assert s["refund_causes"].get("his_cancelled") == 3
    # The day's statistics (issue 16): demand the API counted, time to sold out.
    assert 0 <= s["unmet_demand"] <= s["patients_without_booking"]
    assert len(s["sold_out_ms"]) == s["sessions"]
    assert sum(d["booked"] for d in s["stats_by_department"]) == s["booked_postgres"]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "spike_stats.csv").exists()
    assert {Path(p).name for p in s["plots"]} >= {"throughput.png", "latency.png",
                                                   "inventory_lag.png"}


@pytest.mark.cluster
@pytest.mark.timeout(300)
async def test_demo_on_a_cluster_with_a_failover_from_another_directory(tmp_path: Path) -> None:
    """`haoyuan demo --cluster --failover`, started from outside the checkout
    with a relative --out: a primary killed -9 two seconds into the spike,
    its replica takes over; the same report, every invariant held, the only
    5xx the API's 503 while the primary was gone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HAOYUAN_REDIS_URL", "HAOYUAN_PG_DSN", "HAOYUAN_HIS_URL",
                        "HAOYUAN_REDIS_CLUSTER")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "demo", "--quick", "--json", "--cluster",
        "--failover", "--out", "report", cwd=str(tmp_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=280)
    assert proc.returncode == 0, err.decode()[-3000:]
    s = json.loads(out)
    assert s["redis"] == "cluster" and s["ok"] is True and s["audit_ok"] is True
    assert s["oversold"] == 0 and s["undersold"] == 0 and s["errors"] == 0
    assert s["booked_redis"] == s["booked_postgres"] == s["booked_his"] == s["capacity"]
    f = s["failover"]
    assert f["killed_primary"] != f["promoted_replica"] and 0 < f["failover_s"] < 60
    assert f["http_503_during_failover"] == s["http_5xx"]
    assert (tmp_path / "report" / "summary.json").exists()
