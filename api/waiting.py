"""The release-morning waiting room (排队): when more patients press "book"
than the engine can serve, they queue in order instead of hammering.

- A hold that is shed (the worker is over its in-flight bound, its event loop
  runs late, or the request waited too long already), or that arrives while
  a line has formed, gets a **ticket** instead of a decision: 429
  ``waiting-room`` with the ticket, the patient's ``position``, how many are
  ``ahead`` and ``retry_after_ms`` (Retry-After): "you are number N, about T
  seconds". The mini-program shows it and comes back then, with the ticket
  in ``X-Waiting-Ticket``.
- The line lives in Redis (``lua/takeTicket-2.lua``): positions are issued in
  order, one place per account (asking again returns it), and the line is
  served at ``waiting_room_rate`` positions a second, counted by time: an
  abandoned ticket never jams it, its turn just passes.
- A ticket whose turn has come is **admitted** for ``waiting_room_window_s``:
  its holds skip the line and the loop-lag shedding (the in-flight bound
  still holds). Admission is decided in the worker from its view of the
  line (``lua/readLine-1.lua``, read every ``waiting_room_refresh_ms``):
  no Redis call per waiting request.
- A ticket is signed (HMAC-SHA256 with a key derived from the token secret)
  over the account, the position and when its turn comes: a ticket of
  another account, or with another position or time, is refused (the
  request queues anew).

Nothing here decides a hold: the line only orders who gets to ask.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from engine.replies import LineReply

if TYPE_CHECKING:
    from engine import Engine

__all__ = ["Admission", "Ticket", "WaitingRoom"]

_PREFIX = "wr1"

Verdict = Literal["admitted", "waiting", "expired", "invalid", "none"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """A place in the line: what the client carries and what it is told."""

    token: str
    position: int
    ahead: int
    retry_after_ms: int
    #: Its turn has come (the holder may ask now, within the window).
    due: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """What a hold's ticket (or its absence) means now."""

    verdict: Verdict
    position: int = 0
    due_ms: int = 0


class WaitingRoom:
    """One worker's door to the line (see the module docstring)."""

    def __init__(self, engine: Engine, secret: str, *, rate_per_s: float, window_s: float,
                 refresh_ms: int = 200) -> None:
        self.engine = engine
        self.rate = float(rate_per_s)
        self.window_ms = int(window_s * 1000)
        self.refresh_s = refresh_ms / 1000
        self._key = hmac.new(secret.encode(), b"haoyuan waiting room v1", hashlib.sha256).digest()
        self._view: LineReply | None = None
        self._view_mono = 0.0
        self._loading: asyncio.Task[None] | None = None
        #: Counters for /metrics and the benchmark.
        self.tickets_issued = 0
        self.admitted = 0
        self.waiting = 0
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    # ------------------------------------------------------------------ tickets
    def _sign(self, account: str, position: int, due_ms: int) -> str:
        msg = f"{account}|{position}|{due_ms}".encode()
        mac = hmac.new(self._key, msg, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def encode(self, account: str, position: int, due_ms: int) -> str:
        """``wr1.<position>.<due ms>.<signature>``."""
        return f"{_PREFIX}.{position}.{due_ms}.{self._sign(account, position, due_ms)}"

    def decode(self, account: str, token: str) -> tuple[int, int] | None:
        """(position, due ms) of a ticket signed for ``account``, else None."""
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _PREFIX or len(token) > 80:
            return None
        pos_s, due_s, sig = parts[1], parts[2], parts[3]
        if not (pos_s.isascii() and pos_s.isdigit() and due_s.isascii() and due_s.isdigit()):
            return None
        if len(pos_s) > 15 or len(due_s) > 15:
            return None
        pos, due = int(pos_s), int(due_s)
        if pos < 1 or not hmac.compare_digest(sig, self._sign(account, pos, due)):
            return None
        return pos, due

    # ------------------------------------------------------------------ the line
    def served_now(self) -> float:
        """The served position now, from this worker's view of the line."""
        v = self._view
        if v is None:
            return 0.0
        return v.served + self.rate * max(0.0, time.monotonic() - self._view_mono)

    def waiting_now(self) -> int:
        """Places issued and not admitted yet (this worker's view)."""
        v = self._view
        return 0 if v is None else max(0, math.ceil(v.issued - self.served_now()))

    def active(self) -> bool:
        """Someone is waiting: newcomers queue behind them."""
        v = self._view
        return v is not None and v.issued > self.served_now()

    def ticket(self, account: str, line: LineReply) -> Ticket:
        """The ticket of a place ``takeTicket`` gave."""
        ahead = max(0, math.ceil(line.pos - 1 - line.served))
        return Ticket(self.encode(account, line.pos, line.due), line.pos, ahead,
                      max(100, line.due - line.now), due=line.due <= line.now)

    def current(self, token: str, position: int, due_ms: int, now_ms: int) -> Ticket:
        """The ticket a waiting client came with, and its wait as it stands now."""
        ahead = max(0, math.ceil(position - 1 - self.served_now()))
        return Ticket(token, position, ahead, max(100, due_ms - now_ms))

    def check(self, account: str, token: str | None, now_ms: int) -> Admission:
        """What the ticket a hold came with says at ``now_ms`` (Redis time;
        no Redis call): its turn has not come (waiting), it came and the
        window is open (admitted), or the window has passed (expired)."""
        if not token:
            return Admission("none")
        got = self.decode(account, token)
        if got is None:
            self.refused += 1
            return Admission("invalid")
        pos, due = got
        if pos > self.served_now() and now_ms < due:
            self.waiting += 1
            return Admission("waiting", pos, due)
        if now_ms > due + self.window_ms:
            return Admission("expired", pos, due)
        self.admitted += 1
        return Admission("admitted", pos, due)

    async def take(self, account: str) -> Ticket:
        """A place in the line (the account's existing one if it has one)."""
        line = await self.engine.take_place(account, rate_per_s=self.rate,
                                            window_ms=self.window_ms)
        if line.new:
            self.tickets_issued += 1
        self._learn(line)
        return self.ticket(account, line)

    def _learn(self, line: LineReply) -> None:
        v = self._view
        if v is None or line.issued >= v.issued:
            self._view = LineReply(served=line.served, issued=line.issued, now=line.now)
            self._view_mono = time.monotonic()

    async def refresh(self) -> None:
        self._learn(await self.engine.read_line(rate_per_s=self.rate))

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep this worker's view of the line fresh (one tiny read each period)."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # Redis away: the view ages, served keeps counting
                pass
            try:
                await asyncio.wait_for(stop.wait(), self.refresh_s)
            except TimeoutError:
                pass
