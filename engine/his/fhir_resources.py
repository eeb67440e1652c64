"""FHIR R4 resources for the HIS, built and read as plain JSON.

The convention (what the simulator serves, and what a hospital's FHIR facade
is asked to follow):

Appointment (one per booking)
    ``identifier`` ``urn:haoyuan:booking|<booking id>`` is the idempotency key:
    ``book`` is a conditional create (``POST /Appointment`` with
    ``If-None-Exist: identifier=urn:haoyuan:booking|<id>``), so a retry answers
    the existing resource (200) instead of creating a second one.
    ``slot`` references ``Slot/<session id>-<slot id>``; participants are
    ``Patient/<patient ref>`` (our keyed hash, never personal data) and
    ``Practitioner/<doctor id>``; ``serviceType`` and ``specialty`` carry the
    department (system ``urn:haoyuan:dept``); extensions
    ``urn:haoyuan:queue-number`` and ``urn:haoyuan:fee-cents`` (valueInteger)
    carry the queue number and the fee. ``cancel`` re-reads the resource and
    PUTs it back with ``status`` ``cancelled`` and ``cancelationReason.text``,
    with ``If-Match`` on its version when the HIS gives one.
    A refusal is a 400, 409 or 422 with an OperationOutcome whose
    ``issue[0].details.coding[0].code`` (else ``diagnostics``, else ``code``)
    is the reason, e.g. ``doctor_stopped``, ``patient_unknown``.

Schedule (one per session, 出诊)
    ``id`` is the session id (see :func:`fhir_id`), also in ``identifier``
    ``urn:haoyuan:session``; ``actor`` ``Practitioner/<doctor id>``;
    ``serviceType``/``specialty`` the department; ``active`` false when the
    session is withdrawn (停诊); ``planningHorizon`` spans its slots;
    extensions ``urn:haoyuan:hospital`` (valueString),
    ``urn:haoyuan:session-date`` (valueDate), ``urn:haoyuan:period``
    (valueCode ``AM``/``PM``), ``urn:haoyuan:fee-cents`` (valueInteger).
    Searched with ``GET /Schedule?date=ge<start>&date=le<end>`` (dates of the
    session, inclusive).

Slot (one per time slot of a session)
    ``id`` ``<session id>-<slot id>``; ``identifier`` ``urn:haoyuan:slot|<slot
    id>``; ``schedule`` ``Schedule/<session id>``; ``start``/``end``;
    ``status`` ``free`` (any other status reads as capacity 0); extension
    ``urn:haoyuan:capacity`` (valueInteger, default 1). Searched with
    ``GET /Slot?schedule=Schedule/<a>,Schedule/<b>,...``.

Patient (one per person, found or created by the forwarder)
    ``identifier`` the national ID under ``urn:oid:2.16.156.10011.1.3`` (居民身份证号,
    WS/T 500), type ``v2-0203|NI``: the key of a conditional create
    (``POST /Patient`` with ``If-None-Exist: identifier=urn:oid:...|<id>``;
    several matches: 412, a human decides). ``name.text`` the whole name
    (compound surnames make a split unreliable), ``gender`` and ``birthDate``
    derived from the ID, ``telecom`` the mobile number. Only the forwarder
    builds it: patient data is decrypted nowhere else. The Appointment then
    references ``Patient/<the HIS's id>``.

Visit window and place
    The HIS may narrow ``start``/``end`` to the patient's window (e.g. ten
    minutes around the queue number) and add a participant ``Location/<id>``
    whose ``display`` says where (e.g. "门诊楼3层 心内科 5诊室"); the engine
    keeps both for the patient.

Changes (the HIS's change feed)
    ``GET /Appointment?_lastUpdated=gt<instant>&_sort=_lastUpdated`` and the
    same for ``Schedule``; a cancel's ``cancelationReason`` carries a code
    (``doctor_stopped`` for 停诊) or text. A Subscription (rest-hook) only
    pings: the search is the truth.

This module builds JSON as plain dicts: ``fhir.resources`` is a test-only
dependency (the tests validate what we send with it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec

from engine.his.base import (
    REASON_CANCELLED,
    HisBooking,
    HisChange,
    HisPatient,
    HisProtocolError,
    HisResult,
    HisSchedule,
    HisSlot,
)

FHIR_JSON = "application/fhir+json"
SYS_BOOKING = "urn:haoyuan:booking"
SYS_SESSION = "urn:haoyuan:session"
SYS_SLOT = "urn:haoyuan:slot"
SYS_DEPT = "urn:haoyuan:dept"
EXT_QUEUE_NUMBER = "urn:haoyuan:queue-number"
EXT_FEE_CENTS = "urn:haoyuan:fee-cents"
EXT_CAPACITY = "urn:haoyuan:capacity"
EXT_HOSPITAL = "urn:haoyuan:hospital"
EXT_SESSION_DATE = "urn:haoyuan:session-date"
EXT_PERIOD = "urn:haoyuan:period"
#: 居民身份证号 in China's health-information OID tree (WS/T 500, WS/T 682-2020).
SYS_NATIONAL_ID = "urn:oid:2.16.156.10011.1.3"
SYS_ID_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"

#: China Standard Time: how naive datetimes are read unless told otherwise.
CST = timezone(timedelta(hours=8))

#: Appointment statuses, as the engine reads them.
ACTIVE_STATUSES = frozenset({"booked", "arrived", "fulfilled", "checked-in", "noshow"})
GONE_STATUSES = frozenset({REASON_CANCELLED, "entered-in-error"})
REJECT_STATUSES = frozenset({400, 409, 422})

Json = dict[str, Any]


# -- building resources ------------------------------------------------------


def fhir_id(value: str) -> str:
    """Our ids as FHIR ids (``[A-Za-z0-9.-]``): ``_`` -> ``.u``, ``:`` -> ``.c``.

    Our ids never contain ``.`` themselves (see ``engine.keys``), so this is
    one-to-one.
    """
    return value.replace("_", ".u").replace(":", ".c")


def slot_fhir_id(session_id: str, slot_id: str) -> str:
    return fhir_id(f"{session_id}-{slot_id}")


def booking_query(booking_id: str) -> str:
    """The search that finds a booking: ``identifier=urn:haoyuan:booking|<id>``."""
    return "identifier=" + quote(f"{SYS_BOOKING}|{booking_id}", safe=":|")


def patient_query(national_id: str) -> str:
    """The conditional create's search: ``identifier=urn:oid:2.16.156.10011.1.3|<id>``."""
    return "identifier=" + quote(f"{SYS_NATIONAL_ID}|{national_id}", safe=":|")


def patient_resource(p: HisPatient) -> Json:
    """The Patient we find or create (the national ID is its identifier)."""
    return {
        "resourceType": "Patient",
        "identifier": [{
            "use": "official",
            "type": {"coding": [{"system": SYS_ID_TYPE, "code": "NI"}]},
            "system": SYS_NATIONAL_ID,
            "value": p.national_id,
        }],
        "active": True,
        "name": [{"use": "official", "text": p.name}],
        "telecom": [{"system": "phone", "value": p.phone, "use": "mobile"}],
        "gender": p.gender,
        "birthDate": p.birth_date,
    }


def subscription_resource(endpoint: str, token: str) -> Json:
    """The R4 Subscription a hospital's FHIR server is asked to hold for us: a
    rest-hook on our Appointments with criteria true in every state (a cancel
    is never silent), no payload (a ping; we search), our bearer token."""
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "haoyuan: window and phone cancels, 停诊, arrivals and no-shows",
        "criteria": f"Appointment?identifier={SYS_BOOKING}%7C",
        "channel": {"type": "rest-hook", "endpoint": endpoint,
                    "header": [f"Authorization: Bearer {token}"]},
    }


def instant(value: str, tz: tzinfo = CST) -> str:
    """An ISO datetime as a FHIR ``instant`` (naive values are read in ``tz``)."""
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.isoformat()


def _dept(dept_id: str) -> list[Json]:
    return [{"coding": [{"system": SYS_DEPT, "code": dept_id}]}]


def appointment_resource(b: HisBooking, tz: tzinfo = CST) -> Json:
    """The Appointment we create for a booking."""
    return {
        "resourceType": "Appointment",
        "identifier": [{"system": SYS_BOOKING, "value": b.booking_id}],
        "extension": [
            {"url": EXT_QUEUE_NUMBER, "valueInteger": b.unit},
            {"url": EXT_FEE_CENTS, "valueInteger": b.fee},
        ],
        "status": "booked",
        "serviceType": _dept(b.dept_id),
        "specialty": _dept(b.dept_id),
        "start": instant(b.start, tz),
        "end": instant(b.end, tz),
        "slot": [{"reference": f"Slot/{slot_fhir_id(b.session_id, b.slot_id)}"}],
        "comment": f"queue number {b.unit}",
        "participant": [
            {
                "actor": {"reference": f"Patient/{b.patient_his_id or b.patient_ref}"},
                "required": "required",
                "status": "accepted",
            },
            {
                "actor": {"reference": f"Practitioner/{b.doctor_id}"},
                "required": "required",
                "status": "accepted",
            },
        ],
    }


def schedule_resources(s: HisSchedule, tz: tzinfo = CST) -> tuple[Json, list[Json]]:
    """The Schedule and Slots that describe one session."""
    sid = fhir_id(s.session_id)
    schedule: Json = {
        "resourceType": "Schedule",
        "id": sid,
        "identifier": [{"system": SYS_SESSION, "value": s.session_id}],
        "extension": [
            {"url": EXT_HOSPITAL, "valueString": s.hospital_id},
            {"url": EXT_SESSION_DATE, "valueDate": s.date},
            {"url": EXT_PERIOD, "valueCode": s.period},
            {"url": EXT_FEE_CENTS, "valueInteger": s.fee},
        ],
        "active": s.active,
        "serviceType": _dept(s.dept_id),
        "specialty": _dept(s.dept_id),
        "actor": [{"reference": f"Practitioner/{s.doctor_id}"}],
    }
    slots = [
        {
            "resourceType": "Slot",
            "id": slot_fhir_id(s.session_id, slot.id),
            "identifier": [{"system": SYS_SLOT, "value": slot.id}],
            "extension": [{"url": EXT_CAPACITY, "valueInteger": slot.capacity}],
            "schedule": {"reference": f"Schedule/{sid}"},
            "status": "free" if slot.capacity > 0 else "busy-unavailable",
            "start": instant(slot.start, tz),
            "end": instant(slot.end, tz),
        }
        for slot in s.slots
    ]
    if s.slots:
        starts = [datetime.fromisoformat(instant(x.start, tz)) for x in s.slots]
        ends = [datetime.fromisoformat(instant(x.end, tz)) for x in s.slots]
        schedule["planningHorizon"] = {
            "start": min(starts).isoformat(),
            "end": max(ends).isoformat(),
        }
    return schedule, slots


def operation_outcome(code: str, diagnostics: str, *, severity: str = "error") -> Json:
    """An OperationOutcome carrying ``code`` as ``issue[0].details.coding[0].code``."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": severity,
                "code": "business-rule" if severity == "error" else "informational",
                "details": {"coding": [{"system": "urn:haoyuan:his-reason", "code": code}]},
                "diagnostics": diagnostics,
            }
        ],
    }


# -- reading resources (only the fields we use; the rest is ignored) ---------


class _Coding(msgspec.Struct):
    system: str | None = None
    code: str | None = None


class _Concept(msgspec.Struct):
    coding: list[_Coding] = []
    text: str | None = None


class _Issue(msgspec.Struct):
    code: str | None = None
    details: _Concept | None = None
    diagnostics: str | None = None


class _Outcome(msgspec.Struct):
    issue: list[_Issue] = []


class _Identifier(msgspec.Struct):
    system: str | None = None
    value: str | None = None


class _Reference(msgspec.Struct):
    reference: str | None = None


class _Extension(msgspec.Struct):
    url: str
    valueInteger: int | None = None
    valueString: str | None = None
    valueCode: str | None = None
    valueDate: str | None = None


class _Meta(msgspec.Struct):
    versionId: str | None = None
    lastUpdated: str | None = None


class _Actor(msgspec.Struct):
    reference: str | None = None
    display: str | None = None


class _Participant(msgspec.Struct):
    actor: _Actor | None = None


class AppointmentView(msgspec.Struct):
    id: str | None = None
    status: str | None = None
    meta: _Meta | None = None
    identifier: list[_Identifier] = []
    start: str | None = None
    end: str | None = None
    participant: list[_Participant] = []
    cancelationReason: _Concept | None = None


class PatientView(msgspec.Struct):
    id: str | None = None


class ScheduleChangeView(msgspec.Struct):
    id: str
    meta: _Meta | None = None
    identifier: list[_Identifier] = []
    active: bool = True


class ScheduleView(msgspec.Struct):
    id: str
    identifier: list[_Identifier] = []
    extension: list[_Extension] = []
    actor: list[_Reference] = []
    serviceType: list[_Concept] = []
    specialty: list[_Concept] = []
    active: bool = True


class SlotView(msgspec.Struct):
    schedule: _Reference
    start: str
    end: str
    status: str = "free"
    id: str | None = None
    identifier: list[_Identifier] = []
    extension: list[_Extension] = []


class _Search(msgspec.Struct):
    mode: str | None = None


class _Entry(msgspec.Struct):
    resource: dict[str, Any] | None = None
    search: _Search | None = None


class _Link(msgspec.Struct):
    relation: str
    url: str


class _Bundle(msgspec.Struct):
    resourceType: str
    entry: list[_Entry] = []
    link: list[_Link] = []


json_decoder = msgspec.json.Decoder()
bundle_decoder = msgspec.json.Decoder(_Bundle)
_outcome_decoder = msgspec.json.Decoder(_Outcome)


_T = TypeVar("_T")


def convert(raw: Mapping[str, Any], kind: type[_T]) -> _T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise HisProtocolError(f"malformed {kind.__name__.lstrip('_')}: {exc}") from None


def reason_of(body: bytes, status_code: int) -> str:
    """The reason code in an OperationOutcome body (``http_<status>`` if none)."""
    try:
        outcome = _outcome_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return f"http_{status_code}"
    for issue in outcome.issue[:1]:
        if issue.details is not None:
            for coding in issue.details.coding:
                if coding.code:
                    return coding.code
            if issue.details.text:
                return issue.details.text
        if issue.diagnostics:
            return issue.diagnostics
        if issue.code:
            return issue.code
    return f"http_{status_code}"


def _place(appt: AppointmentView) -> str | None:
    for p in appt.participant:
        a = p.actor
        if a is not None and (a.reference or "").startswith("Location/"):
            return a.display or a.reference
    return None


def _reason(concept: _Concept | None) -> str | None:
    if concept is None:
        return None
    for coding in concept.coding:
        if coding.code:
            return coding.code
    return concept.text


def status_result(raw: Mapping[str, Any]) -> HisResult:
    appt = convert(raw, AppointmentView)
    status = appt.status or ""
    if status in ACTIVE_STATUSES:
        return HisResult("accepted", appt.id, None, appt.start, appt.end, _place(appt))
    if status in GONE_STATUSES:
        return HisResult("rejected", appt.id, status)
    return HisResult("unknown", appt.id, status or "no_status")


def appointment_change(raw: Mapping[str, Any]) -> HisChange | None:
    """An Appointment of the change feed (None: it has no id or version)."""
    appt = convert(raw, AppointmentView)
    meta = appt.meta
    if appt.id is None or meta is None or not meta.lastUpdated:
        return None
    return HisChange(resource="Appointment", his_id=appt.id, version=meta.versionId or "",
                     last_updated=meta.lastUpdated, status=appt.status or "",
                     booking_id=_ident(appt.identifier, SYS_BOOKING),
                     reason=_reason(appt.cancelationReason))


def schedule_change(raw: Mapping[str, Any]) -> HisChange | None:
    """A Schedule of the change feed: ``inactive`` is 停诊."""
    sched = convert(raw, ScheduleChangeView)
    meta = sched.meta
    if meta is None or not meta.lastUpdated:
        return None
    return HisChange(resource="Schedule", his_id=sched.id, version=meta.versionId or "",
                     last_updated=meta.lastUpdated,
                     status="active" if sched.active else "inactive",
                     session_id=_ident(sched.identifier, SYS_SESSION))


def _ext(exts: Iterable[_Extension], url: str) -> _Extension | None:
    return next((e for e in exts if e.url == url), None)


def _ident(idents: Iterable[_Identifier], system: str) -> str | None:
    return next((i.value for i in idents if i.system == system and i.value), None)


def _code(concepts: Iterable[_Concept], system: str) -> str | None:
    for concept in concepts:
        for coding in concept.coding:
            if coding.system == system and coding.code:
                return coding.code
    return None


def _to_slot(raw: SlotView, session_prefix: str) -> HisSlot:
    slot_id = _ident(raw.identifier, SYS_SLOT)
    if slot_id is None:
        if raw.id is None or not raw.id.startswith(session_prefix):
            raise HisProtocolError(f"slot without a {SYS_SLOT} identifier")
        slot_id = raw.id.removeprefix(session_prefix)
    cap = _ext(raw.extension, EXT_CAPACITY)
    capacity = cap.valueInteger if cap is not None and cap.valueInteger is not None else 1
    if raw.status != "free":
        capacity = 0
    return HisSlot(id=slot_id, start=raw.start, end=raw.end, capacity=max(capacity, 0))


def to_schedule(raw: ScheduleView, slots: list[SlotView]) -> HisSchedule:
    session_id = _ident(raw.identifier, SYS_SESSION) or raw.id
    doctor = next(
        (
            a.reference.removeprefix("Practitioner/")
            for a in raw.actor
            if a.reference and a.reference.startswith("Practitioner/")
        ),
        None,
    )
    dept = _code(raw.serviceType, SYS_DEPT) or _code(raw.specialty, SYS_DEPT)
    hospital = _ext(raw.extension, EXT_HOSPITAL)
    date = _ext(raw.extension, EXT_SESSION_DATE)
    period = _ext(raw.extension, EXT_PERIOD)
    fee = _ext(raw.extension, EXT_FEE_CENTS)
    if (
        doctor is None
        or dept is None
        or hospital is None
        or hospital.valueString is None
        or date is None
        or date.valueDate is None
        or period is None
        or period.valueCode not in ("AM", "PM")
        or fee is None
        or fee.valueInteger is None
    ):
        raise HisProtocolError(f"Schedule/{raw.id} lacks the haoyuan session fields")
    prefix = f"{fhir_id(session_id)}-"
    his_slots = sorted((_to_slot(s, prefix) for s in slots), key=lambda s: (s.start, s.id))
    return HisSchedule(
        session_id=session_id,
        hospital_id=hospital.valueString,
        dept_id=dept,
        doctor_id=doctor,
        date=date.valueDate,
        period="AM" if period.valueCode == "AM" else "PM",
        fee=fee.valueInteger,
        slots=tuple(his_slots),
        active=raw.active,
    )
