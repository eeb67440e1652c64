"""Strict JSON bodies: what the OpenAPI document promises, before anything runs.

Litestar decodes a body to plain values and then converts them leniently
(``"3000"`` becomes 3000), keeps the last of duplicate keys, recurses as deep
as the body nests (a ``RecursionError`` at about 1,000 levels) and ignores
the Content-Type. ``StrictRequest.json`` answers, before the handler:

- 415 ``unsupported-media-type`` unless the Content-Type is ``application/json``;
- 422 ``invalid-input`` for JSON nested deeper than ``MAX_DEPTH`` (counted
  on the raw bytes, before any decoding), for duplicate keys, and for any
  value of the wrong type (msgspec's strict decoding into the handler's
  ``data`` type: no string for a number, no 5000.0 for an integer).

The hot path (``api.fastpath``) hands anything it cannot vouch for to the
Litestar route, so it is held to the same rules.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
from litestar import Request
from litestar.types import Empty

from api.problems import FieldError, ProblemError

__all__ = ["MAX_DEPTH", "StrictRequest", "is_json_media", "json_depth_ok"]

#: Our schemas nest 4 levels at most; rules documents a few more.
MAX_DEPTH = 32
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")
#: One strict decoder per data type (keyed by the type: handlers come and go).
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def json_depth_ok(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``body`` nests arrays and objects at most ``limit`` deep (strings skipped)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return True
    depth = 0
    for m in _TOKENS.finditer(body):
        if m.end() - m.start() != 1:
            continue  # a string
        if body[m.start()] in _OPEN:
            depth += 1
            if depth > limit:
                return False
        else:
            depth -= 1
    return True


def is_json_media(content_type: str | bytes | None) -> bool:
    """``application/json``, with or without parameters (``; charset=utf-8``)."""
    if content_type is None:
        return False
    if content_type == b"application/json" or content_type == "application/json":
        return True
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate
    return out


class _Duplicate(ValueError):
    pass


def _invalid(request: Request[Any, Any, Any], detail: str,
             errors: list[FieldError] | None = None) -> ProblemError:
    return ProblemError.of("invalid-input", detail, instance=request.scope["path"],
                           errors=errors)


def strict_json(request: Request[Any, Any, Any], body: bytes) -> Any:
    """The body's plain JSON value, or a ProblemError (415 or 422)."""
    if not is_json_media(request.headers.get("content-type")):
        raise ProblemError.of("unsupported-media-type", "send the body as application/json",
                              instance=request.scope["path"])
    if not json_depth_ok(body):
        raise _invalid(request, f"JSON nested deeper than {MAX_DEPTH} levels")
    field = request.route_handler.parsed_data_field
    if field is not None:
        decoder = _decoders.get(field.raw)
        if decoder is None:
            decoder = _decoders[field.raw] = msgspec.json.Decoder(field.raw, strict=True)
        try:
            decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise _invalid(request, "the request does not match the API's schema",
                           [FieldError(str(exc)[:200], source="body")]) from None
        except msgspec.DecodeError:
            raise _invalid(request, "the request body is malformed") from None
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except _Duplicate:
        raise _invalid(request, "the request body repeats a key") from None
    except (ValueError, RecursionError):
        raise _invalid(request, "the request body is malformed") from None


class StrictRequest(Request[Any, Any, Any]):
    """Litestar's request whose ``json()`` holds bodies to ``strict_json``."""

    async def json(self) -> Any:
        if self._json is Empty and self._connection_state.json is Empty:
            value = strict_json(self, await self.body())
            self._json = self._connection_state.json = value
        return await super().json()

