"""Retry pacing for HIS forwarding: exponential backoff with full jitter, and a
circuit breaker.

Both are plain objects for one event loop (not thread-safe), with the clock
and the random source injectable so tests need no sleeping.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable

Clock = Callable[[], float]


class Backoff:
    """``delay(n)`` is uniform in ``[0, min(cap, base * factor**n)]`` (full jitter).

    ``attempt`` counts from 0 (the delay before the first retry).
    """

    __slots__ = ("_rng", "base", "cap", "factor")

    def __init__(
        self,
        base: float = 0.1,
        cap: float = 10.0,
        factor: float = 2.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base or factor < 1:
            raise ValueError("need 0 < base <= cap and factor >= 1")
        self.base = base
        self.cap = cap
        self.factor = factor
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int) -> float:
        """The largest delay ``attempt`` may draw."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        try:
            return min(self.cap, self.base * self.factor**attempt)
        except OverflowError:
            return self.cap

    def delay(self, attempt: int) -> float:
        return self._rng.uniform(0.0, self.ceiling(attempt))


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after
    ``reset_timeout`` seconds it lets ``half_open_max`` trial calls through:
    a success closes it, a failure opens it again for another timeout.

    Call ``allow()`` before each request and skip the request when it says
    ``False``; then report ``record_success()`` or ``record_failure()``. A
    business rejection is a success: the HIS answered. A trial that never
    reports back frees its place after another ``reset_timeout``.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_state",
        "_trial_since",
        "_trials",
        "failure_threshold",
        "half_open_max",
        "reset_timeout",
    )

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        *,
        half_open_max: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_timeout <= 0 or half_open_max < 1:
            raise ValueError("need failure_threshold >= 1, reset_timeout > 0, half_open_max >= 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_max = half_open_max
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0
        self._trial_since = 0.0

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose timeout passed reads half-open)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.reset_timeout
        ):
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    def allow(self) -> bool:
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now - self._opened_at < self.reset_timeout:
                return False
            self._state = BreakerState.HALF_OPEN
            self._trials = 0
            self._trial_since = now
        elif now - self._trial_since >= self.reset_timeout:
            # Trials that never reported back: let new ones through.
            self._trials = 0
            self._trial_since = now
        if self._trials >= self.half_open_max:
            return False
        self._trials += 1
        return True

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trials = 0

    def record_failure(self) -> None:
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
        elif self._state is BreakerState.HALF_OPEN:
            self._open()
        # Already open: a late failure of a call made before it opened
        # does not push the retry time back.

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._trials = 0
