"""The ops dashboard (``/ops``): the release morning live, and a day's
statistics as charts.

- ``GET /ops``: the page (``api/static/ops.html``: HTML, CSS and a little
  plain JavaScript, nothing loaded from elsewhere). It holds no data; it asks
  for a staff token (or takes ``#token=...``), keeps it in the tab's
  ``sessionStorage`` and polls the two routes below with it.
- ``GET /ops/live.json`` (staff): what the page shows live, read where ops
  read it: the Prometheus series of every worker (``/metrics``), the readiness
  figures (``/readyz``), the waiting room's line, and each session's free
  units (released in the 12 hours around now, or of ``?date=``).
- ``GET /ops/stats.svg?date=D`` (staff): the day's statistics
  (``engine.stats``) as SVG charts drawn here.

Charts are SVG drawn by our own few lines (sparklines in the page, bars on
the server) rather than a charting library from npm: nothing to vendor,
build or upgrade, a few kilobytes, and the same SVG works in a browser, a
report and a test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
from importlib import resources
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.params import Parameter
from prometheus_client.parser import text_string_to_metric_families

from api.context import api_of
from api.docs import ADMIN, errors
from api.guards import staff_required
from engine.stats import SessionStats, fold, stats, totals

__all__ = ["DashboardController", "LiveOut"]

_PAGE = resources.files("api").joinpath("static/ops.html").read_bytes()


class SessionLive(msgspec.Struct, frozen=True):
    session_id: str
    dept_id: str
    doctor_id: str
    period: str
    release_at_ms: int
    capacity: int
    free: int | None
    status: str | None


class LiveOut(msgspec.Struct, frozen=True, kw_only=True):
    """The live figures (counters are totals since the workers started: the
    page turns them into rates)."""

    server_ms: int
    mode: str
    decisions: dict[str, dict[str, float]]
    hold_requests: float
    hold_p99_ms: float | None
    inflight: float
    writer_pending: int
    writer_oldest_pending_age_ms: int
    his_pending: int
    his_oldest_pending_age_s: float
    refunds_due: int
    refunds_failed: int
    waiting_room_waiting: int
    sessions: list[SessionLive]


def _metrics(text: str) -> tuple[dict[str, dict[str, float]], float, float | None, float]:
    """Decisions by op and outcome, hold requests, their p99 (ms) and engine
    calls in flight, summed over every worker's series."""
    decisions: dict[str, dict[str, float]] = {}
    buckets: dict[float, float] = {}
    inflight = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "haoyuan_decisions":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    op, outcome = s.labels.get("op", ""), s.labels.get("outcome", "")
                    d = decisions.setdefault(op, {})
                    d[outcome] = d.get(outcome, 0.0) + s.value
        elif fam.name == "haoyuan_http_request_duration_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket") and s.labels.get("route") == "/v1/holds":
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
        elif fam.name == "haoyuan_engine_inflight":
            inflight += sum(s.value for s in fam.samples)
    total = buckets.get(float("inf"), 0.0)
    p99 = None
    if total:
        for le in sorted(buckets):
            if buckets[le] >= 0.99 * total:
                p99 = None if le == float("inf") else round(le * 1000, 1)
                break
    return decisions, total, p99, inflight


class DashboardController(Controller):
    path = "/ops"
    tags = ("ops",)
    include_in_schema = True

    @get("/", media_type="text/html", summary="The ops dashboard (a page; its data needs a"
                                               " staff token)")
    async def page(self) -> Response[bytes]:
        return Response(_PAGE, media_type="text/html",
                        headers={"Content-Security-Policy":
                                 "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                 "style-src 'self' 'unsafe-inline'; img-src 'self' data:"})

    @get("/live.json", responses=errors(401, 403, 422), before_request=staff_required(),
         security=ADMIN, summary="The dashboard's live figures")
    async def live(
        self, request: Request[Any, Any, Any],
        date: Annotated[dt.date | None, Parameter(
            description="the sessions of this day (default: released within 12 h of now)")
        ] = None,
    ) -> LiveOut:
        api = api_of(request)
        st, now = await api.ops_status(), await api.engine.server_time_ms()
        decisions, holds, p99, inflight = _metrics(api.metrics.render().decode())
        if date is not None:
            rows = await api.pool.fetch(
                "SELECT id, dept_id, doctor_id, period, release_at, status FROM sessions"
                " WHERE date = $1 ORDER BY dept_id, doctor_id, period LIMIT 300", date)
        else:
            rows = await api.pool.fetch(
                "SELECT id, dept_id, doctor_id, period, release_at, status FROM sessions"
                " WHERE release_at BETWEEN now() - interval '12 hours' AND now() + interval"
                " '12 hours' ORDER BY release_at, dept_id, doctor_id, period LIMIT 300")
        avail = await asyncio.gather(*(api.engine.availability(r["id"]) for r in rows))
        sessions = []
        for r, a in zip(rows, avail, strict=True):
            cap = sum(s.capacity for s in a.slots) if a is not None else 0
            free = sum(s.free for s in a.slots) if a is not None else None
            sessions.append(SessionLive(
                r["id"], r["dept_id"], r["doctor_id"], r["period"],
                int(r["release_at"].timestamp() * 1000), cap, free,
                a.status if a is not None else None))
        return LiveOut(
            server_ms=now, mode=api.settings.env, decisions=decisions, hold_requests=holds,
            hold_p99_ms=p99, inflight=inflight, writer_pending=st.writer_pending,
            writer_oldest_pending_age_ms=st.writer_oldest_pending_age_ms,
            his_pending=st.his_pending, his_oldest_pending_age_s=st.his_oldest_pending_age_s,
            refunds_due=st.refunds_due, refunds_failed=st.refunds_failed,
            waiting_room_waiting=api.waiting.waiting_now(), sessions=sessions)

    @get("/stats.svg", media_type="image/svg+xml", responses=errors(401, 403, 422),
         before_request=staff_required(), security=ADMIN,
         summary="A day's statistics as SVG charts")
    async def stats_svg(self, request: Request[Any, Any, Any], date: dt.date) -> Response[bytes]:
        api = api_of(request)
        async with api.pool.acquire() as conn:
            await fold(api.engine, conn)
        rows = await stats(api.pool, date_from=date, date_to=date)
        return Response(stats_svg(date.isoformat(), rows), media_type="image/svg+xml")


def _text(x: float, y: float, s: str, **attrs: Any) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{html.escape(s)}</text>'


def stats_svg(date: str, rows: list[SessionStats]) -> bytes:
    """Per department: released, booked and unmet demand as bars; per
    session: seconds from the release to sold out."""
    depts = totals(rows, ("dept_id",))
    w, bar, gap = 720, 14, 10
    parts: list[str] = []
    y = 40
    parts.append(_text(10, 20, f"{date}: units and demand per department", font_weight="bold"))
    top = max([1] + [max(d["released"], d["booked"] + d["unmet_demand"]) for d in depts])
    scale = (w - 260) / top
    colours = (("released", "#9db4d8"), ("booked", "#2d6cb5"), ("unmet_demand", "#d9534f"))
    for d in depts:
        parts.append(_text(10, y + bar * 1.5, str(d["dept_id"])))
        for i, (k, c) in enumerate(colours):
            v = d[k]
            parts.append(f'<rect class="{k}" data-dept="{html.escape(str(d["dept_id"]))}" '
                         f'x="120" y="{y + i * bar}" width="{max(1.0, v * scale):.1f}" '
                         f'height="{bar - 2}" fill="{c}"><title>{k}: {v}</title></rect>')
            parts.append(_text(126 + v * scale, y + i * bar + bar - 4, str(v), font_size="11"))
        y += 3 * bar + gap
    for i, (k, c) in enumerate(colours):
        parts.append(f'<rect x="{120 + i * 150}" y="{y}" width="12" height="12" fill="{c}"/>')
        parts.append(_text(136 + i * 150, y + 11, k.replace("_", " "), font_size="12"))
    y += 40
    parts.append(_text(10, y, "seconds from the release to sold out, per session",
                       font_weight="bold"))
    y += 12
    sold = [r for r in rows if r.sold_out_after_release_ms is not None]
    top_s = max([1.0] + [(r.sold_out_after_release_ms or 0) / 1000 for r in sold])
    for r in rows:
        secs = None if r.sold_out_after_release_ms is None else r.sold_out_after_release_ms / 1000
        parts.append(_text(10, y + bar - 3, r.session_id, font_size="11"))
        if secs is None:
            parts.append(_text(260, y + bar - 3, "not sold out", font_size="11", fill="#777"))
        else:
            parts.append(f'<rect class="sold-out" data-session="{html.escape(r.session_id)}" '
                         f'x="260" y="{y}" width="{max(1.0, secs / top_s * (w - 330)):.1f}" '
                         f'height="{bar - 2}" fill="#5cb85c"><title>{secs:.2f} s</title></rect>')
            parts.append(_text(266 + secs / top_s * (w - 330), y + bar - 3, f"{secs:.2f} s",
                               font_size="11"))
        y += bar
    body = "".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{y + 10}" '
            f'font-family="sans-serif" font-size="13">{body}</svg>').encode()
