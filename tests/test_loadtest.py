"""The load test's pieces (shape, data generators, popularity, signature,
summary) and one bounded end-to-end Locust run against the real API.

Locust is never imported in this process: ``import locust`` monkey-patches
the whole process with gevent, which would break the asyncio tests that run
after this file. What needs Locust runs in a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import hashlib
import hmac
import importlib.util
import json
import os
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.pii import check_digit as pii_check_digit
from engine.pii import normalize_national_id, normalize_phone
from loadtest import (
    ZipfPicker,
    build_summary,
    check_digit,
    national_id,
    parse_name,
    parse_think,
    person_name,
    phone,
    problem_slug,
    request_name,
    sign_payment,
)
from loadtest.shapes import SpikeParams, SpikeShapeMixin, spike_tick

ROOT = Path(__file__).resolve().parents[1]
HAVE_LOCUST = importlib.util.find_spec("locust") is not None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- shape


class FakeShape(SpikeShapeMixin):
    """The mixin's real ``tick()`` on a clock the test sets."""

    def __init__(self, params: SpikeParams | None = None, runner: Any = None) -> None:
        super().__init__(params)
        self.runner = runner
        self.t = 0.0

    def get_run_time(self) -> float:
        return self.t

    def at(self, t: float) -> tuple[int, float] | None:
        self.t = t
        return self.tick()


P = SpikeParams(release_in_s=10, quiet_users=10, peak_users=200, ramp_s=2, hold_s=5,
                decay_s=4, total_s=30)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.0, (10, 10.0)),  # quiet: reach 10 users in about a second
        (7.99, (10, 10.0)),  # still quiet
        (8.0, (200, 95.0)),  # ramp starts release - ramp_s before: 190 users in 2 s
        (9.5, (200, 95.0)),  # ramping (the same tuple: Locust keeps spawning)
        (10.0, (200, 95.0)),  # the release instant: at the peak
        (14.99, (200, 95.0)),  # plateau
        (15.0, (10, 47.5)),  # decay: 190 users stopped over 4 s
        (18.5, (10, 47.5)),
        (25.0, (10, 47.5)),  # quiet again until the end
        (30.0, None),  # total reached: the run ends
        (100.0, None),
    ],
)
def test_shape_phases(t: float, expected: tuple[int, float] | None) -> None:
    assert FakeShape(P).at(t) == expected
    assert spike_tick(t, P) == expected


def test_shape_edges() -> None:
    # a ramp longer than the time before the instant starts at 0
    p = SpikeParams(release_in_s=1, quiet_users=0, peak_users=50, ramp_s=5, hold_s=1,
                    decay_s=0, total_s=3)
    assert spike_tick(0, p) == (50, 50.0)
    assert spike_tick(2.0, p) == (0, 50.0)  # decay of 0 s: drop at once
    assert spike_tick(3.0, p) is None
    # rates never fall below 1 user/s
    flat = SpikeParams(quiet_users=5, peak_users=5)
    assert spike_tick(0, flat) == (5, 5.0)
    assert spike_tick(flat.release_in_s, flat) == (5, 1.0)
    with pytest.raises(ValueError):
        SpikeParams(total_s=0)
    with pytest.raises(ValueError):
        SpikeParams(peak_users=-1)


@dataclass
class _Env:
    parsed_options: Any


@dataclass
class _Runner:
    environment: _Env


def _options(**kw: Any) -> argparse.Namespace:
    base = dict(hy_release_in=6.0, hy_release_at_ms=0, hy_quiet_users=3, hy_peak_users=30,
                hy_ramp_s=2.0, hy_hold_s=3.0, hy_decay_s=2.0, hy_total_s=12.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_shape_reads_command_line_options_and_rereads_them_per_run() -> None:
    opts = _options()
    shape = FakeShape(runner=_Runner(_Env(opts)))
    assert shape.params == SpikeParams(6.0, 3, 30, 2.0, 3.0, 2.0, 12.0)
    assert shape.at(0) == (3, 3.0)
    assert shape.at(4.0) == (30, 13.5)
    assert shape.at(11.0) == (3, 13.5)
    assert shape.at(12.0) is None
    opts.hy_peak_users = 100  # changed in the web UI form for the next run
    assert shape.at(4.0) == (30, 13.5)  # not in the middle of a run
    shape.reset_time()
    assert shape.at(4.0) == (100, 48.5)


def test_shape_places_an_absolute_release_instant_on_its_clock() -> None:
    at_ms = int(time.time() * 1000) + 20_000
    opts = _options(hy_release_at_ms=at_ms, hy_total_s=40.0)
    shape = FakeShape(runner=_Runner(_Env(opts)))
    shape.t = 5.0  # first tick 5 s into the run: the instant is ~25 s on the shape's clock
    assert abs(shape.params.release_in_s - 25.0) < 0.5
    assert shape.at(22.0) == (3, 3.0)
    assert shape.at(24.0) == (30, 13.5)


def test_shape_without_runner_uses_defaults() -> None:
    assert FakeShape().params == SpikeParams()


# --------------------------------------------------------------------------- personal data


def test_national_ids_are_valid() -> None:
    rng = random.Random(7)
    seen = set()
    for _ in range(3000):
        nid = national_id(rng)
        assert len(nid) == 18
        assert normalize_national_id(nid) == nid  # birth date, format, check digit
        assert pii_check_digit(nid[:17]) == nid[17] == check_digit(nid[:17])
        seen.add(nid)
    assert len(seen) > 2990  # distinct enough for thousands of users


def test_check_digit_known_vectors() -> None:
    # GB 11643-1999's example, and a sum that leaves remainder 0 (check '1')
    assert check_digit("11010519491231002") == "X"
    assert check_digit("11010119900307123") == pii_check_digit("11010119900307123")
    for first17 in ("44052418800101001", "34052419800101001", "00000000000000000"):
        assert check_digit(first17) == pii_check_digit(first17)


def test_phones_and_names() -> None:
    rng = random.Random(3)
    for _ in range(500):
        p = phone(rng)
        assert normalize_phone(p) == p
        n = person_name(rng)
        assert 2 <= len(n) <= 3 and n.strip() == n


# --------------------------------------------------------------------------- popularity


def test_zipf_skews_towards_the_top_doctor() -> None:
    doctors = [f"dr{i}" for i in range(20)]
    z = ZipfPicker(doctors, 1.2)
    rng = random.Random(11)
    n = 20_000
    counts = collections.Counter(z.pick(rng) for _ in range(n))
    ranked = [counts[d] for d in doctors]
    assert ranked[0] == max(ranked)
    assert ranked[0] > ranked[1] > ranked[2] > ranked[5] > ranked[19]
    assert abs(ranked[0] / n - z.share(0)) < 0.02
    assert sum(ranked[:3]) / n > 0.45  # a few famous doctors take most of the demand
    assert abs(sum(z.share(i) for i in range(20)) - 1.0) < 1e-9


def test_zipf_exclusion_and_uniform() -> None:
    z = ZipfPicker(["a", "b", "c"], 1.2)
    rng = random.Random(5)
    picks = collections.Counter(z.pick(rng, exclude={"a"}) for _ in range(3000))
    assert set(picks) == {"b", "c"} and picks["b"] > picks["c"]
    assert z.pick(rng, exclude={"a", "b", "c"}) is None
    assert ZipfPicker([], 1.0).pick(rng) is None
    flat = collections.Counter(ZipfPicker(["a", "b"], 0.0).pick(rng) for _ in range(4000))
    assert abs(flat["a"] - flat["b"]) < 400
    with pytest.raises(ValueError):
        ZipfPicker(["a"], -1)


# --------------------------------------------------------------------------- payment


def test_payment_signature() -> None:
    body = b'{"payment_ref":"pay-1","amount":5000}'
    path = "/v1/holds/3.S1.17/confirm"
    want = hmac.new(b"s3cret", b"v2\n1700000000\nPOST\n" + path.encode() + b"\n" + body,
                    hashlib.sha256).hexdigest()
    assert sign_payment("s3cret", 1_700_000_000, body, path=path) == want
    assert sign_payment("s3cret", "1700000000", body, path=path) == want
    assert sign_payment("other", 1_700_000_000, body, path=path) != want
    assert sign_payment("s3cret", 1_700_000_000, body, path="/v1/holds/3.S1.18/confirm") != want
    try:
        from api.auth import sign_payment as api_sign
        from api.auth import verify_payment
    except ImportError:  # pragma: no cover - the API not there yet
        return
    ts = int(time.time())
    assert sign_payment("k", ts, body, path=path) == api_sign("k", ts, body, path=path)
    good = sign_payment("k", ts, body, path=path)
    assert verify_payment("k", str(ts), good, body, method="POST", path=path)
    assert not verify_payment("k", str(ts), sign_payment("k", ts, body + b" ", path=path), body,
                              method="POST", path=path)
    assert not verify_payment("k", str(ts), good, body, method="POST",
                              path="/v1/holds/3.S1.18/confirm")


# --------------------------------------------------------------------------- names, summary


def test_request_names_round_trip() -> None:
    name = request_name("POST", "/v1/holds", "sold-out")
    assert name == "POST /v1/holds [sold-out]"
    assert parse_name(name) == (False, "POST", "/v1/holds", "sold-out")
    bot = request_name("POST", "/v1/holds", "rate-limited", bot=True)
    assert parse_name(bot) == (True, "POST", "/v1/holds", "rate-limited")
    assert parse_name("GET /v1/x [503 unavailable]") == (False, "GET", "/v1/x", "503 unavailable")
    assert parse_name("/v1/holds") is None
    assert problem_slug({"type": "/problems/not-open", "status": 409}) == "not-open"
    assert problem_slug({"title": "x"}) is None and problem_slug(None) is None


def test_parse_think() -> None:
    assert parse_think("1-3") == (1.0, 3.0)
    assert parse_think("2") == (2.0, 2.0)
    assert parse_think(0.5) == (0.5, 0.5)
    with pytest.raises(ValueError):
        parse_think("3-1")


@dataclass
class _Entry:
    name: str
    method: str
    num_requests: int
    num_failures: int = 0
    times: list[int] = field(default_factory=list)
    total_rps: float = 0.0

    def get_response_time_percentile(self, q: float) -> int:
        s = sorted(self.times) or [0]
        return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class _Stats:
    entries: dict[tuple[str, str], _Entry]
    total: _Entry


def test_build_summary() -> None:
    rows = [
        _Entry("POST /v1/holds [held]", "POST", 10, times=[5] * 10),
        _Entry("POST /v1/holds [sold-out]", "POST", 30, times=[2] * 30),
        _Entry("bot POST /v1/holds [held]", "POST", 2, times=[3, 3]),
        _Entry("bot POST /v1/holds [rate-limited]", "POST", 100, times=[1] * 100),
        _Entry("POST /v1/holds/{id}/confirm [booked]", "POST", 9, times=[7] * 9),
        _Entry("DELETE /v1/holds/{id} [released]", "DELETE", 1, times=[4]),
        _Entry("POST /v1/bookings/{id}/cancel [cancelled]", "POST", 2, times=[4, 4]),
        _Entry("POST /v1/holds [503 unavailable]", "POST", 3, 3, times=[900] * 3),
        _Entry("GET /v1/sessions [transport-error]", "GET", 1, 1, times=[1]),
        _Entry("/legacy", "GET", 4, times=[1] * 4),
        _Entry("GET /v1/bookings [ok]", "GET", 0),
    ]
    all_times = [t for r in rows for t in r.times]
    total = _Entry("Aggregated", "", sum(r.num_requests for r in rows),
                   sum(r.num_failures for r in rows), times=all_times, total_rps=12.34)
    s = build_summary(_Stats({(r.name, r.method): r for r in rows}, total),
                      {"fallbacks": 4}, {"target": {"capacity": 12}})
    assert s["requests"] == 162 and s["failures"] == 4
    assert s["status_5xx"] == 3 and s["transport_errors"] == 1
    assert s["holds"] == 12 and s["confirms"] == 9
    assert s["releases"] == 1 and s["cancels"] == 2
    assert s["net_holds"] == 9 and s["net_bookings"] == 7
    assert s["bot_requests"] == 102 and s["unnamed_requests"] == 4
    assert s["outcomes"]["POST /v1/holds"] == {"held": 10, "sold-out": 30, "503 unavailable": 3}
    assert s["outcomes"]["bot POST /v1/holds"] == {"held": 2, "rate-limited": 100}
    assert "GET /v1/bookings [ok]" not in s["by_name"]
    assert s["by_name"]["POST /v1/holds [held]"]["p99"] == 5
    assert s["p50"] == 1 and s["p99"] == 900 and s["rps"] == 12.3
    assert s["scenario"] == {"fallbacks": 4} and s["target"] == {"capacity": 12}
    json.dumps(s)  # serialisable


# --------------------------------------------------------------------------- under Locust


@pytest.mark.skipif(not HAVE_LOCUST, reason="locust is not installed")
def test_locustfile_loads_under_locust() -> None:
    """Locust finds the two user classes and the shape; the shape is a real
    LoadTestShape; the options parse."""
    code = """
import json
from locust import LoadTestShape
from locust.argument_parser import parse_options
from locust.util.load_locustfile import load_locustfile
users, shapes = load_locustfile("loadtest/locustfile.py")
shape = shapes[0]
shape.reset_time()
opts = parse_options(["-f", "loadtest/locustfile.py", "--hy-peak-users", "7", "--hy-think", "0-1"])
print(json.dumps({"users": sorted(users), "shapes": [type(s).__name__ for s in shapes],
                  "is_shape": isinstance(shape, LoadTestShape), "tick": shape.tick(),
                  "peak": opts.hy_peak_users, "think": opts.hy_think,
                  "bots": opts.hy_bots}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["users"] == ["Bot", "Patient"]
    assert got["shapes"] == ["SpikeShape"] and got["is_shape"]
    assert got["tick"] == [10, 10.0]
    assert got["peak"] == 7 and got["think"] == "0-1" and got["bots"] == 0.05


# --------------------------------------------------------------------------- end to end


def _api_importable() -> str | None:
    try:
        from api.app import create_app  # noqa: F401
    except Exception as exc:  # the API is another engineer's work in progress
        return f"api.app.create_app is not importable: {type(exc).__name__}: {exc}"
    return None


def _schedule(date: str, release_at_ms: int) -> tuple[list[dict[str, Any]], int]:
    sessions = []
    for i in range(3):
        sessions.append({
            "session_id": f"LT{date.replace('-', '')}D{i}", "hospital": "H1", "dept": "cardio",
            "doctor": f"dr{i}", "date": date, "period": "AM", "fee": 5000 - 1000 * i,
            "release_at_ms": release_at_ms,
            "slots": [{"slot_id": f"{8 + j:02d}00", "start": f"{8 + j:02d}:00",
                       "end": f"{8 + j:02d}:30", "capacity": 2} for j in range(2)],
        })
    return sessions, sum(sl["capacity"] for s in sessions for sl in s["slots"])


class ApiProcess:
    """``python -m api.serve`` (granian, one worker) in a subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env, self.port, self.log_path = env, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api.serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LOCUST, reason="locust is not installed")
async def test_spike_end_to_end(
    redis_url: str, fresh_redis: Any, fresh_pg_dsn: str, tmp_path: Path
) -> None:
    """The API under granian, a tiny spike for ~10 s, and the invariants."""
    why = _api_importable()
    if why is not None:
        pytest.skip(why)
    import httpx

    from engine.store.migrate import migrate
    from engine.testing.servers import free_port

    await migrate(fresh_pg_dsn)
    port = free_port()
    admin = secrets.token_urlsafe(24)
    payment = secrets.token_urlsafe(24)
    env = _env() | {
        "HAOYUAN_ENV": "development",  # the scenario logs in with dev-<openid> codes
        "HAOYUAN_REDIS_URL": redis_url,  # emptied by fresh_redis
        "HAOYUAN_PG_DSN": fresh_pg_dsn,
        "HAOYUAN_ADMIN_TOKEN": admin,
        "HAOYUAN_PAYMENT_SECRET": payment,
        "HAOYUAN_ACCESS_LOG": "0",
        "HAOYUAN_LOG_LEVEL": "warning",
        "HAOYUAN_NEW_ACCOUNTS_INTERVAL_S": "0",  # the crowd comes from one address
    }
    api = ApiProcess(env, port, tmp_path / "api.log")
    await asyncio.to_thread(api.start)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                assert api.alive(), api.log_tail()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the API did not become ready"
                await asyncio.sleep(0.2)

            date = (dt.date.today() + dt.timedelta(days=7)).isoformat()
            release_at_ms = int(time.time() * 1000) + 5000
            sessions, capacity = _schedule(date, release_at_ms)
            auth = {"Authorization": f"Bearer {admin}"}
            r = await client.post("/v1/admin/sessions", json=sessions, headers=auth)
            assert r.status_code == 200, r.text

            summary_path = tmp_path / "spike.json"
            cmd = [
                sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
                "--host", base, "--csv", str(tmp_path / "spike"),
                "--html", str(tmp_path / "spike.html"), "--only-summary",
                "--hy-summary", str(summary_path), "--hy-date", date,
                "--hy-release-at-ms", str(release_at_ms),
                "--hy-quiet-users", "3", "--hy-peak-users", "24", "--hy-ramp-s", "2",
                "--hy-hold-s", "4", "--hy-decay-s", "1", "--hy-total-s", "10",
                "--hy-think", "0.2-0.8", "--hy-abandon", "0.2", "--hy-cancel", "0.3",
                "--hy-bots", "0.1", "--hy-bot-pause", "0.02", "--hy-seed", "42",
            ]
            run = await asyncio.to_thread(
                subprocess.run, cmd, cwd=ROOT, env=env | {"HAOYUAN_PAYMENT_SECRET": payment},
                capture_output=True, text=True, timeout=45)
            tail = run.stdout[-4000:] + run.stderr[-4000:]
            assert summary_path.exists(), tail
            s = json.loads(summary_path.read_text())

            # the server held: no 5xx, nothing the scenario did not expect
            assert s["status_5xx"] == 0, s["by_name"]
            assert s["transport_errors"] == 0, s["by_name"]
            assert s["failures"] == 0, s["by_name"]
            assert run.returncode == 0, tail
            # the spike happened: demand above capacity, sold-out answers, bookings
            assert s["target"]["capacity"] == capacity
            assert s["holds"] >= 1 and s["confirms"] >= 1, s["outcomes"]
            assert s["outcomes"].get("POST /v1/holds", {}).get("sold-out", 0) >= 1, s["outcomes"]
            # no oversell: units taken at once, and bookings kept, within capacity
            assert s["net_holds"] <= capacity, s
            assert s["net_bookings"] <= capacity, s
            assert s["confirms"] <= s["holds"]
            # the engine agrees: conservation in every slot
            audit = await client.post("/v1/admin/audit", headers=auth)
            assert audit.status_code == 200 and audit.json()["ok"], audit.text
            # reports for humans
            assert (tmp_path / "spike_stats.csv").exists()
            assert (tmp_path / "spike.html").stat().st_size > 10_000
            assert "POST /v1/holds [held]" in (tmp_path / "spike_stats.csv").read_text()
    finally:
        await asyncio.to_thread(api.stop)
