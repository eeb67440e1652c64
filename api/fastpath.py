"""POST /v1/holds served in front of Litestar, when the request is well-formed.

On release morning this one route takes nearly all the traffic, and
Litestar's per-request machinery (request object, kwargs and signature
models, response object, two exception layers) costs more than the decision
itself. This ASGI wrapper reads the headers and the (small) body, checks the
token, decodes ``HoldIn`` with msgspec and calls the same ``decide_hold`` as
the Litestar route. Anything unusual — a missing or bad token, a body that
does not decode or might repeat a key, a bad Idempotency-Key, a content type
other than ``application/json``, a large or streamed body — is handed to
Litestar untouched (the body replayed), so every error answer (and the strict
input rules of ``api.strict``), and the OpenAPI description, come from the one
Litestar route.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import msgspec

from api.auth import Bearer, verified_bearer
from api.errors import error_response
from api.hardening import BodyTimeout
from api.problems import RawResponse
from api.routes.holds import ARRIVED, decide_hold
from api.schemas import IDEMPOTENCY_RE, HoldIn
from api.strict import is_json_media

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

    from api.context import Api

__all__ = ["hold_fastpath"]

_PATH = "/v1/holds"
_MAX_BODY = 4096
_decode = msgspec.json.Decoder(HoldIn).decode


def hold_fastpath(api: Api, app: ASGIApp) -> ASGIApp:
    tokens = api.tokens
    clock = api.clock
    edge_header = api.settings.arrival_header.lower().encode("latin-1") or None

    async def handle(asgi_scope: Scope, receive: Receive, send: Send) -> None:
        scope = cast(dict[str, Any], asgi_scope)
        if scope["type"] != "http" or scope["path"] != _PATH or scope["method"] != "POST":
            await app(asgi_scope, receive, send)
            return
        # The arrival, before anything else (a fair start, shedding by age).
        arrived = clock.now_ms()
        auth = idem = ctype = wticket = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"idempotency-key":
                idem = v
            elif k == b"content-type":
                ctype = v
            elif k == b"x-waiting-ticket":
                wticket = v
            elif k == edge_header:
                at = edge_arrival_ms(v)
                if at is not None:  # the proxy's wall clock, in Redis time
                    arrived = min(arrived, int(at + clock.offset_ms))
        scope[ARRIVED] = arrived
        messages: list[ReceiveMessage] = []
        body = b""
        try:
            while True:
                msg = await receive()
                messages.append(msg)
                if msg["type"] != "http.request":
                    break
                body += msg.get("body", b"")
                if not msg.get("more_body", False) or len(body) > _MAX_BODY:
                    break
        except BodyTimeout as exc:
            await error_response(exc, _PATH).to_asgi_response(None, None)(  # type: ignore[arg-type]
                asgi_scope, receive, send)
            return
        who = _bearer(tokens, auth)
        data = None
        key: str | None = None
        ok = (who is not None and messages[-1]["type"] == "http.request"
              and not messages[-1].get("more_body", False) and is_json_media(ctype)
              # Three string keys, three string values, no escapes: 12 quotes
              # exactly, so no key can be repeated (else Litestar decides).
              and body.count(b'"') == 12 and b"\\" not in body)
        if ok and idem is not None:
            key = idem.decode("latin-1")
            ok = IDEMPOTENCY_RE.fullmatch(key) is not None
        ticket: str | None = None
        if ok and wticket is not None:
            ticket = wticket.decode("latin-1")
            ok = 0 < len(ticket) <= 80  # else Litestar answers the schema's 422
        if ok:
            try:
                data = _decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError):
                data = None
        if data is None or who is None:
            replay = iter(messages)

            async def again() -> ReceiveMessage:
                m = next(replay, None)
                return m if m is not None else await receive()

            await app(asgi_scope, again, send)
            return
        scope["path_template"] = _PATH
        try:
            resp = await decide_hold(api, who, data, key, _PATH, arrived_ms=scope[ARRIVED],
                                     ticket=ticket)
        except Exception as exc:
            resp = error_response(exc, _PATH)
        if not isinstance(resp, RawResponse):  # pragma: no cover - always RawResponse
            raise TypeError("decide_hold must answer a RawResponse")
        await resp.to_asgi_response(None, None)(asgi_scope, receive, send)

    return handle


def edge_arrival_ms(value: bytes) -> float | None:
    """Epoch ms of an edge proxy's arrival stamp: ``t=1700000000.123``
    (nginx ``${msec}``), seconds with a fraction, or whole ms or us; None if
    it is none of these."""
    v = value.strip()
    if v[:2] == b"t=":
        v = v[2:]
    if not v or len(v) > 20 or not v.replace(b".", b"", 1).isdigit():
        return None
    if b"." in v:
        return float(v) * 1000
    n = int(v)
    if n >= 10**15:  # microseconds
        return n / 1000
    if n >= 10**12:  # milliseconds
        return float(n)
    return n * 1000.0  # seconds


def _bearer(tokens: Any, auth: bytes | None) -> Bearer | None:
    if auth is None or len(auth) < 8 or auth[:7].lower() != b"bearer ":
        return None
    return verified_bearer(tokens, auth[7:].strip().decode("latin-1"))
