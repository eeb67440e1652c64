"""Structured JSON logs with a request id, and the per-request middleware.

Every log line is one JSON object with ``request_id`` (taken from a sane
``X-Request-ID`` header or made up, and echoed in the response) and passes
``engine.pii.redact`` last, so an ID number or mobile number that slipped
into a value is masked. Bodies and query strings are never logged; the access
line names the route template (``/v1/holds/{hold_id:str}``), not the path.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from itertools import count
from typing import TYPE_CHECKING, Any

import structlog
from litestar.enums import ScopeType
from structlog.contextvars import bind_contextvars, reset_contextvars

from engine.pii import RedactingFilter, redact_processor

if TYPE_CHECKING:
    from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

    from api.metrics import Metrics

__all__ = ["configure_logging", "request_context"]

_RID_RE = re.compile(rb"[A-Za-z0-9._-]{8,64}")
_configured = False


class _StdoutLogger:
    """Writes each line to the current ``sys.stdout`` (test runners swap it)."""

    def msg(self, message: str) -> None:
        sys.stdout.write(message + "\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stdout_logger(*_: Any) -> _StdoutLogger:
    return _StdoutLogger()


def configure_logging(level: str = "info") -> None:
    """structlog -> JSON lines on stdout, redacted; stdlib logging redacted too. Idempotent."""
    global _configured
    lvl = getattr(logging, level.upper(), logging.INFO)
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(RedactingFilter())
        root = logging.getLogger()
        root.addHandler(handler)
        _configured = True
    logging.getLogger().setLevel(max(lvl, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )


def request_context(metrics: Metrics, access_log: bool) -> Any:
    """An ASGI middleware factory: request id, latency histogram, access log line."""
    log = structlog.get_logger("haoyuan.access")
    prefix = f"{os.getpid():x}-{int(time.time()):x}-"
    seq = count()
    perf = time.perf_counter

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(any_scope: Scope, receive: Receive, send: Send) -> None:
            if any_scope["type"] != ScopeType.HTTP:
                await app(any_scope, receive, send)
                return
            scope: HTTPScope = any_scope
            t0 = perf()
            rid: str | None = None
            for k, v in scope["headers"]:
                if k == b"x-request-id":
                    if _RID_RE.fullmatch(v):
                        rid = v.decode()
                    break
            if rid is None:
                rid = prefix + format(next(seq), "x")
            status = 500
            rid_header = (b"x-request-id", rid.encode())

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", ()), rid_header]
                await send(message)

            tokens = bind_contextvars(request_id=rid)
            try:
                await app(scope, receive, send_wrapper)
            finally:
                reset_contextvars(**tokens)
                route = scope.get("path_template") or "unmatched"
                elapsed = perf() - t0
                metrics.request(route, scope["method"], status, elapsed)
                if access_log:
                    log.info("request", request_id=rid, method=scope["method"], route=route,
                             status=status, ms=round(elapsed * 1000, 2))

        return handle

    return middleware
