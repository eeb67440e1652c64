"""The OpenAPI description of the facade: a complete example for an
embedding backend (search, hold, book, cancel), the same flow as
``examples/fhir_backend.py`` (run by a test)."""

from __future__ import annotations

from typing import Any

from litestar.openapi.spec import Tag

__all__ = ["FHIR_EXAMPLE", "FHIR_TAG"]

FHIR_EXAMPLE = """\
FHIR R4 scheduling facade for other backends (answers `application/fhir+json`;
every error an OperationOutcome whose `issue[0].details.coding[0]` is
`urn:haoyuan:outcome|<code>`: `sold-out`, `not-open`, `rate-limited`,
`duplicate`, `expired`, `recovering`, ... — the /v1 problem types). Get a
token with `haoyuan fhir-client add my-backend --scopes system/Slot.read
system/Appointment.read system/Appointment.write` and send it as
`Authorization: Bearer hyf_...`.

**1. Search free slots** (live from the engine; `busy` = sold out,
`busy-unavailable` = not open yet (extension `urn:haoyuan:release-at`),
closed or suspended):

    GET /fhir/r4/Slot?status=free&start=ge2026-12-10&start=lt2026-12-11
        &service-type=CARDIO&_count=20

**2. Hold one** for a patient named by the resident ID number (the server
hashes it; with the default client identity `verify`, name and phone go to
the real-name authority). `If-None-Exist` makes a retry answer the first hold:

    POST /fhir/r4/Appointment/$hold
    Content-Type: application/fhir+json
    If-None-Exist: identifier=https://my-backend.example/request|r-123

    {"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": {
      "resourceType": "Appointment", "status": "proposed",
      "contained": [{"resourceType": "Patient", "id": "p",
        "identifier": [{"system": "urn:haoyuan:national-id", "value": "11010519491231002X"}],
        "name": [{"text": "张三"}], "telecom": [{"system": "phone", "value": "13812345678"}]}],
      "slot": [{"reference": "Slot/CARDIO--DR-uLI--20261210--AM.0800"}],
      "participant": [{"actor": {"reference": "#p"}, "status": "accepted"}]}}]}

    200 Expires: Thu, 10 Dec 2026 00:10:00 GMT
    {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {
      "resourceType": "Appointment", "id": "17.CARDIO--DR-uLI--20261210--AM.1765...",
      "status": "pending", "extension": [{"url": "urn:haoyuan:hold-expires", ...}], ...}}]}

**3. Book it** once paid (a payment reference books one hold, ever):

    POST /fhir/r4/Appointment/$book
    {"resourceType": "Parameters", "parameter": [
      {"name": "appt-id", "valueUri": "Appointment/17.CARDIO--DR-uLI--20261210--AM.1765..."},
      {"name": "payment-reference", "valueString": "pay-8812"},
      {"name": "payment-amount", "valueMoney": {"value": 50.00, "currency": "CNY"}}]}

    201 {"resourceType": "Bundle", ... "status": "booked" ...}

**4. Cancel** (a hold is released, a booking cancelled before the deadline):

    PATCH /fhir/r4/Appointment/17.CARDIO--DR-uLI--20261210--AM.1765...
    Content-Type: application/json-patch+json

    [{"op": "replace", "path": "/status", "value": "cancelled"}]

Refused, e.g. sold out: `409` with
`{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code":
"business-rule", "details": {"coding": [{"system": "urn:haoyuan:outcome",
"code": "sold-out"}]}}]}`. Aggregators read the public SMART Scheduling Links
manifest `GET /fhir/r4/$bulk-publish`.
"""

FHIR_TAG = Tag(name="fhir", description=FHIR_EXAMPLE)


def _schema_object(required: list[str] | None = None) -> Any:
    from litestar.openapi.spec import OpenAPIType, Schema

    return Schema(type=OpenAPIType.OBJECT, required=required,
                  properties={"resourceType": Schema(type=OpenAPIType.STRING)})


_ERRORS = {401: "Not authenticated (a FHIR client token is required)",
           403: "The client's scopes, or the patient's verification, do not allow this",
           404: "Not found (or not the client's)", 405: "Method not allowed",
           408: "The request body did not arrive in time", 409: "Refused in the current"
           " state: sold-out, not-open, duplicate, expired, payment-reused, ...",
           413: "Request body too large", 415: "The body is not application/fhir+json",
           422: "Invalid input, or a patient that cannot be resolved",
           429: "Rate limited or shed; see Retry-After",
           503: "Recovering or a backing service is unavailable; see Retry-After"}


def finish_fhir(openapi: Any) -> Any:
    """The facade's operations answer FHIR: ``application/fhir+json`` (the
    manifest ``application/json``, bulk files ``application/fhir+ndjson``)
    and every error an OperationOutcome; bodies are FHIR resources."""
    from litestar.openapi.spec import (
        OpenAPIMediaType,
        OpenAPIResponse,
        OpenAPIType,
        RequestBody,
        Schema,
    )

    outcome = OpenAPIMediaType(schema=_schema_object(["resourceType", "issue"]))
    for path, item in (openapi.paths or {}).items():
        if not path.startswith("/fhir/"):
            continue
        for method in ("get", "put", "post", "delete", "patch"):
            op = getattr(item, method, None)
            if op is None:
                continue
            public = path.endswith(("/metadata", "/$bulk-publish")) or "/bulk/" in path
            if path.endswith("/$bulk-publish"):
                ok = {"application/json": OpenAPIMediaType(schema=Schema(
                    type=OpenAPIType.OBJECT, required=["transactionTime", "request", "output"]))}
            elif "/bulk/" in path:
                ok = {"application/fhir+ndjson": OpenAPIMediaType(schema=Schema(
                    type=OpenAPIType.STRING))}
            else:
                ok = {"application/fhir+json": OpenAPIMediaType(schema=_schema_object(
                    ["resourceType"]))}
            success = [c for c in op.responses if c.startswith("2")] or ["200"]
            if path.endswith("$book"):
                success = ["200", "201"]
            responses: dict[str, Any] = {
                c: OpenAPIResponse(description="A FHIR answer" if c != "201" else
                                   "Booked (200: a replay)", content=ok) for c in success}
            if public and method == "get" and path != "/fhir/r4/metadata":
                responses["304"] = OpenAPIResponse(description="Not modified (If-None-Match)")
            codes = {404, 405, 422, 503} if public else {401, 403, 404, 405, 409, 422, 429, 503}
            if method in ("post", "put", "patch"):
                codes |= {408, 413, 415}
                media = "application/json-patch+json" if method == "patch" \
                    else "application/fhir+json"
                schema = Schema(type=OpenAPIType.ARRAY) if method == "patch" \
                    else _schema_object(["resourceType"])
                op.request_body = RequestBody(content={media: OpenAPIMediaType(schema=schema)},
                                              required=True)
            for c in sorted(codes):
                responses[str(c)] = OpenAPIResponse(description=_ERRORS[c],
                                                    content={"application/fhir+json": outcome})
            op.responses = responses
    return openapi
