"""The OpenAPI description of the facade: a complete example for an
embedding backend (search, hold, book, cancel), the same flow as
``examples/fhir_backend.py`` (run by a test)."""

from __future__ import annotations

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
