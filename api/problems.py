"""RFC 9457 problem details: one table from outcome to HTTP status and problem type.

Every error body is ``application/problem+json`` with ``type`` (a stable URI
per reason, ``/problems/<slug>``, documented at that address), ``title``,
``status``, ``detail`` and ``instance`` (the request path), plus extension
members where they help the client: ``server_ms`` (server time),
``release_at_ms`` (not open yet), ``retry_after_ms`` (rate limited, shed),
``refund_due`` (a payment that found no unit).

Engine refusals map through ``REASONS``; HTTP-level failures (auth, invalid
input, load shedding) through ``KINDS``. No message ever echoes an input value.
"""

from __future__ import annotations

import math
import random
from typing import Any, NamedTuple

import msgspec
from litestar import Response

from engine.outcomes import Reason, Refused

__all__ = [
    "KINDS",
    "PROBLEM_MEDIA",
    "REASONS",
    "SECURITY_HEADERS",
    "FieldError",
    "Kind",
    "Problem",
    "ProblemError",
    "json_response",
    "problem",
    "refused",
    "retry_after",
]

PROBLEM_MEDIA = "application/problem+json"
TYPE_BASE = "/problems/"
#: On every answer (here for RawResponse; api.app sets them on Litestar's own):
#: nothing is kept by a browser or proxy (tokens, patient data, holds), no MIME
#: sniffing, and an empty Server header (granian adds its banner unless the app
#: sends one).
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                    (b"server", b""))


class Kind(NamedTuple):
    status: int
    slug: str
    title: str

    @property
    def type(self) -> str:
        return TYPE_BASE + self.slug


def _k(status: int, slug: str, title: str) -> Kind:
    return Kind(status, slug, title)


#: How long a client waits before retrying while a partition is recovering.
RECOVERING_RETRY_MS = 2000.0

#: Engine refusal -> status and problem type (the one table of the API).
REASONS: dict[Reason, Kind] = {
    Reason.NOT_OPEN: _k(409, "not-open", "Booking is not open yet"),
    Reason.SOLD_OUT: _k(409, "sold-out", "Sold out"),
    Reason.SUSPENDED: _k(409, "suspended", "The doctor has stopped this session"),
    Reason.DUPLICATE: _k(409, "duplicate", "This patient already holds or booked that day"),
    Reason.RATE_LIMITED: _k(429, "rate-limited", "Too many requests"),
    Reason.EXPIRED: _k(409, "expired", "The hold expired; the payment is refunded"),
    Reason.NOT_FOUND: _k(404, "not-found", "Not found"),
    Reason.INVALID_STATE: _k(409, "invalid-state", "Not allowed in the current state"),
    Reason.IDEMPOTENCY_MISMATCH: _k(
        422, "idempotency-mismatch", "This Idempotency-Key was used for another request"
    ),
    Reason.CLOSED: _k(409, "closed", "Booking for this session has closed"),
    Reason.CANCEL_DEADLINE: _k(409, "cancel-deadline", "The cancellation deadline has passed"),
    # 403, not 409: the refusal is about who books (the no-show policy), not the
    # session's state; no other slot or session helps before ``until_ms``.
    Reason.BANNED: _k(403, "banned", "This patient is barred from booking for a period"),
    Reason.LIMIT_REACHED: _k(409, "limit-reached", "The patient has reached the limit of bookings"),
    Reason.WAITLIST_FULL: _k(409, "waitlist-full", "The waitlist of this session is full"),
    # 503 with Retry-After: Redis lost state and `haoyuan rebuild` is putting
    # it back; nothing was decided, and the same request will work shortly.
    Reason.RECOVERING: _k(503, "recovering", "Sales are closed while the engine recovers"),
    # 暂停放号: the hospital paused sales (bookings stand); they reopen later.
    Reason.PAUSED: _k(409, "paused", "Sales of this session are paused"),
}

#: HTTP-level problems.
KINDS: dict[str, Kind] = {
    k.slug: k
    for k in (
        _k(401, "unauthorized", "Authentication required"),
        _k(401, "bad-signature", "The payment callback signature is missing, stale or wrong"),
        _k(401, "invalid-login-code", "The login code was refused"),
        _k(403, "forbidden", "Forbidden"),
        _k(404, "not-found", "Not found"),
        _k(405, "method-not-allowed", "Method not allowed"),
        _k(409, "patient-limit", "The account binds the maximum number of patients"),
        _k(409, "units-free", "Units are free: hold one instead of joining the waitlist"),
        _k(409, "schedule-conflict", "A session cannot move to another department, doctor or date"),
        _k(409, "payment-reused",
           "This payment reference already paid for another hold; this payment is refunded"),
        _k(409, "already-paid",
           "The hold was paid with another payment reference; this payment is refunded"),
        _k(408, "request-timeout", "The request body did not arrive in time"),
        _k(413, "too-large", "Request body too large"),
        _k(415, "unsupported-media-type", "Unsupported media type"),
        _k(422, "invalid-input", "Invalid input"),
        _k(422, "invalid-national-id", "Invalid national ID number"),
        _k(422, "invalid-phone", "Invalid phone number"),
        _k(422, "amount-mismatch", "The paid amount differs from the fee"),
        _k(429, "overloaded", "Too busy; retry shortly"),
        _k(429, "waiting-room", "You are in the waiting room: come back with your ticket"),
        _k(403, "patient-unverified", "The patient's real-name binding is not verified"),
        _k(403, "not-revocable",
           "Only a binding verified as the patient may revoke another verified binding"),
        _k(403, "role-required", "Your staff role does not allow this"),
        _k(409, "id-account-limit", "This ID number is bound to the maximum number of accounts"),
        _k(429, "too-many-attempts",
           "Too many failed attempts or new accounts from this address; retry later"),
        _k(500, "internal", "Internal error"),
        _k(502, "upstream", "An upstream service answered badly"),
        _k(503, "unavailable", "A backing service is unavailable"),
        _k(503, "not-ready", "Not ready"),
        *REASONS.values(),
    )
}


class FieldError(msgspec.Struct, frozen=True, omit_defaults=True):
    message: str
    key: str | None = None
    source: str | None = None


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details, with haoyuan's extension members."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    server_ms: int | None = None
    release_at_ms: int | None = None
    retry_after_ms: int | None = None
    cutoff_ms: int | None = None
    deadline_ms: int | None = None
    until_ms: int | None = None
    refund_due: bool | None = None
    #: The waiting room (api.waiting): the ticket to send back in
    #: X-Waiting-Ticket, the place in the line and how many are ahead.
    ticket: str | None = None
    position: int | None = None
    ahead: int | None = None
    errors: list[FieldError] | None = None


_encode = msgspec.json.Encoder().encode


class RawResponse(Response[Any]):
    """An already-encoded JSON answer that skips Litestar's response machinery.

    Litestar's ``Response`` builds a header container, then an ``ASGIResponse``,
    on every request: more than the whole sold-out answer costs. The hot
    path's bodies are encoded once by msgspec; this sends them as two ASGI
    messages. Route-level headers and cookies do not apply (none are used).
    """

    __slots__ = ("_raw",)

    def __init__(self, body: bytes, status_code: int, media_type: str,
                 headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.content = body
        self.media_type = media_type
        raw = [(b"content-type", media_type.encode()),
               (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]
        if headers:
            raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._raw = _RawASGI(status_code, raw, body)

    def to_asgi_response(self, app: Any, request: Any, **_: Any) -> Any:
        return self._raw


class _RawASGI:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def problem(
    kind: Kind | str,
    detail: str | None = None,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **ext: Any,
) -> Response[Any]:
    """A problem response of one kind (a ``Kind`` or a slug of ``KINDS``)."""
    k = KINDS[kind] if isinstance(kind, str) else kind
    body = Problem(type=k.type, title=k.title, status=k.status, detail=detail,
                   instance=instance, **ext)
    return RawResponse(_encode(body), k.status, PROBLEM_MEDIA, headers)


def retry_after(
    base_ms: float, low: float = 0.5, high: float = 1.5
) -> tuple[int, dict[str, str]]:
    """A jittered wait (``low`` to ``high`` times ``base_ms``) and its Retry-After header.

    The header holds whole seconds (at least 1); the exact wait goes in the
    body's ``retry_after_ms`` so clients can spread their retries finer.
    """
    ms = max(1, int(base_ms * random.uniform(low, high)))
    return ms, {"Retry-After": str(max(1, math.ceil(ms / 1000)))}


def refused(r: Refused, instance: str | None = None) -> Response[Any]:
    """An engine refusal as a problem response."""
    k = REASONS.get(r.reason) or Kind(409, str(r.reason), r.message or str(r.reason))
    headers = None
    retry_ms = None
    if r.reason is Reason.RATE_LIMITED:
        # Never earlier than the limiter allows: jitter upwards only.
        retry_ms, headers = retry_after(float(r.retry_after_ms or 1000), 1.0, 1.5)
    elif r.reason is Reason.RECOVERING:
        retry_ms, headers = retry_after(RECOVERING_RETRY_MS)
    return problem(
        k,
        r.message or None,
        instance=instance,
        headers=headers,
        server_ms=r.server_ms or None,
        release_at_ms=r.release_at_ms,
        retry_after_ms=retry_ms,
        cutoff_ms=r.cutoff_ms,
        deadline_ms=r.deadline_ms,
        until_ms=r.until_ms,
        refund_due=True if r.refund_due else None,
    )


def json_response(
    body: bytes, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response[Any]:
    """Already-encoded JSON (the documented type is the handler's annotation)."""
    return RawResponse(body, status_code, "application/json", headers)


class ProblemError(Exception):
    """Raise to answer with a problem (outside the hot path)."""

    def __init__(self, response: Response[Any]) -> None:
        super().__init__(response.status_code)
        self.response = response

    @classmethod
    def of(cls, kind: Kind | str, detail: str | None = None, **kw: Any) -> ProblemError:
        return cls(problem(kind, detail, **kw))
