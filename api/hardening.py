"""The ASGI layer every request passes: bytes that must never reach a handler,
and a deadline on request bodies.

- A path with a NUL byte or an undecodable byte (a lone surrogate) is a 404,
  a query string with a NUL byte a 422: PostgreSQL refuses NUL in text, and
  none of our identifiers contains one.
- (The security headers of every answer are set where answers are made:
  ``api.problems.SECURITY_HEADERS``; a wrapper around ``send`` cost more
  than a sold-out answer's budget allows.)
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
    from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

__all__ = ["BodyDeadlines", "BodyTimeout", "harden", "send_problem"]

_BAD_PATH = re.compile("[\x00\ud800-\udfff]")
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
    if cast(dict[str, Any], scope).get("path", "").startswith("/fhir/"):
        from api.fhir.outcomes import as_outcome

        resp = as_outcome(resp)

    async def no_body() -> ReceiveMessage:  # pragma: no cover - never read
        return cast("ReceiveMessage", {"type": "http.disconnect"})

    await resp.to_asgi_response(None, None)(scope, no_body, send)  # type: ignore[arg-type]


def harden(deadlines: BodyDeadlines) -> Callable[[ASGIApp], ASGIApp]:
    reading, expired = deadlines.reading, deadlines.expired
    current_task = asyncio.current_task

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            s = cast(dict[str, Any], scope)
            if s["type"] != "http":
                await app(scope, receive, send)
                return

            path: str = s["path"]
            if "\x00" in path if path.isascii() else _BAD_PATH.search(path) is not None:
                await send_problem(scope, send, "not-found", "no such resource")
                return
            query: bytes = s.get("query_string", b"")
            if b"%00" in query or b"\x00" in query:
                await send_problem(scope, send, "invalid-input",
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

            await app(scope, receive_in_time, send)

        return handle

    return middleware
