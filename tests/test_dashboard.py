"""The ops dashboard (issue 16) in a real browser: Debian's Chromium,
headless, loads /ops from the API as it runs (granian) during a short spike
of holds; the figures move while it runs and match the API's own numbers
after it; the day's statistics are drawn; a screenshot is saved with the
test output (and as reports/ops-dashboard.png)."""

from __future__ import annotations

import asyncio
import html
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.apikit import (
    ADMIN,
    ADMIN_TOKEN,
    bind,
    granian,
    import_sessions,
    login,
    next_id,
    server_env,
    uid,
)
from tests.enginekit import make_spec, now_ms

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DATE = "2027-05-04"


def chromium(tmp: Path, url: str, *args: str, budget_ms: int = 2500) -> str:
    """Chromium, headless, as the probe of this machine kind starts it."""
    assert CHROMIUM, "Debian's chromium is needed (./run.sh test installs it)"
    got = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp / 'chromium'}",
         f"--virtual-time-budget={budget_ms}", *args, url],
        capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    return got.stdout


def dom(tmp: Path, base: str, query: str = "") -> str:
    return chromium(tmp, f"{base}/ops/?every=200{query}#token={ADMIN_TOKEN}", "--dump-dom")


def figure(page: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}">([^<]*)<', page)
    assert m is not None, element_id
    return html.unescape(m.group(1))


def number(page: str, element_id: str) -> float:
    return float(figure(page, element_id).replace(",", "").split(" ")[0])


def free_in_row(page: str, sid: str) -> int:
    m = re.search(rf'<tr data-session="{sid}">.*?<td class="free">(\d+)</td>', page, re.S)
    assert m is not None, f"no row for {sid}"
    return int(m.group(1))


async def test_the_dashboard_in_a_real_browser(redis_url: str, db: str, tmp_path: Path) -> None:
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    with granian(server_env(redis_url, db), workers=1) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            crowd = []
            for _ in range(40):
                h = await login(client, uid("ops"))
                crowd.append((h, await bind(client, h, next_id())))
            sid = uid("OPS")
            await import_sessions(client, [make_spec(
                sid, dept="OPSD", date=DATE, caps=(30,), release_at_ms=now_ms() - 1000)])
            page = dom(tmp_path, base)
            assert figure(page, "status") == "" and free_in_row(page, sid) == 30
            before = number(page, "holds-total")

            async def press(i: int) -> None:
                h, pid = crowd[i]
                await client.post("/v1/holds", headers=h, json={
                    "session_id": sid, "slot_id": "0800", "patient_id": pid})
                await asyncio.sleep(0.05)

            # The spike, in two halves, the page looked at between and after.
            await asyncio.gather(*(press(i) for i in range(15)))
            during = dom(tmp_path, base)
            await asyncio.gather(*(press(i) for i in range(15, 40)))
            after = dom(tmp_path, base)
            assert before < number(during, "holds-total") < number(after, "holds-total")
            assert free_in_row(during, sid) > free_in_row(after, sid) == 0
            # ... and the page says what the API says.
            live: dict[str, Any] = (await client.get("/ops/live.json", headers=ADMIN)).json()
            assert number(after, "holds-total") == live["decisions"]["hold"]["held"] == 30
            avail = (await client.get(f"/v1/sessions/{sid}/availability")).json()
            assert avail["sessions"][0]["slots"][0]["free"] == free_in_row(after, sid) == 0
            sold_out = live["decisions"]["hold"].get("sold-out", 0) + live["decisions"]["hold"].get(
                "sold-out-cached", 0)
            assert number(after, "sold-out-total") == sold_out == 10
            assert re.search(r'<tr data-outcome="held"><td>held</td><td class="total">30<', after)
            # The day's statistics, drawn.
            day = dom(tmp_path, base, f"&date={DATE}")
            (tmp_path / "day.html").write_text(day)
            m = re.search(r'<rect class="booked" data-dept="OPSD"[^>]*><title>booked: (\d+)<', day)
            assert m is not None and int(m.group(1)) == 0  # held, none paid
            assert re.search(rf'<rect class="sold-out" data-session="{sid}"', day)
            # Without a token the page has nothing to show, and the data needs one.
            bare = chromium(tmp_path, f"{base}/ops/", "--dump-dom")
            assert "holds-total\">–<" in bare.replace(" ", "")
            assert (await client.get("/ops/live.json")).status_code == 401
            shot = tmp_path / "ops-dashboard.png"
            chromium(tmp_path, f"{base}/ops/?date={DATE}#token={ADMIN_TOKEN}",
                     f"--screenshot={shot}", "--window-size=1200,1800")
            assert shot.stat().st_size > 10_000
            reports = ROOT / "reports"
            reports.mkdir(exist_ok=True)
            shutil.copy(shot, reports / "ops-dashboard.png")


def test_the_grafana_dashboard_reads_series_the_api_exports() -> None:
    """docs/grafana/haoyuan-release.json: valid JSON, and every series its
    queries name is one that GET /metrics exports (api.metrics)."""
    import json

    from api.metrics import Metrics

    dash = json.loads((ROOT / "docs" / "grafana" / "haoyuan-release.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 8 and exprs
    used = {m for e in exprs for m in re.findall(r"\b(haoyuan_[a-z_]+)", e)}
    registry = Metrics().registry
    exported = set()
    for fam in registry.collect():
        for s in fam.samples:
            exported.add(s.name)
        exported.add(fam.name)
        exported.update(fam.name + suffix for suffix in
                        (("_bucket", "_count", "_sum") if fam.type == "histogram" else ("_total",)))
    missing = used - exported
    assert not missing, missing
