"""The release-morning load shape: quiet, a steep ramp that ends at the release
instant, a plateau, a decay, quiet again, then the run ends by itself.

    users
    peak ┤            ┌─────────┐
         │           ╱│  hold   │╲
         │          ╱ │         │ ╲  decay
   quiet ┤─────────╱  │         │  ╲──────────
         └────────┴───┴─────────┴───┴────────┴── t (s)
                  ramp  release      total: tick() -> None

This module does not import Locust (importing ``locust`` monkey-patches the
whole process with gevent, which a pytest process must not suffer):
``SpikeShapeMixin`` carries the logic and ``loadtest.locustfile`` mixes it into
``locust.LoadTestShape``. Tests mix it into a fake with a settable clock.

Locust calls ``tick()`` about once a second and, when the answer changes,
``runner.start(users, rate)``, which blocks until that many users are running.
So each phase answers the *target* of the phase and the rate that reaches it
within the phase: the ramp answers ``(peak, (peak - quiet) / ramp_s)`` from
``release_in - ramp_s`` on, so the peak is reached at the release instant
(users arrive in the seconds before 07:00 and press at 07:00), not one tick
late as an interpolated target would be.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["SpikeParams", "SpikeShapeMixin", "spike_tick"]

#: Command-line option (dest) of each ``SpikeParams`` field.
OPTION_OF = {
    "release_in_s": "hy_release_in",
    "quiet_users": "hy_quiet_users",
    "peak_users": "hy_peak_users",
    "ramp_s": "hy_ramp_s",
    "hold_s": "hy_hold_s",
    "decay_s": "hy_decay_s",
    "total_s": "hy_total_s",
}


@dataclass(frozen=True, slots=True)
class SpikeParams:
    """Times are seconds from the start of the run (the shape's clock)."""

    release_in_s: float = 10.0
    quiet_users: int = 10
    peak_users: int = 200
    ramp_s: float = 2.0
    hold_s: float = 15.0
    decay_s: float = 10.0
    total_s: float = 45.0

    def __post_init__(self) -> None:
        if self.quiet_users < 0 or self.peak_users < 0:
            raise ValueError("user counts must be >= 0")
        if self.ramp_s < 0 or self.hold_s < 0 or self.decay_s < 0:
            raise ValueError("ramp, hold and decay must be >= 0 seconds")
        if self.total_s <= 0:
            raise ValueError("total must be > 0 seconds")

    @classmethod
    def from_options(cls, options: Any, release_in_s: float | None = None) -> SpikeParams:
        """From Locust's ``parsed_options`` (missing options keep the defaults)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = getattr(options, OPTION_OF[f.name], None)
            if v is not None:
                values[f.name] = int(v) if f.name.endswith("users") else float(v)
        if release_in_s is not None:
            values["release_in_s"] = release_in_s
        return cls(**values)

    # phase boundaries -------------------------------------------------
    @property
    def ramp_start_s(self) -> float:
        return max(0.0, self.release_in_s - self.ramp_s)

    @property
    def decay_start_s(self) -> float:
        return max(self.release_in_s, 0.0) + self.hold_s

    @property
    def decay_end_s(self) -> float:
        return self.decay_start_s + self.decay_s

    @property
    def up_rate(self) -> float:
        """Users per second of the ramp: steep (the whole ramp in ``ramp_s``)."""
        span = self.release_in_s - self.ramp_start_s
        delta = abs(self.peak_users - self.quiet_users)
        return _rate(delta / span if span > 0 else delta)

    @property
    def down_rate(self) -> float:
        delta = abs(self.peak_users - self.quiet_users)
        return _rate(delta / self.decay_s if self.decay_s > 0 else delta)

    @property
    def quiet_rate(self) -> float:
        """Reach the quiet level in about a second."""
        return _rate(self.quiet_users)


def _rate(r: float) -> float:
    return round(max(1.0, r), 3)


def spike_tick(t: float, p: SpikeParams) -> tuple[int, float] | None:
    """(target users, spawn rate) at ``t`` seconds into the run; None from ``total_s`` on."""
    if t >= p.total_s:
        return None
    if t < p.ramp_start_s:
        return p.quiet_users, p.quiet_rate
    if t < p.decay_start_s:  # ramp, then the plateau: same target, same tuple
        return p.peak_users, p.up_rate
    return p.quiet_users, p.down_rate  # decay, then quiet until the end


class SpikeShapeMixin:
    """``tick()`` of the spike; mix into ``locust.LoadTestShape``.

    Parameters come from ``params`` when given (tests), else from the
    runner's ``parsed_options`` (the ``--hy-*`` command-line options, or the
    web UI's form), read again at every run start (``reset_time``). With
    ``--hy-release-at-ms`` (an absolute epoch instant, e.g. the imported
    schedule's) the release instant is placed on the shape's clock at the
    first tick, so the ramp ends at the real instant.
    """

    runner: Any = None

    def __init__(self, params: SpikeParams | None = None) -> None:
        super().__init__()
        self._fixed = params
        self._params: SpikeParams | None = params
        if not hasattr(self, "start_time"):
            self.start_time = time.perf_counter()

    # LoadTestShape provides these two; the fallbacks serve plain test doubles.
    def get_run_time(self) -> float:
        return time.perf_counter() - self.start_time

    def reset_time(self) -> None:
        self.start_time = time.perf_counter()
        self._params = self._fixed

    @property
    def params(self) -> SpikeParams:
        if self._params is None:
            self._params = self._resolve()
        return self._params

    def _resolve(self) -> SpikeParams:
        env = getattr(self.runner, "environment", None)
        options = getattr(env, "parsed_options", None)
        if options is None:
            return SpikeParams()
        release_in = None
        at_ms = getattr(options, "hy_release_at_ms", 0) or 0
        if at_ms > 0:
            release_in = self.get_run_time() + (at_ms - time.time() * 1000) / 1000
        return SpikeParams.from_options(options, release_in_s=release_in)

    def tick(self) -> tuple[int, float] | None:
        return spike_tick(self.get_run_time(), self.params)
