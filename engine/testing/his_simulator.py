"""An in-memory HIS speaking the FHIR subset of :mod:`engine.his.fhir`, with faults.

FHIR endpoints: ``POST /Appointment`` (honours ``If-None-Exist``: an existing
match is answered with 200), ``GET /Appointment?identifier=``,
``GET|PUT /Appointment/{id}`` (``If-Match`` checked), ``GET /Schedule?date=``,
``GET /Slot?schedule=``. Searches page by ``_count``/``_offset``.

Admin endpoints under ``/_sim/``: ``GET received`` (every FHIR request:
method, path, booking id, status code), ``GET appointments`` (booking id ->
status), ``GET|POST config`` (POST merges the fields given),
``POST schedules`` (a JSON list of :class:`~engine.his.base.HisSchedule`,
upserted by session id), ``POST reset`` (forget everything and restore the
start-up config).

Patients: ``POST /Patient`` (``If-None-Exist`` on the national ID:
found -> 200, several -> 412), ``GET /Patient?identifier=``,
``GET /Patient/{id}``. With ``require_patients`` an Appointment must
reference a Patient the simulator holds (else 422 ``patient_unknown``). A
new Appointment gets its visit window (10 minutes by queue number within
the slot) and a ``Location`` participant naming the room.

The change feed: ``GET /Appointment?_lastUpdated=gt<instant>`` and
``GET /Schedule?_lastUpdated=gt<instant>`` (every write stamps a strictly
increasing ``meta.lastUpdated``). Changes made at the hospital, injected
under ``/_sim/``: ``POST his/cancel`` (a window or phone cancel),
``POST his/arrive``, ``POST his/noshow``, ``POST his/fulfil`` (body
``{"booking_id": ...}``), ``POST his/suspend`` (停诊: ``{"session_id": ...}``:
the Schedule turns inactive and its appointments are cancelled with reason
``doctor_stopped``). With ``notify_url`` set, each injected change is pushed
as an R4 Subscription notification (a backport ``history`` Bundle, id-only,
``Authorization: Bearer <notify_token>``): a ping, the search is the truth.
A cancel of an appointment already arrived, checked in, fulfilled or
no-show is refused (409 ``already_arrived``), and so is any cancel of a
booking in ``refuse_cancel``.

Faults (:class:`SimConfig`), applied to FHIR endpoints in this order:
``down`` answers 503; ``latency_ms`` delays every answer (uniform +-50%);
``error_rate`` answers 500 without doing anything; then, for writes (POST
and PUT) that succeed, ``timeout_rate`` commits and *then* sleeps ``hang_s``
before answering, so a client with a shorter timeout sees a timeout after the
commit. ``reject_doctors`` and ``reject_patients`` refuse new appointments
with 422 and an OperationOutcome coded ``doctor_stopped`` or
``patient_unknown`` (a retry of an appointment already made still gets 200).

Run it: ``python -m engine.testing.his_simulator --port 8090 [--config JSON]``
(granian, loopback by default), or from tests :class:`SimulatorProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import httpx
import msgspec
from litestar import Litestar, Request, Response, get, post, put
from litestar.di import Provide

from engine.his.base import HisSchedule
from engine.his.fhir_resources import (
    EXT_QUEUE_NUMBER,
    EXT_SESSION_DATE,
    FHIR_JSON,
    SYS_BOOKING,
    SYS_NATIONAL_ID,
    SYS_SESSION,
    fhir_id,
    operation_outcome,
    schedule_resources,
)

Json = dict[str, Any]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class SimConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    latency_ms: NonNegative = 0.0
    error_rate: Rate = 0.0
    timeout_rate: Rate = 0.0
    #: How long a "timeout" answer sleeps after committing.
    hang_s: NonNegative = 5.0
    reject_doctors: frozenset[str] = frozenset()
    reject_patients: frozenset[str] = frozenset()
    down: bool = False
    page_size: Annotated[int, msgspec.Meta(ge=1)] = 100
    seed: int | None = None
    #: Appointments must reference a Patient the simulator holds.
    require_patients: bool = False
    #: Bookings whose cancel the HIS refuses (409 cancel_refused).
    refuse_cancel: frozenset[str] = frozenset()
    #: Where injected changes are pushed (a Subscription rest-hook), and its token.
    notify_url: str = ""
    notify_token: str = ""


class Received(msgspec.Struct, frozen=True):
    method: str
    path: str
    booking_id: str | None
    status_code: int


class SimState:
    """Everything the simulator holds; one per app."""

    def __init__(self, config: SimConfig) -> None:
        self.initial = config
        self.reset()

    def reset(self) -> None:
        self.configure(self.initial)
        self.appointments: dict[str, Json] = {}
        self.patients: dict[str, Json] = {}
        self.received: list[Received] = []
        self.schedules: dict[str, Json] = {}
        self.slots: dict[str, Json] = {}
        self.notified: list[int] = []
        self.events = 0
        self.http: httpx.AsyncClient | None = None
        self._seq = 0
        self._pseq = 0
        self._last = datetime.now(UTC)

    def configure(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)

    def next_id(self) -> str:
        self._seq += 1
        return f"appt-{self._seq}"

    def next_patient_id(self) -> str:
        self._pseq += 1
        return f"pat-{self._pseq}"

    def stamp_time(self) -> str:
        """A strictly increasing ``meta.lastUpdated``."""
        now = datetime.now(UTC)
        self._last = now if now > self._last else self._last + timedelta(microseconds=1)
        return self._last.isoformat()

    def find_patients(self, national_id: str) -> list[Json]:
        return [p for p in self.patients.values()
                if any(i.get("system") == SYS_NATIONAL_ID and i.get("value") == national_id
                       for i in p.get("identifier") or ())]

    def find_booking(self, booking_id: str) -> list[Json]:
        return [a for a in self.appointments.values() if booking_id_of(a) == booking_id]

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate


def booking_id_of(resource: Any) -> str | None:
    if not isinstance(resource, dict):
        return None
    for ident in resource.get("identifier") or ():
        if isinstance(ident, dict) and ident.get("system") == SYS_BOOKING:
            value = ident.get("value")
            return value if isinstance(value, str) else None
    return None


def _participant(resource: Json, kind: str) -> str | None:
    for p in resource.get("participant") or ():
        ref = (p.get("actor") or {}).get("reference") if isinstance(p, dict) else None
        if isinstance(ref, str) and ref.startswith(f"{kind}/"):
            return ref.removeprefix(f"{kind}/")
    return None


def _fhir(status: int, body: Json, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(body),
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


def _outcome(status: int, code: str, text: str) -> Response[bytes]:
    return _fhir(status, operation_outcome(code, text))


def _log(sim: SimState, request: Request[Any, Any, Any], booking: str | None, status: int) -> None:
    sim.received.append(Received(request.method, request.url.path, booking, status))


async def _gate(
    sim: SimState, request: Request[Any, Any, Any], booking: str | None
) -> Response[bytes] | None:
    """The faults every FHIR request goes through: down, latency, errors."""
    cfg = sim.config
    if cfg.down:
        _log(sim, request, booking, 503)
        return _outcome(503, "unavailable", "HIS is down")
    if cfg.latency_ms > 0:
        await asyncio.sleep(cfg.latency_ms * sim.rng.uniform(0.5, 1.5) / 1000)
    if sim.roll(sim.config.error_rate):
        _log(sim, request, booking, 500)
        return _outcome(500, "exception", "simulated internal error")
    return None


async def _committed(
    sim: SimState,
    request: Request[Any, Any, Any],
    booking: str | None,
    status: int,
    resource: Json,
) -> Response[bytes]:
    """Answer a committed write, first hanging if the dice say so."""
    _log(sim, request, booking, status)
    if sim.roll(sim.config.timeout_rate):
        await asyncio.sleep(sim.config.hang_s)
    return _fhir(status, resource, _resource_headers(resource))


def _resource_headers(resource: Json) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    return {
        "ETag": f'W/"{version}"',
        "Location": f"/Appointment/{resource['id']}/_history/{version}",
    }


def _stamp(resource: Json, rid: str, version: int, at: str | None = None) -> Json:
    return {
        **resource,
        "id": rid,
        "meta": {"versionId": str(version),
                 "lastUpdated": at or datetime.now(UTC).isoformat()},
    }


def _updated_ok(resource: Json, conditions: list[str]) -> bool:
    """``_lastUpdated`` prefixes gt, ge, lt, le on ``meta.lastUpdated``."""
    stamp = datetime.fromisoformat(resource.get("meta", {}).get("lastUpdated", ""))
    for cond in conditions:
        prefix, value = (cond[:2], cond[2:]) if cond[:2].isalpha() else ("eq", cond)
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            return False
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        ok = {"gt": stamp > at, "ge": stamp >= at, "lt": stamp < at, "le": stamp <= at,
              "eq": stamp == at}.get(prefix, False)
        if not ok:
            return False
    return True


def _by_update(resources: list[Json]) -> list[Json]:
    return sorted(resources, key=lambda r: r.get("meta", {}).get("lastUpdated", ""))


def _visit(resource: Json, sim: SimState) -> Json:
    """The window (10 minutes by queue number, within the slot) and the room."""
    unit = next((e.get("valueInteger") for e in resource.get("extension") or ()
                 if e.get("url") == EXT_QUEUE_NUMBER), None)
    out = dict(resource)
    try:
        start = datetime.fromisoformat(str(resource.get("start")))
        end = datetime.fromisoformat(str(resource.get("end")))
    except ValueError:
        return out
    if isinstance(unit, int) and unit > 0 and end > start:
        span = end - start
        step = timedelta(minutes=10)
        offset = (step * (unit - 1)) % span if span > step else timedelta(0)
        w_start = start + offset
        out["start"] = w_start.isoformat()
        out["end"] = min(end, w_start + step).isoformat()
    dept = ""
    for c in resource.get("serviceType") or ():
        for coding in c.get("coding") or ():
            dept = dept or str(coding.get("code") or "")
    doctor = _participant(resource, "Practitioner") or ""
    room = 1 + sum(ord(ch) for ch in doctor) % 9
    out["participant"] = [*(resource.get("participant") or ()), {
        "actor": {"reference": f"Location/{fhir_id(dept or 'clinic')}-{room}",
                  "display": f"门诊楼{1 + room % 3}层 {dept} {room}诊室"},
        "required": "information-only", "status": "accepted"}]
    return out


def _decode_resource(body: bytes, kind: str) -> Json | None:
    try:
        resource = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(resource, dict) or resource.get("resourceType") != kind:
        return None
    return resource


def _token(value: str) -> str:
    """``system|value`` or ``value`` -> value."""
    return value.rpartition("|")[2]


def _bundle(
    request: Request[Any, Any, Any], sim: SimState, kind: str, matches: list[Json]
) -> Response[bytes]:
    params = list(request.query_params.multi_items())
    try:
        count = int(request.query_params.get("_count") or sim.config.page_size)
        offset = int(request.query_params.get("_offset") or 0)
    except ValueError:
        return _outcome(400, "invalid", "bad _count or _offset")
    count = max(1, min(count, sim.config.page_size))
    page = matches[offset : offset + count]
    base = str(request.base_url).rstrip("/")
    keep = [(k, v) for k, v in params if k not in ("_count", "_offset")]
    links = [{"relation": "self", "url": f"{base}/{kind}?{urlencode(params)}"}]
    if offset + count < len(matches):
        nxt = [*keep, ("_count", str(count)), ("_offset", str(offset + count))]
        links.append({"relation": "next", "url": f"{base}/{kind}?{urlencode(nxt)}"})
    return _fhir(
        200,
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": links,
            "entry": [
                {
                    "fullUrl": f"{base}/{kind}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in page
            ],
        },
    )


# -- FHIR endpoints ----------------------------------------------------------


@post("/Appointment", status_code=201)
async def create_appointment(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    resource = _decode_resource(await request.body(), "Appointment")
    booking = booking_id_of(resource)
    if (fault := await _gate(sim, request, booking)) is not None:
        return fault
    if resource is None or booking is None:
        _log(sim, request, booking, 400)
        return _outcome(400, "invalid", f"an Appointment with a {SYS_BOOKING} identifier")
    condition = request.headers.get("if-none-exist")
    if condition:
        wanted = parse_qs(condition).get("identifier", [])
        existing = [a for w in wanted for a in sim.find_booking(_token(w))]
        if len(existing) > 1:
            _log(sim, request, booking, 412)
            return _outcome(412, "multiple-matches", "If-None-Exist matches several")
        if existing:
            _log(sim, request, booking, 200)
            return _fhir(200, existing[0], _resource_headers(existing[0]))
    doctor = _participant(resource, "Practitioner")
    patient = _participant(resource, "Patient")
    if doctor in sim.config.reject_doctors:
        _log(sim, request, booking, 422)
        return _outcome(422, "doctor_stopped", f"doctor {doctor} stopped the session")
    if patient in sim.config.reject_patients or (
            sim.config.require_patients and patient not in sim.patients):
        _log(sim, request, booking, 422)
        return _outcome(422, "patient_unknown", "no such patient in the HIS")
    stored = _stamp(_visit(resource, sim), sim.next_id(), 1, sim.stamp_time())
    sim.appointments[stored["id"]] = stored
    return await _committed(sim, request, booking, 201, stored)


@get("/Appointment")
async def search_appointments(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    wanted = [_token(v) for v in request.query_params.getall("identifier", [])]
    booking = wanted[0] if len(wanted) == 1 else None
    if (fault := await _gate(sim, request, booking)) is not None:
        return fault
    updated = request.query_params.getall("_lastUpdated", [])
    matches = [a for a in sim.appointments.values() if not wanted or booking_id_of(a) in wanted]
    if updated:
        matches = _by_update([a for a in matches if _updated_ok(a, updated)])
    _log(sim, request, booking, 200)
    return _bundle(request, sim, "Appointment", matches)


@get("/Appointment/{rid:str}")
async def read_appointment(
    rid: str, request: Request[Any, Any, Any], sim: SimState
) -> Response[bytes]:
    stored = sim.appointments.get(rid)
    booking = booking_id_of(stored)
    if (fault := await _gate(sim, request, booking)) is not None:
        return fault
    if stored is None:
        _log(sim, request, None, 404)
        return _outcome(404, "not-found", f"no Appointment/{rid}")
    _log(sim, request, booking, 200)
    return _fhir(200, stored, _resource_headers(stored))


@put("/Appointment/{rid:str}", status_code=200)
async def update_appointment(
    rid: str, request: Request[Any, Any, Any], sim: SimState
) -> Response[bytes]:
    resource = _decode_resource(await request.body(), "Appointment")
    booking = booking_id_of(resource) or booking_id_of(sim.appointments.get(rid))
    if (fault := await _gate(sim, request, booking)) is not None:
        return fault
    if resource is None or resource.get("id", rid) != rid:
        _log(sim, request, booking, 400)
        return _outcome(400, "invalid", "an Appointment whose id matches the URL")
    stored = sim.appointments.get(rid)
    if stored is None:
        _log(sim, request, booking, 404)
        return _outcome(404, "not-found", f"no Appointment/{rid}")
    version = int(stored["meta"]["versionId"])
    if_match = request.headers.get("if-match")
    if if_match and if_match.removeprefix("W/").strip('"') != str(version):
        _log(sim, request, booking, 412)
        return _outcome(412, "conflict", f"version is {version}")
    if resource.get("status") == "cancelled" and stored.get("status") != "cancelled" and (
            stored.get("status") in ("arrived", "checked-in", "fulfilled", "noshow")
            or booking in sim.config.refuse_cancel):
        _log(sim, request, booking, 409)
        code = "already_arrived" if booking not in sim.config.refuse_cancel else "cancel_refused"
        return _outcome(409, code, "the HIS refuses to cancel this appointment")
    updated = _stamp(resource, rid, version + 1, sim.stamp_time())
    sim.appointments[rid] = updated
    return await _committed(sim, request, booking, 200, updated)


def _date_ok(date: str, conditions: list[str]) -> bool:
    for cond in conditions:
        prefix, value = (cond[:2], cond[2:]) if cond[:2].isalpha() else ("eq", cond)
        value = value[:10]
        ok = {
            "eq": date == value,
            "ge": date >= value,
            "le": date <= value,
            "gt": date > value,
            "lt": date < value,
            "ne": date != value,
        }.get(prefix, False)
        if not ok:
            return False
    return True


def _session_date(schedule: Json) -> str:
    for ext in schedule.get("extension", ()):
        if ext.get("url") == EXT_SESSION_DATE:
            return str(ext.get("valueDate", ""))
    return ""


@get("/Schedule")
async def search_schedules(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    if (fault := await _gate(sim, request, None)) is not None:
        return fault
    dates = request.query_params.getall("date", [])
    updated = request.query_params.getall("_lastUpdated", [])
    matches = [s for s in sim.schedules.values()
               if (not dates or _date_ok(_session_date(s), dates))
               and (not updated or ("meta" in s and _updated_ok(s, updated)))]
    if updated:
        matches = _by_update(matches)
    _log(sim, request, None, 200)
    return _bundle(request, sim, "Schedule", matches)


@get("/Slot")
async def search_slots(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    if (fault := await _gate(sim, request, None)) is not None:
        return fault
    wanted = {
        ref if "/" in ref else f"Schedule/{ref}"
        for value in request.query_params.getall("schedule", [])
        for ref in value.split(",")
    }
    matches = [s for s in sim.slots.values() if not wanted or s["schedule"]["reference"] in wanted]
    _log(sim, request, None, 200)
    return _bundle(request, sim, "Slot", matches)


# -- admin endpoints -----------------------------------------------------------


@get("/_sim/received")
async def received(sim: SimState) -> list[Received]:
    return sim.received


@get("/_sim/appointments")
async def appointments(sim: SimState) -> dict[str, str]:
    return {
        booking: str(a.get("status"))
        for a in sim.appointments.values()
        if (booking := booking_id_of(a)) is not None
    }


@get("/_sim/config")
async def read_config(sim: SimState) -> SimConfig:
    return sim.config


@post("/_sim/config", status_code=200)
async def change_config(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    try:
        patch = msgspec.json.decode(await request.body(), type=dict[str, Any])
        merged = msgspec.convert({**msgspec.to_builtins(sim.config), **patch}, SimConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Response(msgspec.json.encode({"error": str(exc)}), status_code=400)
    sim.configure(merged)
    return Response(msgspec.json.encode(merged), media_type="application/json")


@post("/_sim/schedules", status_code=200)
async def load_schedules(data: list[HisSchedule], sim: SimState) -> dict[str, int]:
    slots = 0
    for schedule in data:
        resource, slot_resources = schedule_resources(schedule)
        old = resource["id"]
        sim.slots = {
            k: v for k, v in sim.slots.items() if v["schedule"]["reference"] != f"Schedule/{old}"
        }
        sim.schedules[old] = _stamp(resource, old, 1, sim.stamp_time())
        for slot in slot_resources:
            sim.slots[slot["id"]] = slot
        slots += len(slot_resources)
    return {"schedules": len(data), "slots": slots}


@post("/_sim/reset", status_code=200)
async def reset(sim: SimState) -> dict[str, bool]:
    sim.reset()
    return {"reset": True}


# -- patients ------------------------------------------------------------------------


@post("/Patient", status_code=201)
async def create_patient(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    resource = _decode_resource(await request.body(), "Patient")
    if (fault := await _gate(sim, request, None)) is not None:
        return fault
    national = next((i.get("value") for i in (resource or {}).get("identifier") or ()
                     if i.get("system") == SYS_NATIONAL_ID), None)
    if resource is None or not isinstance(national, str):
        _log(sim, request, None, 400)
        return _outcome(400, "invalid", f"a Patient with a {SYS_NATIONAL_ID} identifier")
    if request.headers.get("if-none-exist"):
        found = sim.find_patients(national)
        if len(found) > 1:
            _log(sim, request, None, 412)
            return _outcome(412, "multiple-matches", "If-None-Exist matches several")
        if found:
            _log(sim, request, None, 200)
            return _fhir(200, found[0], _patient_headers(found[0]))
    stored = _stamp(resource, sim.next_patient_id(), 1, sim.stamp_time())
    sim.patients[stored["id"]] = stored
    _log(sim, request, None, 201)
    return _fhir(201, stored, _patient_headers(stored))


def _patient_headers(resource: Json) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    return {"ETag": f'W/"{version}"',
            "Location": f"/Patient/{resource['id']}/_history/{version}"}


@get("/Patient")
async def search_patients(request: Request[Any, Any, Any], sim: SimState) -> Response[bytes]:
    if (fault := await _gate(sim, request, None)) is not None:
        return fault
    wanted = [_token(v) for v in request.query_params.getall("identifier", [])]
    matches = [p for w in wanted for p in sim.find_patients(w)] if wanted else list(
        sim.patients.values())
    _log(sim, request, None, 200)
    return _bundle(request, sim, "Patient", matches)


@get("/Patient/{rid:str}")
async def read_patient(rid: str, request: Request[Any, Any, Any], sim: SimState
                       ) -> Response[bytes]:
    if (fault := await _gate(sim, request, None)) is not None:
        return fault
    stored = sim.patients.get(rid)
    if stored is None:
        _log(sim, request, None, 404)
        return _outcome(404, "not-found", f"no Patient/{rid}")
    _log(sim, request, None, 200)
    return _fhir(200, stored, _patient_headers(stored))


# -- changes made at the hospital (injected) ---------------------------------------------


class Inject(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    booking_id: str = ""
    session_id: str = ""
    reason: str = ""


def _change(sim: SimState, stored: Json, **fields: Any) -> Json:
    version = int(stored["meta"]["versionId"]) + 1
    updated = _stamp({**stored, **fields}, stored["id"], version, sim.stamp_time())
    return updated


def subscription_notification(event: int, focus: list[str], timestamp: str) -> Json:
    """An R4 Subscription notification (the backport IG's ``history`` Bundle,
    id-only): its first entry is the subscription status."""
    return {
        "resourceType": "Bundle", "type": "history", "timestamp": timestamp,
        "entry": [{
            "fullUrl": "urn:uuid:8c4a6b7e-0000-4000-8000-00000000000" + str(event % 10),
            "resource": {"resourceType": "Parameters", "parameter": [
                {"name": "subscription", "valueReference": {"reference": "Subscription/hy"}},
                {"name": "status", "valueCode": "active"},
                {"name": "type", "valueCode": "event-notification"},
                {"name": "events-since-subscription-start", "valueString": str(event)},
                *({"name": "notification-event", "part": [
                    {"name": "event-number", "valueString": str(event)},
                    {"name": "focus", "valueReference": {"reference": f}}]} for f in focus)]},
            "request": {"method": "GET", "url": "Subscription/hy/$status"},
            "response": {"status": "200"}}]}


async def _notify(sim: SimState, focus: list[str]) -> None:
    """Push a Subscription notification (R4 backport, id-only): a ping."""
    cfg = sim.config
    if not cfg.notify_url:
        return
    sim.events += 1
    bundle = subscription_notification(sim.events, focus, sim.stamp_time())
    headers = {"Content-Type": FHIR_JSON}
    if cfg.notify_token:
        headers["Authorization"] = f"Bearer {cfg.notify_token}"
    try:
        if sim.http is None:  # one client: a new one per call costs a TLS context
            sim.http = httpx.AsyncClient(timeout=5.0, verify=False)
        resp = await sim.http.post(cfg.notify_url, content=msgspec.json.encode(bundle),
                                   headers=headers)
        sim.notified.append(resp.status_code)
    except httpx.HTTPError:
        sim.notified.append(0)


async def _set_status(sim: SimState, booking: str, status: str, reason: str
                      ) -> Response[bytes]:
    found = sim.find_booking(booking)
    if not found:
        return Response(msgspec.json.encode({"error": "no such booking"}), status_code=404)
    stored = found[0]
    fields: dict[str, Any] = {"status": status}
    if status == "cancelled":
        fields["cancelationReason"] = {"coding": [{"system": "urn:haoyuan:his-reason",
                                                   "code": reason or "window"}],
                                       "text": reason or "cancelled at the window"}
    updated = _change(sim, stored, **fields)
    sim.appointments[stored["id"]] = updated
    await _notify(sim, [f"Appointment/{stored['id']}"])
    return Response(msgspec.json.encode({"id": stored["id"], "status": status,
                                         "version": updated["meta"]["versionId"]}),
                    media_type="application/json")


@post("/_sim/his/cancel", status_code=200)
async def inject_cancel(data: Inject, sim: SimState) -> Response[bytes]:
    return await _set_status(sim, data.booking_id, "cancelled", data.reason or "window")


@post("/_sim/his/arrive", status_code=200)
async def inject_arrive(data: Inject, sim: SimState) -> Response[bytes]:
    return await _set_status(sim, data.booking_id, "arrived", "")


@post("/_sim/his/noshow", status_code=200)
async def inject_noshow(data: Inject, sim: SimState) -> Response[bytes]:
    return await _set_status(sim, data.booking_id, "noshow", "")


@post("/_sim/his/fulfil", status_code=200)
async def inject_fulfil(data: Inject, sim: SimState) -> Response[bytes]:
    return await _set_status(sim, data.booking_id, "fulfilled", "")


@post("/_sim/his/suspend", status_code=200)
async def inject_suspend(data: Inject, sim: SimState) -> Response[bytes]:
    """停诊 entered in the HIS: the Schedule turns inactive, its appointments cancelled."""
    sid = fhir_id(data.session_id)
    old = sim.schedules.get(sid) or {
        "resourceType": "Schedule", "id": sid, "active": True,
        "identifier": [{"system": SYS_SESSION, "value": data.session_id}],
        "meta": {"versionId": "0"}}
    sim.schedules[sid] = _change(sim, old, active=False)
    focus = [f"Schedule/{sid}"]
    prefix = f"Slot/{sid}-"
    for a in list(sim.appointments.values()):
        if a.get("status") == "booked" and any(
                (s.get("reference") or "").startswith(prefix) for s in a.get("slot") or ()):
            sim.appointments[a["id"]] = _change(sim, a, status="cancelled", cancelationReason={
                "coding": [{"system": "urn:haoyuan:his-reason", "code": "doctor_stopped"}],
                "text": data.reason or "停诊"})
            focus.append(f"Appointment/{a['id']}")
    await _notify(sim, focus)
    return Response(msgspec.json.encode({"session_id": data.session_id,
                                         "cancelled": len(focus) - 1}),
                    media_type="application/json")


@get("/_sim/patients")
async def patients(sim: SimState) -> list[Json]:
    return list(sim.patients.values())


@get("/_sim/appointment-resources")
async def appointment_resources(sim: SimState) -> list[Json]:
    return list(sim.appointments.values())


@get("/_sim/notified")
async def notified(sim: SimState) -> list[int]:
    return sim.notified


def create_his_app(config: SimConfig | None = None) -> Litestar:
    """A fresh simulator app with its own state."""
    sim = SimState(config or SimConfig())

    def provide_sim() -> SimState:
        return sim

    app = Litestar(
        route_handlers=[
            create_appointment,
            search_appointments,
            read_appointment,
            update_appointment,
            search_schedules,
            search_slots,
            received,
            appointments,
            read_config,
            change_config,
            load_schedules,
            reset,
            create_patient,
            search_patients,
            read_patient,
            inject_cancel,
            inject_arrive,
            inject_noshow,
            inject_fulfil,
            inject_suspend,
            patients,
            appointment_resources,
            notified,
        ],
        dependencies={"sim": Provide(provide_sim, sync_to_thread=False)},
        openapi_config=None,
    )
    app.state.sim = sim
    return app


# -- running it ------------------------------------------------------------------


_CONFIG_ENV = "HAOYUAN_HIS_SIM_CONFIG"


def app_from_env() -> Litestar:
    """Granian's factory target: the config comes in ``HAOYUAN_HIS_SIM_CONFIG``."""
    raw = os.environ.get(_CONFIG_ENV, "{}")
    return create_his_app(msgspec.json.decode(raw, type=SimConfig))


def run_simulator(
    host: str = "127.0.0.1", port: int = 8090, config: SimConfig | None = None
) -> None:
    """Serve the simulator with granian (one worker: its state is in memory)
    until SIGINT or SIGTERM."""
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    os.environ[_CONFIG_ENV] = msgspec.json.encode(config or SimConfig()).decode()
    Granian(
        target="engine.testing.his_simulator:app_from_env",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        log_level=LogLevels.warning,
        workers_kill_timeout=2,
    ).serve()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class SimulatorProcess:
    """The simulator as a child process on a free loopback port.

    ``with SimulatorProcess(SimConfig()) as sim: ... sim.url ...``
    """

    #: The module run with ``python -m`` (it takes --host, --port, --config).
    module = "engine.testing.his_simulator"

    def __init__(
        self,
        config: Any = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.config = config if config is not None else SimConfig()
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> SimulatorProcess:
        if self._proc is not None:
            raise RuntimeError("simulator already started")
        fixed = self.port is not None
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port(self.host)
            if self._spawn():
                return self
        raise RuntimeError(f"HIS simulator did not start on {self.url}")

    def _spawn(self) -> bool:
        root = str(Path(__file__).parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        cmd = [
            sys.executable,
            "-m",
            self.module,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--config",
            msgspec.json.encode(self.config).decode(),
        ]
        # The child's output goes to our stderr, never to our stdout: commands
        # such as ``haoyuan demo --json`` own their stdout.
        self._proc = subprocess.Popen(cmd, env=env, cwd=root, start_new_session=True, stdout=2)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                if httpx.get(f"{self.url}/_sim/config", timeout=1.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Our child leads its own session: its group is granian's workers.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="haoyuan HIS simulator (FHIR R4 subset)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--config", default="{}", help="SimConfig as JSON")
    args = parser.parse_args(argv)
    config = msgspec.json.decode(args.config, type=SimConfig)
    run_simulator(args.host, args.port, config)


if __name__ == "__main__":
    main()
