"""Another backend booking through haoyuan's FHIR facade (/fhir/r4): search
free slots, hold one for a patient, book it once paid, cancel it; every
refusal an OperationOutcome with a stable code.

    haoyuan fhir-client add my-backend --identity trusted \\
        --scopes system/Slot.read system/Appointment.read system/Appointment.write
    python examples/fhir_backend.py http://127.0.0.1:8000 hyf_... [NATIONAL_ID]

A ``trusted`` client names a patient by the resident ID number alone (it
verified its patients itself); a ``verify`` client (the default) also sends
the name and phone, which the server checks with the real-name authority.
The server hashes the ID itself: no client ever sends a patient ref.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import httpx

FHIR = "application/fhir+json"
NATIONAL_ID = "urn:haoyuan:national-id"
OUTCOME = "urn:haoyuan:outcome"


def code_of(outcome: dict[str, Any]) -> str:
    """Our stable code of an OperationOutcome (sold-out, not-open, duplicate, ...)."""
    for c in outcome["issue"][0]["details"]["coding"]:
        if c["system"] == OUTCOME:
            return str(c["code"])
    return "?"


def main(base: str, token: str, national_id: str = "11010519491231002X") -> int:
    http = httpx.Client(base_url=base.rstrip("/") + "/fhir/r4", timeout=10,
                        headers={"Authorization": f"Bearer {token}", "Accept": FHIR})

    # 1. Search: free slots, live from the engine (busy = sold out).
    r = http.get("/Slot", params={"status": "free", "_count": "5"})
    r.raise_for_status()
    slots = [e["resource"] for e in r.json().get("entry", [])]
    print(f"free slots: {r.json()['total']}")
    if not slots:
        return 1
    slot = slots[0]
    print(f"slot {slot['id']} at {slot['start']}")

    # 2. Hold it for the patient (our TTL hold). The request identifier makes
    #    a retry answer the first hold instead of holding twice.
    appt = {"resourceType": "Appointment", "status": "proposed",
            "contained": [{"resourceType": "Patient", "id": "p",
                           "identifier": [{"system": NATIONAL_ID, "value": national_id}]}],
            "slot": [{"reference": f"Slot/{slot['id']}"}],
            "participant": [{"actor": {"reference": "#p"}, "status": "accepted"}]}
    hold = {"resourceType": "Parameters",
            "parameter": [{"name": "appt-resource", "resource": appt}]}
    key = {"If-None-Exist": f"identifier=urn:example:request|{uuid.uuid4()}",
           "Content-Type": FHIR}
    r = http.post("/Appointment/$hold", json=hold, headers=key)
    if r.status_code != 200:
        print(f"hold refused: {code_of(r.json())}")
        return 1
    held = r.json()["entry"][0]["resource"]
    print(f"held {held['id']} ({held['status']}) until {r.headers['Expires']}")
    again = http.post("/Appointment/$hold", json=hold, headers=key).json()
    print(f"retried hold answers the same: {again['entry'][0]['resource']['id'] == held['id']}")

    # The same patient again, another key: the one-per-department-day rule.
    r = http.post("/Appointment/$hold", json=hold, headers={"Content-Type": FHIR})
    print(f"second hold for the patient: {r.status_code} {code_of(r.json())}")

    # 3. Book it once the patient paid (a payment reference books one hold, ever).
    pay = {"resourceType": "Parameters", "parameter": [
        {"name": "appt-id", "valueUri": f"Appointment/{held['id']}"},
        {"name": "payment-reference", "valueString": f"pay-{uuid.uuid4().hex[:12]}"}]}
    r = http.post("/Appointment/$book", json=pay, headers={"Content-Type": FHIR})
    booked = r.json()["entry"][0]["resource"]
    print(f"booked: {r.status_code} {booked['status']}")

    # 4. Cancel: the status becomes cancelled (the session's deadline applies).
    r = http.patch(f"/Appointment/{held['id']}",
                   content=b'[{"op": "replace", "path": "/status", "value": "cancelled"}]',
                   headers={"Content-Type": "application/json-patch+json"})
    print(f"cancelled: {r.status_code} {r.json()['status']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:4]))
