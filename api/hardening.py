"""The ASGI layer every request passes: bytes that must never reach a handler,
response headers, and a deadline on request bodies.

- A path with a NUL byte or an undecodable byte (a lone surrogate) is a 404,
  a query string with a NUL byte a 422: PostgreSQL refuses NUL in text, and
  none of our identifiers contains one.
- Every answer carries ``X-Content-Type-Options: nosniff`` and
  ``Cache-Control: no-store`` (tokens, patient data, holds and bookings must
  not be kept by a browser or a proxy; nothing here is worth caching
  downstream: availability changes by the millisecond), and an empty
  ``Server`` header (no banner: granian adds its own unless the app sends one).
- A request body must arrive within ``Settings.body_timeout_s`` of the first
  time it is awaited (checked every quarter second by ``BodyDeadlines``): a
  client that sends it a byte a second gets a 408 problem and
  ``Connection: close``, instead of holding a worker's connection for as
  long as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from api.problems import problem

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

__all__ = ["BodyDeadlines", "BodyTimeout", "harden", "send_problem"]

_BAD_PATH = re.compile("[\x00\ud800-\udfff]")
#: An empty Server header: granian adds ``server: granian`` unless the app sends one.
_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
            (b"server", b""))
_NAMES = frozenset(k for k, _ in _HEADERS)
_ADDED = list(_HEADERS)
_now = time.monotonic  # the clock of the event loop (BaseEventLoop.time)


class BodyTimeout(Exception):
    """The request body did not arrive in time (answered 408, connection closed)."""


class BodyDeadlines:
    """The deadlines of the request bodies being read in one worker.

    One watcher task (``watch``, started by the app's lifespan) wakes every
    ``tick_s`` and cancels a read that is past its deadline; a request pays a
    dict insert and delete per ``receive()``, not a timer of its own (an
    ``asyncio.timeout`` per read cost more than a sold-out answer).
    """

    def __init__(self, timeout_s: float, tick_s: float = 0.25) -> None:
        self.timeout_s = timeout_s
        self.tick_s = min(tick_s, timeout_s / 4)
        self.reading: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_s)
            now = _now()
            for task, deadline in list(self.reading.items()):
                if deadline <= now and task not in self.expired:
                    self.expired.add(task)
                    task.cancel()


async def send_problem(scope: Scope, send: Send, kind: str, detail: str,
                       headers: dict[str, str] | None = None) -> None:
    resp = problem(kind, detail, instance=None, headers=headers)

    async def no_body() -> ReceiveMessage:  # pragma: no cover - never read
        return cast("ReceiveMessage", {"type": "http.disconnect"})

    await resp.to_asgi_response(None, None)(scope, no_body, send)  # type: ignore[arg-type]


def _bad_path(path: str) -> bool:
    return "\x00" in path if path.isascii() else _BAD_PATH.search(path) is not None


def harden(deadlines: BodyDeadlines) -> Callable[[ASGIApp], ASGIApp]:
    reading, expired = deadlines.reading, deadlines.expired
    current_task = asyncio.current_task

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            s = cast(dict[str, Any], scope)
            if s["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_hardened(message: Message) -> None:
                if message["type"] == "http.response.start":
                    # Our responses name their headers in lower case (Litestar, RawResponse).
                    message["headers"] = [h for h in message.get("headers", ())
                                          if h[0] not in _NAMES] + _ADDED
                await send(message)

            if _bad_path(s["path"]):
                await send_problem(scope, send_hardened, "not-found", "no such resource")
                return
            query: bytes = s.get("query_string", b"")
            if b"%00" in query or b"\x00" in query:
                await send_problem(scope, send_hardened, "invalid-input",
                                   "a query parameter holds a NUL byte")
                return
            deadline = 0.0
            complete = False

            async def receive_in_time() -> ReceiveMessage:
                nonlocal deadline, complete
                if complete:  # the body is in: waiting for a disconnect is fine
                    return await receive()
                task = current_task()
                assert task is not None
                now = _now()
                if not deadline:
                    deadline = now + deadlines.timeout_s
                elif now >= deadline:
                    raise BodyTimeout
                reading[task] = deadline
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if task in expired:
                        expired.discard(task)
                        task.uncancel()
                        raise BodyTimeout from None
                    raise
                finally:
                    reading.pop(task, None)
                complete = message["type"] != "http.request" or not message.get("more_body")
                return message

            await app(scope, receive_in_time, send_hardened)

        return handle

    return middleware
