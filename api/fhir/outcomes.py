"""Every refusal of the FHIR facade as an OperationOutcome (``application/fhir+json``).

The facade answers with the same HTTP status as /v1 and the same stable
code: ``issue[0].details.coding[0]`` is ``urn:haoyuan:outcome|<slug>``,
where ``<slug>`` is the /v1 problem type's (``sold-out``, ``not-open``,
``rate-limited``, ``duplicate``, ``expired``, ``recovering``, ...; each
explained at ``/problems/<slug>``). ``issue[0].code`` is FHIR's IssueType:

- ``business-rule`` (409): sold-out, not-open, closed, suspended, expired,
  cancel-deadline, limit-reached, invalid-state; banned (403);
  amount-mismatch (422);
- ``duplicate`` (409): duplicate, payment-reused, already-paid;
- ``throttled`` (429, Retry-After): rate-limited, overloaded, too-many-attempts;
- ``transient`` (503, Retry-After): recovering, unavailable;
- ``not-found`` (404); ``login`` (401): unauthorized;
- ``forbidden`` (403): forbidden, scope-required, patient-unverified;
- ``invalid`` / ``value`` (422): invalid-input, invalid-national-id,
  patient-unresolved; ``too-costly`` (422): a search too wide.

Extension members of a problem become the issue's ``diagnostics``; the
release instant of ``not-open`` is also the issue's extension
``urn:haoyuan:release-at`` (valueInstant). ``as_outcome`` turns any problem
response (Litestar's own errors under ``/fhir`` included, see
``api.errors``) into its OperationOutcome, headers (Retry-After, Allow,
WWW-Authenticate) kept.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response

from api.problems import REASONS, Kind, Problem, RawResponse, problem, refused
from engine.outcomes import Refused
from engine.scheduling import resources as fhir

__all__ = ["FHIR_JSON", "ISSUE_TYPES", "OutcomeError", "as_outcome", "fhir_response",
           "outcome", "refused_outcome"]

FHIR_JSON = "application/fhir+json"
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Problem).decode

#: Our code -> FHIR IssueType (anything else: ``processing``).
ISSUE_TYPES: dict[str, str] = {
    "sold-out": "business-rule", "not-open": "business-rule", "closed": "business-rule",
    "suspended": "business-rule", "expired": "business-rule", "banned": "business-rule",
    "paused": "business-rule", "waiting-room": "throttled",
    "cancel-deadline": "business-rule", "limit-reached": "business-rule",
    "invalid-state": "business-rule", "waitlist-full": "business-rule",
    "amount-mismatch": "business-rule", "idempotency-mismatch": "conflict",
    "duplicate": "duplicate", "payment-reused": "duplicate", "already-paid": "duplicate",
    "rate-limited": "throttled", "overloaded": "throttled", "too-many-attempts": "throttled",
    "recovering": "transient", "unavailable": "transient", "not-ready": "transient",
    "not-found": "not-found", "unauthorized": "login", "forbidden": "forbidden",
    "scope-required": "forbidden", "patient-unverified": "forbidden",
    "invalid-input": "invalid", "invalid-national-id": "value", "patient-unresolved": "value",
    "unsupported-media-type": "not-supported", "method-not-allowed": "not-supported",
    "too-large": "too-long", "request-timeout": "timeout", "too-costly": "too-costly",
    "internal": "exception", "upstream": "exception",
}

#: Problem kinds of the facade only (the rest are api.problems.KINDS).
FACADE_KINDS: dict[str, Kind] = {
    "scope-required": Kind(403, "scope-required", "The client's scopes do not allow this"),
    "patient-unresolved": Kind(422, "patient-unresolved",
                               "The patient could not be resolved from what was sent"),
    "too-costly": Kind(422, "too-costly", "The search asks for too much at once"),
}

_HEADERS_KEPT = (b"retry-after", b"allow", b"www-authenticate", b"connection", b"location",
                 b"expires")


def fhir_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> Response[Any]:
    return RawResponse(_encode(body), status, FHIR_JSON, headers)


def _diagnostics(p: Problem) -> str | None:
    parts = [f"{k}={v}" for k, v in (
        ("server_ms", p.server_ms), ("release_at_ms", p.release_at_ms),
        ("retry_after_ms", p.retry_after_ms), ("cutoff_ms", p.cutoff_ms),
        ("deadline_ms", p.deadline_ms), ("until_ms", p.until_ms),
        ("refund_due", p.refund_due)) if v is not None]
    for e in p.errors or ():
        parts.append(f"{e.source or ''}{':' if e.source else ''}{e.key or ''} {e.message}".strip())
    return "; ".join(parts)[:1000] or None


def as_outcome(resp: Response[Any]) -> Response[Any]:
    """The OperationOutcome of a problem response (same status, headers kept)."""
    try:
        p = _decode(resp.content if isinstance(resp.content, bytes) else b"")
    except msgspec.DecodeError:
        p = Problem(type="/problems/internal", title="Internal error", status=500)
    slug = p.type.rsplit("/", 1)[-1]
    body = fhir.operation_outcome(ISSUE_TYPES.get(slug, "processing"), slug,
                                  p.detail or p.title, diagnostics=_diagnostics(p))
    if p.release_at_ms is not None:
        body["issue"][0]["extension"] = [{"url": fhir.EXT_RELEASE_AT,
                                          "valueInstant": fhir.ms_instant(p.release_at_ms)}]
    headers: dict[str, str] = {}
    raw = getattr(resp, "_raw", None)
    for k, v in (raw.headers if raw is not None else []):
        if k in _HEADERS_KEPT:
            headers[k.decode("latin-1")] = v.decode("latin-1")
    return fhir_response(body, p.status, headers or None)


def outcome(kind: str, detail: str | None = None, *, headers: dict[str, str] | None = None,
            **ext: Any) -> Response[Any]:
    """An OperationOutcome of one kind (``api.problems.KINDS`` or the facade's own)."""
    k: Kind | str = FACADE_KINDS.get(kind) or kind
    return as_outcome(problem(k, detail, headers=headers, **ext))


def refused_outcome(r: Refused) -> Response[Any]:
    """An engine refusal, as /v1 answers it (status, Retry-After), in FHIR."""
    assert r.reason in REASONS
    return as_outcome(refused(r))


class OutcomeError(Exception):
    """Raise to answer with an OperationOutcome."""

    def __init__(self, response: Response[Any]) -> None:
        super().__init__(response.status_code)
        self.response = response

    @classmethod
    def of(cls, kind: str, detail: str | None = None, **kw: Any) -> OutcomeError:
        return cls(outcome(kind, detail, **kw))
