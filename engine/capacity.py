"""Capacity planning for a clinic and for release morning (容量规划).

Two questions a hospital's management asks, answered as arithmetic:

- **The clinic** (``haoyuan capacity``): patients arrive at ``L`` an hour, a
  doctor sees ``M`` an hour, ``S`` doctors see them. The M/M/s queue
  (Erlang C) gives the utilization, the probability that an arrival waits,
  the mean queue length and wait, a wait percentile, and the fewest doctors
  for a target mean wait. ``simulate_mms`` runs the same clinic as a
  discrete-event simulation, and ``simulate_booked`` the clinic that booking
  makes: patients come at their booked times (every ``60 / L`` minutes),
  early or late by a normal punctuality error, some not at all (no-shows),
  and are seen first come, first served; there is no closed form for that
  one, which is why it is simulated.
- **Release morning** (``haoyuan capacity release``): how many API cores and
  Redis primaries a peak of ``R`` requests a second needs, from the CPU per
  request measured by the benchmarks (``benchmarks/README.md``), stated as
  arithmetic, not as a measurement.

Time is in hours in the queueing formulas and minutes in what they report.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ClinicQueue",
    "ReleaseSizing",
    "Unstable",
    "erlang_c",
    "mms",
    "servers_for_wait",
    "simulate_booked",
    "simulate_mms",
    "size_release",
]


class _Figures:
    """A dataclass of figures that reads as one JSON object."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        return out


class Unstable(ValueError):
    """Arrivals at or above what the servers can see: the queue grows
    without bound, and no steady state exists."""


def erlang_c(servers: int, load: float) -> float:
    """The probability that an arrival waits in an M/M/s queue with
    ``servers`` servers and an offered ``load`` (arrival rate / service
    rate, in Erlangs). Through the Erlang B recursion, which stays exact for
    hundreds of servers where factorials overflow."""
    if servers < 1:
        raise ValueError("servers must be at least 1")
    if load < 0:
        raise ValueError("the load must not be negative")
    if load >= servers:
        raise Unstable(f"a load of {load:g} Erlangs needs more than {servers} servers")
    if load == 0:
        return 0.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


@dataclass(frozen=True, slots=True)
class ClinicQueue(_Figures):
    """The M/M/s clinic: what ``mms`` answers (times in minutes)."""

    arrivals_per_hour: float
    services_per_hour: float
    servers: int
    load_erlangs: float
    utilization: float
    p_wait: float
    lq: float
    wq_minutes: float
    w_minutes: float
    wait_percentile: float
    wait_percentile_minutes: float



def _check(arrivals_per_hour: float, services_per_hour: float, servers: int) -> None:
    if not (math.isfinite(arrivals_per_hour) and math.isfinite(services_per_hour)):
        raise ValueError("the rates must be finite numbers")
    if arrivals_per_hour < 0:
        raise ValueError("arrivals per hour must not be negative")
    if services_per_hour <= 0:
        raise ValueError("services per hour must be positive")
    if servers < 1:
        raise ValueError("servers must be at least 1")
    if arrivals_per_hour >= servers * services_per_hour:
        raise Unstable(
            f"{arrivals_per_hour:g} arrivals an hour reach or exceed what {servers} "
            f"server(s) at {services_per_hour:g} an hour can see "
            f"({servers * services_per_hour:g} an hour): the queue grows without bound")


def mms(arrivals_per_hour: float, services_per_hour: float, servers: int, *,
        percentile: float = 0.9) -> ClinicQueue:
    """The M/M/s (Erlang C) figures of a clinic; ``Unstable`` if L >= S*M."""
    _check(arrivals_per_hour, services_per_hour, servers)
    if not 0 < percentile < 1:
        raise ValueError("the percentile must be between 0 and 1")
    lam, mu, s = arrivals_per_hour, services_per_hour, servers
    a = lam / mu
    rho = a / s
    c = erlang_c(s, a)
    drain = s * mu - lam  # how fast a queue empties, per hour
    wq = c / drain  # hours
    lq = lam * wq
    # P(wait > t) = C * exp(-drain * t): the wait's percentile
    t = 0.0 if percentile <= 1 - c else math.log(c / (1 - percentile)) / drain
    return ClinicQueue(
        arrivals_per_hour=lam, services_per_hour=mu, servers=s, load_erlangs=round(a, 6),
        utilization=round(rho, 6), p_wait=round(c, 6), lq=round(lq, 6),
        wq_minutes=round(wq * 60, 4), w_minutes=round((wq + 1 / mu) * 60, 4),
        wait_percentile=percentile, wait_percentile_minutes=round(t * 60, 4))


def servers_for_wait(arrivals_per_hour: float, services_per_hour: float,
                     target_wait_minutes: float, *, max_servers: int = 10_000) -> int:
    """The fewest servers whose mean wait is at most ``target_wait_minutes``."""
    if target_wait_minutes < 0:
        raise ValueError("the target wait must not be negative")
    _check(arrivals_per_hour, services_per_hour, max_servers)
    s = max(1, math.floor(arrivals_per_hour / services_per_hour) + 1)
    while s <= max_servers:
        if mms(arrivals_per_hour, services_per_hour, s).wq_minutes <= target_wait_minutes:
            return s
        s += 1
    raise Unstable(f"no number of servers up to {max_servers} meets the target")


@dataclass(frozen=True, slots=True)
class Simulated(_Figures):
    """A simulated clinic's figures (minutes)."""

    patients: int
    seen: int
    no_shows: int
    wq_minutes: float
    p_wait: float
    wait_percentile_minutes: float
    utilization: float
    seed: int



def _serve(arrivals: list[float], services: list[float], servers: int, *,
           skip: int = 0) -> tuple[list[float], float, float]:
    """First come, first served on ``servers`` servers (times in hours,
    ``arrivals`` sorted): the waits of the patients after the first
    ``skip``, the busy time, and the span from the first arrival to the
    last departure."""
    if not arrivals:
        return [], 0.0, 0.0
    free_at = [arrivals[0]] * servers
    waits: list[float] = []
    busy = 0.0
    for i, (t, d) in enumerate(zip(arrivals, services, strict=True)):
        start = max(t, heapq.heappop(free_at))
        if i >= skip:
            waits.append(start - t)
        busy += d
        heapq.heappush(free_at, start + d)
    return waits, busy, max(free_at) - arrivals[0]


def _figures(waits: list[float], percentile: float) -> tuple[float, float, float]:
    """Mean wait (minutes), the share that waited, the wait's percentile (minutes)."""
    if not waits:
        return 0.0, 0.0, 0.0
    ws = sorted(waits)
    k = min(len(ws) - 1, max(0, math.ceil(percentile * len(ws)) - 1))
    return (round(sum(ws) / len(ws) * 60, 4),
            round(sum(1 for w in ws if w > 1e-12) / len(ws), 6), round(ws[k] * 60, 4))


def simulate_mms(arrivals_per_hour: float, services_per_hour: float, servers: int, *,
                 patients: int = 200_000, warmup: int = 10_000, seed: int = 1,
                 percentile: float = 0.9) -> Simulated:
    """The M/M/s clinic as a discrete-event simulation: Poisson arrivals,
    exponential visits, first come first served; the first ``warmup``
    patients are left out of the waits (the empty start)."""
    _check(arrivals_per_hour, services_per_hour, servers)
    rng = random.Random(seed)
    t = 0.0
    arrivals, services = [], []
    for _ in range(patients + warmup):
        t += rng.expovariate(arrivals_per_hour)
        arrivals.append(t)
        services.append(rng.expovariate(services_per_hour))
    waits, busy, span = _serve(arrivals, services, servers, skip=warmup)
    wq, p, pct = _figures(waits, percentile)
    return Simulated(patients=patients, seen=patients, no_shows=0, wq_minutes=wq, p_wait=p,
                     wait_percentile_minutes=pct,
                     utilization=round(busy / (servers * span), 6) if span else 0.0, seed=seed)


def simulate_booked(booked_per_hour: float, services_per_hour: float, servers: int, *,
                    hours: float = 4.0, days: int = 200, punctuality_sd_minutes: float = 5.0,
                    no_show_rate: float = 0.1, seed: int = 1,
                    percentile: float = 0.9) -> Simulated:
    """The clinic booking makes: ``booked_per_hour`` appointments an hour
    for ``hours`` (a session), each patient early or late by a normal error
    of ``punctuality_sd_minutes``, absent with probability ``no_show_rate``;
    exponential visits, first come first served, over ``days`` sessions."""
    if not 0 <= no_show_rate < 1:
        raise ValueError("the no-show rate must be in [0, 1)")
    if punctuality_sd_minutes < 0 or hours <= 0 or days < 1 or booked_per_hour <= 0:
        raise ValueError("booked per hour, hours and days must be positive, punctuality"
                         " not negative")
    _check(booked_per_hour * (1 - no_show_rate), services_per_hour, servers)
    rng = random.Random(seed)
    waits: list[float] = []
    busy = span = 0.0
    absent = 0
    n = int(booked_per_hour * hours)
    for _ in range(days):
        arrivals = []
        for i in range(n):
            if rng.random() < no_show_rate:
                absent += 1
                continue
            arrivals.append(i / booked_per_hour + rng.gauss(0, punctuality_sd_minutes / 60))
        arrivals.sort()
        services = [rng.expovariate(services_per_hour) for _ in arrivals]
        w, b, sp = _serve(arrivals, services, servers)
        waits += w
        busy += b
        span += sp
    wq, p, pct = _figures(waits, percentile)
    return Simulated(patients=len(waits) + absent, seen=len(waits), no_shows=absent,
                     wq_minutes=wq, p_wait=p, wait_percentile_minutes=pct,
                     utilization=round(busy / (servers * span), 6) if span else 0.0, seed=seed)


# --------------------------------------------------------------------------- release morning

#: Measured figures the sizing starts from (``benchmarks/README.md``, "Scale
#: model"): API worker CPU per answer without Redis (cached sold-out and
#: not-open, micro-cached availability) and per hold, Redis CPU per hold
#: (``holdUnit`` with the patient rules), the share of requests that reach
#: Redis, the API's headroom (shedding starts at a loop lag of 250 ms: do
#: not plan to run hot), how busy a Redis primary may run (one thread: keep
#: its tail short), and the fewest primaries of a cluster. Each is a flag.
MEASURED: dict[str, float] = {
    "api_us_cached": 90.0,
    "api_us_hold": 125.0,
    "redis_us_hold": 80.0,
    "reach_redis": 0.10,
    "api_headroom": 0.30,
    "redis_busy": 0.5,
    "min_primaries": 3.0,
}


@dataclass(frozen=True, slots=True)
class ReleaseSizing(_Figures):
    peak_rps: float
    api_cores: int
    redis_primaries: int
    api_core_seconds_per_s: float
    redis_core_seconds_per_s: float
    inputs: dict[str, float]
    arithmetic: str



def size_release(peak_rps: float, **measured: float) -> ReleaseSizing:
    """API cores and Redis primaries for a peak of ``peak_rps`` (see ``MEASURED``):

    - API cores = R x ((1 - f) x api_us_cached + f x api_us_hold), plus the headroom;
    - Redis primaries = R x f x redis_us_hold / redis_busy, at least min_primaries.
    """
    if not (math.isfinite(peak_rps) and peak_rps > 0):
        raise ValueError("the peak must be a positive number of requests a second")
    unknown = set(measured) - set(MEASURED)
    if unknown:
        raise ValueError(f"unknown figure(s): {', '.join(sorted(unknown))}")
    m = {**MEASURED, **measured}
    for k, v in m.items():
        if not math.isfinite(v) or v < 0 or (k in ("reach_redis", "redis_busy") and v > 1) \
                or (k in ("redis_busy", "api_us_cached", "api_us_hold", "redis_us_hold")
                    and v == 0):
            raise ValueError(f"{k} is out of range")
    f = m["reach_redis"]
    per_request_us = (1 - f) * m["api_us_cached"] + f * m["api_us_hold"]
    api = peak_rps * per_request_us / 1e6
    redis = peak_rps * f * m["redis_us_hold"] / 1e6
    cores = math.ceil(round(api * (1 + m["api_headroom"]), 6))
    primaries = max(int(m["min_primaries"]), math.ceil(round(redis / m["redis_busy"], 6)))
    text = (f"API: {peak_rps:g}/s x ((1 - {f:g}) x {m['api_us_cached']:g} + {f:g} x "
            f"{m['api_us_hold']:g}) us = {api:.2f} cores, +{m['api_headroom']:.0%} headroom: "
            f"{cores}; Redis: {peak_rps:g}/s x {f:g} x {m['redis_us_hold']:g} us = "
            f"{redis:.2f} s/s, at {m['redis_busy']:.0%} busy per primary: {primaries}"
            f" (at least {int(m['min_primaries'])})")
    return ReleaseSizing(peak_rps=peak_rps, api_cores=cores, redis_primaries=primaries,
                         api_core_seconds_per_s=round(api, 3),
                         redis_core_seconds_per_s=round(redis, 3), inputs=m, arithmetic=text)
