"""Exceptions to problems: Litestar's HTTP errors, backing-service failures, bugs.

- Litestar's validation errors (400) are answered 422 ``invalid-input`` with
  the field errors (messages from msgspec never echo the value).
- Routing and size errors keep their status (404, 405 with Allow, 413).
- Redis or PostgreSQL unreachable, timing out or busy: 503 ``unavailable``
  with a jittered Retry-After.
- A body that did not arrive in time: 408 (``api.hardening``); a value that
  PostgreSQL refuses as data (out of range, NUL in text): 422.
- Anything else is a bug: logged (redacted, with the traceback) and answered
  as a 500 problem without details.

Under ``/fhir/`` each of these answers is the problem's OperationOutcome
(``api.fhir.outcomes.as_outcome``): the facade speaks FHIR, /v1 RFC 9457.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.hardening import BodyTimeout
from api.problems import FieldError, ProblemError, problem, retry_after
from engine.scripts import ScriptError

__all__ = ["error_response", "is_unavailable", "on_error", "on_http", "on_problem"]

log = structlog.get_logger("haoyuan.api")

_STATUS_KINDS = {401: "unauthorized", 403: "forbidden", 404: "not-found",
                 405: "method-not-allowed", 413: "too-large", 415: "unsupported-media-type",
                 429: "overloaded", 503: "unavailable"}
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                asyncpg.TooManyConnectionsError, ConnectionError, TimeoutError, OSError)
_BUSY = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
#: SQLSTATE class 22 (data exception: numeric or datetime out of range, NUL in
#: text, ...) and text that cannot be encoded (lone surrogates).
_BAD_INPUT = (asyncpg.DataError, UnicodeEncodeError)


def _path(request: Request[Any, Any, Any]) -> str:
    path: str = request.scope.get("path", "")
    return path


def _fhir(path: str, resp: Response[Any]) -> Response[Any]:
    if not path.startswith("/fhir/"):
        return resp
    from api.fhir.outcomes import as_outcome

    return as_outcome(resp)


def on_problem(request: Request[Any, Any, Any], exc: ProblemError) -> Response[Any]:
    return _fhir(_path(request), exc.response)


def on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _fhir(_path(request), _on_http(request, exc))


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    path = _path(request)
    code = exc.status_code
    if code == 400 or isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        errs = [
            FieldError(str(e.get("message", ""))[:200], _opt(e.get("key")), _opt(e.get("source")))
            for e in extra[:20] if isinstance(e, dict)
        ]
        # Litestar's detail repeats the query string: never echo input.
        detail = "the request does not match the API's schema" if errs else (
            "the request body is malformed")
        return problem("invalid-input", detail, instance=path, errors=errs or None)
    kind = _STATUS_KINDS.get(code)
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"} or None
    if kind is None:
        kind = "invalid-input" if 400 <= code < 500 else "internal"
    if kind == "overloaded":
        ms, headers = retry_after(1000)
        return problem(kind, instance=path, headers=headers, retry_after_ms=ms)
    return problem(kind, str(exc.detail)[:200] if code < 500 else None, instance=path,
                   headers=headers)


def _opt(v: Any) -> str | None:
    return None if v is None else str(v)[:100]


def is_unavailable(exc: BaseException) -> bool:
    """Redis or PostgreSQL unreachable, timing out, loading or failing over."""
    return isinstance(exc, _UNAVAILABLE) or (isinstance(exc, RedisError)
                                             and str(exc).startswith(_BUSY))


def error_response(exc: Exception, path: str) -> Response[Any]:
    """The problem for an exception raised while deciding (not an HTTP error)."""
    if isinstance(exc, ProblemError):
        return exc.response
    if isinstance(exc, BodyTimeout):
        return problem("request-timeout", "the request body did not arrive in time",
                       instance=path, headers={"Connection": "close"})
    if isinstance(exc, _BAD_INPUT):
        # A value PostgreSQL cannot store (out of range, NUL in text) that
        # validation let through: bad input, and its transaction rolled back.
        log.warning("input_refused_by_store", error=type(exc).__name__, route=path)
        return problem("invalid-input", "a value is out of range or malformed", instance=path)
    if isinstance(exc, ScriptError):
        return problem("invalid-input", str(exc)[:200], instance=path)
    if is_unavailable(exc):
        log.warning("backing_service_unavailable", error=type(exc).__name__, route=path)
        ms, headers = retry_after(1000)
        return problem("unavailable", "a backing service is unavailable; retry later",
                       instance=path, headers=headers, retry_after_ms=ms)
    log.error("unhandled_error", error=type(exc).__name__, route=path, exc_info=exc)
    return problem("internal", instance=path)


def on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    path = _path(request)
    return _fhir(path, error_response(exc, path))
