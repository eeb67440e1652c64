"""Capacity planning (issue 16): the M/M/s clinic against published Erlang C
values and against its own discrete-event simulation, the fewest servers
for a target wait, unstable input refused, booked arrivals simulated, and
the release-morning sizing against the scale model of benchmarks/README.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import capacity as cap

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("servers", "load", "published"), [
    (1, 0.5, 0.5),        # M/M/1: an arrival waits with probability rho
    (2, 1.0, 1 / 3),
    (5, 3.0, 0.2362),     # Erlang C tables
    (10, 8.0, 0.4092),
])
def test_erlang_c_against_published_values(servers: int, load: float, published: float) -> None:
    assert cap.erlang_c(servers, load) == pytest.approx(published, abs=5e-4)


def test_the_mm1_closed_form() -> None:
    q = cap.mms(5, 10, 1)  # rho 0.5: Wq = rho / (mu - lambda) = 0.1 h, Lq = rho^2/(1-rho)
    assert q.utilization == 0.5 and q.p_wait == 0.5
    assert q.wq_minutes == pytest.approx(6.0) and q.lq == pytest.approx(0.5)
    assert q.w_minutes == pytest.approx(12.0)
    # P(wait > t) = rho * exp(-(mu - lambda) t): the 90th percentile
    assert q.wait_percentile_minutes == pytest.approx(60 * (2.302585 - 0.693147) / 5, rel=1e-4)


@pytest.mark.parametrize(("lam", "mu", "s"), [(5, 10, 1), (30, 4, 10), (48, 6, 10)])
def test_the_closed_form_agrees_with_the_simulation(lam: float, mu: float, s: int) -> None:
    """Within 5% on the mean wait and 0.01 on P(wait), 200,000 patients."""
    q = cap.mms(lam, mu, s)
    sim = cap.simulate_mms(lam, mu, s, patients=200_000, seed=7)
    assert sim.wq_minutes == pytest.approx(q.wq_minutes, rel=0.05)
    assert sim.p_wait == pytest.approx(q.p_wait, abs=0.01)
    assert sim.utilization == pytest.approx(q.utilization, abs=0.01)
    assert sim.wait_percentile_minutes == pytest.approx(q.wait_percentile_minutes, rel=0.06,
                                                        abs=0.05)


def test_the_fewest_servers_for_a_target_wait() -> None:
    s = cap.servers_for_wait(30, 4, 1.0)
    assert cap.mms(30, 4, s).wq_minutes <= 1.0 < cap.mms(30, 4, s - 1).wq_minutes
    assert cap.servers_for_wait(30, 4, 1000) == 8  # the fewest stable: 7.5 Erlangs


def test_unstable_and_bad_input_are_refused() -> None:
    with pytest.raises(cap.Unstable):
        cap.mms(40, 4, 10)
    with pytest.raises(cap.Unstable):
        cap.erlang_c(3, 3.0)
    for bad in ((-1, 4, 1), (1, 0, 1), (1, 4, 0), (float("nan"), 4, 1)):
        with pytest.raises(ValueError):
            cap.mms(*bad)
    with pytest.raises(ValueError):
        cap.mms(1, 4, 1, percentile=1.0)


def test_booked_arrivals_wait_less_than_random_ones_and_no_shows_idle_the_doctor() -> None:
    """Appointments every 60/L minutes smooth the arrivals: less waiting
    than M/M/s at the same load; no-shows leave the doctor idle; patients
    who come early or late make the waits longer."""
    mms = cap.mms(8, 10, 1)
    punctual = cap.simulate_booked(8, 10, 1, punctuality_sd_minutes=0, no_show_rate=0)
    sloppy = cap.simulate_booked(8, 10, 1, punctuality_sd_minutes=10, no_show_rate=0)
    absent = cap.simulate_booked(8, 10, 1, punctuality_sd_minutes=0, no_show_rate=0.3)
    assert punctual.wq_minutes < mms.wq_minutes
    assert punctual.wq_minutes < sloppy.wq_minutes
    assert absent.utilization < punctual.utilization and absent.wq_minutes < punctual.wq_minutes
    assert absent.no_shows == pytest.approx(0.3 * absent.patients, rel=0.05)
    assert punctual.seen == 200 * 32 and punctual.no_shows == 0


@pytest.mark.parametrize(("share", "cores", "primaries"), [(0.05, 24, 3), (0.10, 25, 4),
                                                           (0.25, 26, 8)])
def test_release_sizing_is_the_scale_model_of_the_benchmarks(share: float, cores: int,
                                                               primaries: int) -> None:
    """The table of benchmarks/README.md ("Scale model"), 200,000 requests/s."""
    sized = cap.size_release(200_000, reach_redis=share)
    assert (sized.api_cores, sized.redis_primaries) == (cores, primaries)
    assert "200000/s" in sized.arithmetic
    with pytest.raises(ValueError):
        cap.size_release(0)
    with pytest.raises(ValueError):
        cap.size_release(1000, reach_redis=1.5)
    with pytest.raises(ValueError):
        cap.size_release(1000, nonsense=1.0)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "capacity", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_command() -> None:
    got = run("--arrivals-per-hour", "30", "--services-per-hour", "4", "--servers", "10",
              "--target-wait-minutes", "1", "--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    for field in ("utilization", "p_wait", "lq", "wq_minutes", "wait_percentile_minutes",
                  "servers_for_target_wait"):
        assert field in out
    assert out["servers_for_target_wait"] == cap.servers_for_wait(30, 4, 1)
    assert out["p_wait"] == cap.mms(30, 4, 10).p_wait
    sim = run("--arrivals-per-hour", "30", "--services-per-hour", "4", "--servers", "10",
              "--simulate", "--patients", "20000", "--days", "20", "--json")
    assert sim.returncode == 0 and {"simulated", "booked"} <= set(json.loads(sim.stdout))
    bad = run("--arrivals-per-hour", "40", "--services-per-hour", "4", "--servers", "10")
    assert bad.returncode == 2 and "unstable" in bad.stderr and not bad.stdout
    rel = run("release", "--peak-rps", "200000", "--reach-redis", "0.25", "--json")
    assert rel.returncode == 0 and json.loads(rel.stdout)["redis_primaries"] == 8
    assert run("release").returncode == 2
