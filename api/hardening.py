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
  time it is awaited: a client that sends it a byte a second gets a 408
  problem and ``Connection: close``, instead of holding a worker's
  connection for as long as it likes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from api.problems import problem

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

__all__ = ["BodyTimeout", "harden", "send_problem"]

_BAD_PATH = re.compile("[\x00\ud800-\udfff]")
#: An empty Server header: granian adds ``server: granian`` unless the app sends one.
_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
            (b"server", b""))
_NAMES = frozenset(k for k, _ in _HEADERS)


class BodyTimeout(Exception):
    """The request body did not arrive in time (answered 408, connection closed)."""


async def send_problem(scope: Scope, send: Send, kind: str, detail: str,
                       headers: dict[str, str] | None = None) -> None:
    resp = problem(kind, detail, instance=None, headers=headers)

    async def no_body() -> ReceiveMessage:  # pragma: no cover - never read
        return cast("ReceiveMessage", {"type": "http.disconnect"})

    await resp.to_asgi_response(None, None)(scope, no_body, send)  # type: ignore[arg-type]


def harden(body_timeout_s: float) -> Callable[[ASGIApp], ASGIApp]:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            s = cast(dict[str, Any], scope)
            if s["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_hardened(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", ())
                               if k.lower() not in _NAMES]
                    message["headers"] = [*headers, *_HEADERS]
                await send(message)

            if _BAD_PATH.search(s["path"]):
                await send_problem(scope, send_hardened, "not-found", "no such resource")
                return
            query: bytes = s.get("query_string", b"")
            if b"\x00" in query or b"%00" in query:
                await send_problem(scope, send_hardened, "invalid-input",
                                   "a query parameter holds a NUL byte")
                return
            deadline: float | None = None
            complete = False

            async def receive_in_time() -> ReceiveMessage:
                nonlocal deadline, complete
                if complete:  # the body is in: waiting for a disconnect is fine
                    return await receive()
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + body_timeout_s
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout from None
                complete = message["type"] != "http.request" or not message.get("more_body")
                return message

            await app(scope, receive_in_time, send_hardened)

        return handle

    return middleware
