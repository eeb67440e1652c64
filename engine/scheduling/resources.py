"""FHIR R4 resources of the scheduling standards, built as plain JSON.

What the facade (``/fhir/r4``) answers and the bulk publisher writes; the
tests validate every one with ``fhir.resources`` (R4B, wire-compatible with
R4 for these resources). Ids are ``engine.scheduling.ids``'s.

Location (a hospital)
    ``identifier`` ``urn:haoyuan:hospital``; ``name``; ``telecom`` and
    ``address`` from the hospital's contact (``haoyuan fhir-location``).
Schedule (a session, 出诊)
    ``identifier`` ``urn:haoyuan:session``; ``actor`` the Location (hospital)
    and the Practitioner (doctor), with their names; ``serviceType`` and
    ``specialty`` the department (system ``urn:haoyuan:dept``); ``active``
    false once suspended (停诊); ``planningHorizon`` its slots.
Slot (a time slot of a session: its units are interchangeable places)
    ``status`` from the engine's live availability: ``free`` (units left and
    booking open), ``busy`` (sold out), ``busy-unavailable`` (not open yet,
    closed, suspended, recovering); extensions:

    - ``urn:haoyuan:availability`` (valueCode): ``free``, ``sold-out``,
      ``not-open``, ``closed``, ``suspended``, ``recovering``;
    - ``urn:haoyuan:release-at`` (valueInstant): when booking opens (``not-open``);
    - ``urn:haoyuan:free-units``, ``urn:haoyuan:capacity`` (valueInteger);
    - SMART ``slot-capacity`` (valueInteger): the free units of a free
      Slot, else all of them;
    - SMART ``booking-deep-link`` / ``booking-phone``: where a person books it.

Appointment (a hold or booking; ``proposed`` from ``$find``)
    ``identifier`` ``urn:haoyuan:booking`` (the record id); ``status``
    ``proposed`` / ``pending`` (held) / ``booked`` / ``cancelled``; ``slot``;
    participants the Patient (never named: the client knows who it sent),
    the Practitioner and the Location; extensions ``urn:haoyuan:hold-expires``
    (valueInstant), ``urn:haoyuan:queue-number``, ``urn:haoyuan:fee-cents``.
OperationOutcome
    ``issue[0].details.coding[0]`` ``urn:haoyuan:outcome|<code>``: the same
    stable codes as the /v1 problem types (``sold-out``, ``not-open``,
    ``rate-limited``, ``duplicate``, ``expired``, ``recovering``, ...).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from engine.his.fhir_resources import (
    EXT_CAPACITY,
    EXT_FEE_CENTS,
    EXT_QUEUE_NUMBER,
    SYS_BOOKING,
    SYS_DEPT,
    SYS_SESSION,
    SYS_SLOT,
)
from engine.outcomes import SessionAvailability, SlotAvailability
from engine.scheduling import ids
from engine.store.scheduling import HospitalInfo, SessionInfo, SlotInfo

__all__ = [
    "EXT_AVAILABILITY",
    "EXT_BOOKING_LINK",
    "EXT_BOOKING_PHONE",
    "EXT_FREE_UNITS",
    "EXT_HOLD_EXPIRES",
    "EXT_RELEASE_AT",
    "EXT_SLOT_CAPACITY",
    "SYS_HOSPITAL",
    "SYS_NATIONAL_ID",
    "SYS_OUTCOME",
    "SYS_PATIENT_REF",
    "appointment",
    "bundle",
    "local_instant",
    "location",
    "ms_instant",
    "operation_outcome",
    "schedule",
    "slot",
    "slot_state",
]

SMART = "http://fhir-registry.smarthealthit.org/StructureDefinition/"
EXT_BOOKING_LINK = SMART + "booking-deep-link"
EXT_BOOKING_PHONE = SMART + "booking-phone"
EXT_SLOT_CAPACITY = SMART + "slot-capacity"
EXT_AVAILABILITY = "urn:haoyuan:availability"
EXT_RELEASE_AT = "urn:haoyuan:release-at"
EXT_FREE_UNITS = "urn:haoyuan:free-units"
EXT_HOLD_EXPIRES = "urn:haoyuan:hold-expires"
SYS_HOSPITAL = "urn:haoyuan:hospital"
SYS_DOCTOR = "urn:haoyuan:doctor"
SYS_OUTCOME = "urn:haoyuan:outcome"
#: A patient's resident ID number (居民身份证号): the one way a client names a
#: patient; the server hashes it (never a hash a client sends).
SYS_NATIONAL_ID = "urn:haoyuan:national-id"
#: Our keyed hash of the ID (what the HIS sees): refused from clients.
SYS_PATIENT_REF = "urn:haoyuan:patient-ref"

Json = dict[str, Any]


def ms_instant(ms: int) -> str:
    """Epoch milliseconds as a FHIR instant in UTC (``2026-12-10T00:00:00.000Z``)."""
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def local_instant(date: str, clock: str, tz_min: int) -> str:
    """A session's local ``date`` and ``HH:MM`` as an instant with its offset."""
    tz = dt.timezone(dt.timedelta(minutes=tz_min))
    h, m = (int(x) for x in clock.split(":"))
    day = dt.date.fromisoformat(date)
    if (h, m) == (24, 0):  # pragma: no cover - clocks stop at 23:59
        h, day = 0, day + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, h, m, tzinfo=tz).isoformat()


def slot_state(live: SessionAvailability | None, free: int, now_ms: int) -> str:
    """The availability code of a slot with ``free`` units left."""
    if live is None or live.status == "recovering":
        return "recovering"
    if live.status != "open":
        return "suspended"
    if now_ms < live.release_at_ms:
        return "not-open"
    if 0 < live.cutoff_ms <= now_ms:
        return "closed"
    return "free" if free > 0 else "sold-out"


_STATUS = {"free": "free", "sold-out": "busy"}


def _dept(s: SessionInfo) -> list[Json]:
    return [{"coding": [{"system": SYS_DEPT, "code": s.dept_id, "display": s.dept_name}]}]


def slot(s: SessionInfo, sl: SlotInfo, live: SessionAvailability | None,
         live_slot: SlotAvailability | None, now_ms: int, *,
         booking_link: str | None = None, booking_phone: str | None = None) -> Json:
    free = live_slot.free if live_slot is not None else 0
    capacity = live_slot.capacity if live_slot is not None else sl.capacity
    state = slot_state(live if live_slot is not None else None, free, now_ms)
    ext: list[Json] = [{"url": EXT_AVAILABILITY, "valueCode": state}]
    if state == "not-open" and live is not None:
        ext.append({"url": EXT_RELEASE_AT, "valueInstant": ms_instant(live.release_at_ms)})
    ext += [{"url": EXT_FREE_UNITS, "valueInteger": free},
            {"url": EXT_CAPACITY, "valueInteger": capacity},
            {"url": EXT_SLOT_CAPACITY, "valueInteger": free if state == "free" else capacity}]
    if booking_link:
        ext.append({"url": EXT_BOOKING_LINK, "valueUrl": booking_link})
    if booking_phone:
        ext.append({"url": EXT_BOOKING_PHONE, "valueString": booking_phone})
    return {
        "resourceType": "Slot",
        "id": ids.slot_id(s.session_id, sl.slot_id),
        "extension": ext,
        "identifier": [{"system": SYS_SLOT, "value": sl.slot_id}],
        "serviceType": _dept(s),
        "specialty": _dept(s),
        "schedule": {"reference": f"Schedule/{ids.enc(s.session_id)}"},
        "status": _STATUS.get(state, "busy-unavailable"),
        "start": local_instant(s.date, sl.start, s.tz_min),
        "end": local_instant(s.date, sl.end, s.tz_min),
    }


def schedule(s: SessionInfo) -> Json:
    out: Json = {
        "resourceType": "Schedule",
        "id": ids.enc(s.session_id),
        "extension": [{"url": EXT_FEE_CENTS, "valueInteger": s.fee}],
        "identifier": [{"system": SYS_SESSION, "value": s.session_id}],
        "active": s.status == "open",
        "serviceType": _dept(s),
        "specialty": _dept(s),
        "actor": [
            {"reference": f"Location/{ids.enc(s.hospital_id)}", "display": s.hospital_name},
            {"reference": f"Practitioner/{ids.enc(s.doctor_id)}", "display": s.doctor_name},
        ],
        "comment": f"{s.date} {s.period}",
    }
    if s.slots:
        out["planningHorizon"] = {
            "start": local_instant(s.date, s.slots[0].start, s.tz_min),
            "end": local_instant(s.date, max(x.end for x in s.slots), s.tz_min)}
    return out


def location(h: HospitalInfo) -> Json:
    c = h.contact
    out: Json = {"resourceType": "Location", "id": ids.enc(h.hospital_id),
                 "identifier": [{"system": SYS_HOSPITAL, "value": h.hospital_id}],
                 "name": h.name}
    telecom = [{"system": k, "value": str(c[k])} for k in ("phone", "url") if c.get(k)]
    if telecom:
        out["telecom"] = telecom
    addr: Json = {}
    if c.get("line"):
        addr["line"] = [str(x) for x in c["line"]] if isinstance(c["line"], list) \
            else [str(c["line"])]
    for key, name in (("city", "city"), ("district", "district"), ("state", "state"),
                      ("postal_code", "postalCode"), ("country", "country")):
        if c.get(key):
            addr[name] = str(c[key])
    if addr:
        out["address"] = addr
    if isinstance(c.get("latitude"), int | float) and isinstance(c.get("longitude"), int | float):
        out["position"] = {"latitude": c["latitude"], "longitude": c["longitude"]}
    return out


def appointment(fid: str, status: str, s: SessionInfo | None, slot_id: str, *,
                record_id: str | None = None, unit: int | None = None,
                expires_ms: int | None = None, created_ms: int | None = None,
                fee: int | None = None, free: int | None = None) -> Json:
    ext: list[Json] = []
    if expires_ms is not None:
        ext.append({"url": EXT_HOLD_EXPIRES, "valueInstant": ms_instant(expires_ms)})
    if unit is not None:
        ext.append({"url": EXT_QUEUE_NUMBER, "valueInteger": unit})
    if fee is not None:
        ext.append({"url": EXT_FEE_CENTS, "valueInteger": fee})
    if free is not None:
        ext.append({"url": EXT_FREE_UNITS, "valueInteger": free})
    participants: list[Json] = [{"actor": {"type": "Patient"}, "required": "required",
                                 "status": "needs-action" if status == "proposed"
                                 else "declined" if status == "cancelled" else "accepted"}]
    out: Json = {"resourceType": "Appointment", "id": fid}
    if ext:
        out["extension"] = ext
    if record_id is not None:
        out["identifier"] = [{"system": SYS_BOOKING, "value": record_id}]
    out["status"] = status
    if s is not None:
        out["serviceType"] = _dept(s)
        out["specialty"] = _dept(s)
        sl = next((x for x in s.slots if x.slot_id == slot_id), None)
        if sl is not None:
            out["start"] = local_instant(s.date, sl.start, s.tz_min)
            out["end"] = local_instant(s.date, sl.end, s.tz_min)
        participants += [
            {"actor": {"reference": f"Practitioner/{ids.enc(s.doctor_id)}",
                       "display": s.doctor_name}, "required": "required", "status": "accepted"},
            {"actor": {"reference": f"Location/{ids.enc(s.hospital_id)}",
                       "display": s.hospital_name}, "required": "required",
             "status": "accepted"}]
        out["slot"] = [{"reference": f"Slot/{ids.slot_id(s.session_id, slot_id)}"}]
    if created_ms:
        out["created"] = ms_instant(created_ms)
    out["participant"] = participants
    return out


def operation_outcome(issue_code: str, code: str, text: str, *, severity: str = "error",
                      diagnostics: str | None = None) -> Json:
    issue: Json = {"severity": severity, "code": issue_code,
                   "details": {"coding": [{"system": SYS_OUTCOME, "code": code}], "text": text}}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def bundle(base: str, resources: list[Json], *, total: int | None = None,
           links: list[tuple[str, str]] | None = None, kind: str = "searchset") -> Json:
    out: Json = {"resourceType": "Bundle", "type": kind}
    if total is not None:
        out["total"] = total
    if links:
        out["link"] = [{"relation": rel, "url": url} for rel, url in links]
    entries = [
        {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
         "search": {"mode": "outcome" if r["resourceType"] == "OperationOutcome" else "match"}}
        if "id" in r else
        {"resource": r, "search": {"mode": "outcome"}}
        for r in resources]
    if entries:  # FHIR JSON has no empty arrays
        out["entry"] = entries
    return out
