"""Helpers for the FHIR facade's tests: clients, request bodies, and validation
of every resource with fhir.resources (R4B, wire-compatible with R4 for these
resources); FHIR's code values, which fhir.resources does not check, are
checked here."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
from fhir.resources.R4B import get_fhir_model_class

from engine.scheduling import ids
from engine.store import fhir_clients

FHIR = "application/fhir+json"
ALL_SCOPES = ("system/Slot.read", "system/Appointment.read", "system/Appointment.write")
_CODES = {
    ("Slot", "status"): {"busy", "free", "busy-unavailable", "busy-tentative",
                         "entered-in-error"},
    ("Appointment", "status"): {"proposed", "pending", "booked", "arrived", "fulfilled",
                                "cancelled", "noshow", "entered-in-error", "checked-in",
                                "waitlist"},
    ("Bundle", "type"): {"searchset"},
}
_ISSUE_TYPES = {"invalid", "structure", "required", "value", "invariant", "security", "login",
                "unknown", "expired", "forbidden", "suppressed", "processing", "not-supported",
                "duplicate", "multiple-matches", "not-found", "deleted", "too-long",
                "code-invalid", "extension", "too-costly", "business-rule", "conflict",
                "transient", "lock-error", "no-store", "exception", "timeout", "incomplete",
                "throttled", "informational"}


def validate(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource validated by fhir.resources (R4B), with its codes checked."""
    rt = resource["resourceType"]
    get_fhir_model_class(rt).model_validate(resource)
    for (t, field), allowed in _CODES.items():
        if t == rt:
            assert resource[field] in allowed, (rt, field, resource[field])
    if rt == "OperationOutcome":
        for issue in resource["issue"]:
            assert issue["code"] in _ISSUE_TYPES, issue
            assert issue["details"]["coding"][0]["system"] == "urn:haoyuan:outcome"
    for e in resource.get("entry", []):
        validate(e["resource"])
    return resource


def fhir_json(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR), r.headers
    body: dict[str, Any] = r.json()
    return validate(body)


def outcome(r: httpx.Response, status: int, code: str, issue: str | None = None) -> dict[str, Any]:
    """An OperationOutcome answer with our stable code (and FHIR's IssueType)."""
    body = fhir_json(r, status)
    assert body["resourceType"] == "OperationOutcome", body
    got = body["issue"][0]
    assert got["details"]["coding"][0]["code"] == code, body
    if issue is not None:
        assert got["code"] == issue, body
    return body


async def add_client(dsn: str, name: str, scopes: tuple[str, ...] = ALL_SCOPES, *,
                     identity: fhir_clients.Identity = "trusted", rate_per_s: float = 0.0,
                     burst: int = 100) -> dict[str, str]:
    """A FHIR client's Authorization header (quota off unless asked for)."""
    conn = await asyncpg.connect(dsn)
    try:
        _, token = await fhir_clients.add_client(conn, name, scopes, "test", identity=identity,
                                                 rate_per_s=rate_per_s, burst=burst)
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {token}"}


def patient(national_id: str, *, name: str = "张三", phone: str = "13812345678",
            pid: str = "p") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid,
            "identifier": [{"system": "urn:haoyuan:national-id", "value": national_id}],
            "name": [{"text": name}], "telecom": [{"system": "phone", "value": phone}]}


def hold_body(session_id: str, slot_id: str, national_id: str, **kw: Any) -> dict[str, Any]:
    """$hold Parameters: an Appointment of the slot with a contained Patient."""
    appt = {"resourceType": "Appointment", "status": "proposed",
            "contained": [patient(national_id, **kw)],
            "slot": [{"reference": f"Slot/{ids.slot_id(session_id, slot_id)}"}],
            "participant": [{"actor": {"reference": "#p"}, "status": "accepted"}]}
    return {"resourceType": "Parameters",
            "parameter": [{"name": "appt-resource", "resource": validate(appt)}]}


def book_body(appt_id: str, payment_ref: str, amount_yuan: float | None = None
              ) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "appt-id", "valueUri": f"Appointment/{appt_id}"},
        {"name": "payment-reference", "valueString": payment_ref}]
    if amount_yuan is not None:
        params.append({"name": "payment-amount",
                       "valueMoney": {"value": amount_yuan, "currency": "CNY"}})
    return validate({"resourceType": "Parameters", "parameter": params})


def headers(auth: dict[str, str], **extra: str) -> dict[str, str]:
    return {**auth, "Content-Type": FHIR, **extra}


def appointment_of(bundle: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = bundle["entry"][0]["resource"]
    assert entry["resourceType"] == "Appointment"
    return entry


def ext(resource: dict[str, Any], url: str) -> Any:
    for e in resource.get("extension", []):
        if e["url"] == url:
            return next(v for k, v in e.items() if k.startswith("value"))
    return None
