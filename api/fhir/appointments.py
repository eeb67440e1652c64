"""Booking through the facade: ``$hold``, ``$book``, read, and cancel by status update.

The same engine decisions as /v1 (``Engine.hold``, ``confirm_paid``,
``Engine.release`` / ``cancel``), so the same rules (one per patient per
department-day, bans, the hospital's active limit, channel pools, release
instants, cut-offs) and rate limits (per patient, and per account: a
client's requests for one patient are one account, ``common.account_for``),
plus the client's own quota (``auth.take_quota``).

``POST /fhir/r4/Appointment/$hold`` (scope ``system/Appointment.write``):
a Parameters resource with ``appt-resource`` (an Appointment whose ``slot``
is the Slot to hold and whose patient participant points at a contained
Patient, or carries ``actor.identifier``), or ``appt-id`` (a proposed
Appointment of ``$find``) with ``patient-resource`` (a Patient); the patient
as ``api.fhir.patients`` resolves it. 200: a searchset Bundle with the
``pending`` Appointment, its expiry in the ``Expires`` header and in
``urn:haoyuan:hold-expires``. Idempotent: ``If-None-Exist:
identifier=<system>|<value>`` (or the Appointment's first ``identifier``)
is the request's key; a retry answers the first hold (``Idempotent-Replayed``).

``POST /fhir/r4/Appointment/$book`` (or ``/Appointment/<id>/$book``):
``appt-id`` (the held Appointment), ``payment-reference`` (valueString, the
payment's reference: it books one hold, ever) and optionally
``payment-amount`` (valueMoney in CNY; the fee when left out). 201 with the
``booked`` Appointment (200 on a replay).

``PUT /fhir/r4/Appointment/<id>`` with ``status`` ``cancelled``, or ``PATCH``
with the JSON Patch ``[{"op": "replace", "path": "/status", "value":
"cancelled"}]``: a held Appointment is released, a booked one cancelled (the
session's cancellation deadline applies). ``GET`` reads one.

Every refusal is an OperationOutcome (``api.fhir.outcomes``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from email.utils import format_datetime
from typing import Any
from urllib.parse import unquote

from litestar import Controller, Request, Response, get, patch, post, put

from api.context import Api, api_of
from api.fhir import common
from api.fhir.auth import client_of, client_required, take_quota
from api.fhir.body import Appointment, Identifier, Parameters, PatchOp, Patient, read_body
from api.fhir.body import decode_resource as convert
from api.fhir.outcomes import OutcomeError, outcome, refused_outcome
from api.fhir.patients import resolve_patient
from api.paying import PaymentRefused, confirm_paid
from api.routes.holds import recovering_now
from engine.outcomes import Held, Reason, Record, RecordState, Refused
from engine.scheduling import ids
from engine.scheduling import resources as fhir
from engine.store.fhir_clients import FhirClient

__all__ = ["AppointmentController"]

AnyRequest = Request[Any, Any, Any]
_PAY_REF = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
_STATUS = {RecordState.HELD: "pending", RecordState.BOOKED: "booked"}


def _http_date(ms: int) -> str:
    return format_datetime(dt.datetime.fromtimestamp(ms / 1000, dt.UTC), usegmt=True)


def _request_key(request: AnyRequest, appt: Appointment | None) -> str | None:
    """The idempotency key of a $hold: If-None-Exist, else the Appointment's identifier."""
    raw = request.headers.get("if-none-exist")
    ident: tuple[str, str] | None = None
    if raw is not None:
        name, eq, value = unquote(raw).partition("=")
        system, bar, val = value.rpartition("|")
        if name.strip() != "identifier" or not eq or not val or len(value) > 300:
            raise OutcomeError.of("invalid-input",
                                  "If-None-Exist: identifier=<system>|<value>")
        ident = (system if bar else "", val)
    elif appt is not None and appt.identifier and appt.identifier[0].value:
        i = appt.identifier[0]
        ident = (i.system or "", i.value or "")
        if len(ident[0]) + len(ident[1]) > 300:
            raise OutcomeError.of("invalid-input", "the Appointment's identifier is too long")
    if ident is None:
        return None
    return hashlib.sha256(f"{ident[0]}|{ident[1]}".encode("utf-8", "surrogatepass")
                          ).hexdigest()[:40]


def _patient_of(appt: Appointment) -> tuple[Patient | None, Identifier | None]:
    for part in appt.participant:
        a = part.actor
        if a is None:
            continue
        if a.reference and a.reference.startswith("#"):
            for c in appt.contained:
                if c.get("resourceType") == "Patient" and c.get("id") == a.reference[1:]:
                    return convert(c, Patient), None
            raise OutcomeError.of("patient-unresolved", "the participant points at no"
                                  " contained Patient")
        if a.identifier is not None and (a.type in (None, "Patient")):
            return None, a.identifier
    return None, None


def _hold_target(body: Parameters | Appointment
                 ) -> tuple[Appointment | None, str, str, Patient | None, Identifier | None]:
    """(the Appointment sent, session, slot, patient) of a $hold body."""
    appt: Appointment | None
    patient: Patient | None = None
    ident: Identifier | None = None
    if isinstance(body, Appointment):
        appt = body
    else:
        p = body.one("appt-resource")
        appt = convert(p.resource, Appointment) if p is not None and p.resource else None
        if appt is None:
            a = body.one("appt-id")
            target = ids.parse_proposed_id((a.text or "").rpartition("/")[2]) if a else None
            if target is None:
                raise OutcomeError.of("invalid-input", "give appt-resource (an Appointment"
                                      " with its slot and patient), or appt-id (a proposed"
                                      " Appointment of $find) with patient-resource")
            pr = body.one("patient-resource")
            if pr is not None and pr.resource:
                patient = convert(pr.resource, Patient)
            return None, target[0], target[1], patient, None
    if len(appt.slot) != 1 or not appt.slot[0].reference:
        raise OutcomeError.of("invalid-input", "the Appointment names one slot: Slot/<id>")
    got = ids.parse_slot_id(appt.slot[0].reference.rpartition("/")[2])
    if got is None:
        raise OutcomeError.of("not-found", "no such Slot")
    patient, ident = _patient_of(appt)
    return appt, got[0], got[1], patient, ident


def _appointment(rec: Record, info: Any, status: str | None = None) -> dict[str, Any]:
    st = status or _STATUS.get(rec.state, "cancelled")
    return fhir.appointment(
        ids.appointment_id(rec.id), st, info, rec.slot_id, record_id=rec.id, unit=rec.unit,
        expires_ms=rec.deadline_ms if st == "pending" else None,
        created_ms=rec.at_ms or None, fee=rec.fee)


async def _refused(api: Api, out: Refused, session_id: str) -> Response[Any]:
    if out.reason is Reason.NOT_FOUND and out.what == "session" \
            and await api.session_recovering(session_id):
        out = recovering_now(api)
    return refused_outcome(out)


class AppointmentController(Controller):
    path = common.PATH
    tags = ("fhir",)

    @post("/Appointment/$hold", status_code=200,
          before_request=client_required("Appointment", "write"),
          summary="Argonaut $hold: hold a unit of a slot for a patient (our TTL hold)")
    async def hold(self, request: AnyRequest) -> Response[Any]:
        """200: a Bundle with the ``pending`` Appointment (``Expires``: when the
        hold lapses unless booked); an OperationOutcome otherwise (409
        ``sold-out``, ``not-open`` with the release instant, ``duplicate``;
        429 ``rate-limited`` with Retry-After; 403 ``patient-unverified``;
        503 ``recovering``)."""
        api = api_of(request)
        client = client_of(request)
        body: Parameters | Appointment = await read_body(request, Parameters | Appointment)
        appt, sid, slot, patient, ident = _hold_target(body)
        key = _request_key(request, appt)
        info = await common.session_info(api, sid)
        if info is None or all(x.slot_id != slot for x in info.slots):
            raise OutcomeError.of("not-found", "no such Slot")
        ref = await resolve_patient(api, client, patient, ident)
        await take_quota(api, client)
        if not api.admission.enter():
            return outcome("overloaded", "too many requests in flight; retry shortly",
                           headers={"Retry-After": "1"})
        t0 = time.perf_counter()
        try:
            out = await api.engine.hold(sid, slot, patient=ref,
                                        account=common.account_for(client, ref),
                                        idempotency_key=key)
        finally:
            api.admission.leave()
            api.metrics.engine_call("hold", time.perf_counter() - t0)
        if not isinstance(out, Held):
            api.metrics.decision("fhir-hold", out.reason.value)
            if out.reason is Reason.SOLD_OUT and not out.replay:
                api.soldout.mark(sid, slot)
            elif out.reason is Reason.NOT_OPEN and out.release_at_ms is not None:
                api.release_times.set(sid, out.release_at_ms)
            return await _refused(api, out, sid)
        api.metrics.decision("fhir-hold", "held")
        fid = ids.appointment_id(out.hold_id)
        body_out = fhir.appointment(fid, "pending", info, slot, record_id=out.hold_id,
                                    unit=out.unit, expires_ms=out.expires_at_ms,
                                    created_ms=out.server_ms, fee=info.fee)
        base = common.base_url(api)
        headers = {"Expires": _http_date(out.expires_at_ms),
                   "Location": f"{base}/Appointment/{fid}"}
        if out.replay:
            headers["Idempotent-Replayed"] = "true"
        return common.answer(fhir.bundle(base, [body_out], total=1), 200, headers)

    @post("/Appointment/$book", status_code=201,
          before_request=client_required("Appointment", "write"),
          summary="Argonaut $book: the held appointment is paid and booked")
    async def book(self, request: AnyRequest) -> Response[Any]:
        """``appt-id``, ``payment-reference``, optional ``payment-amount``
        (CNY): 201 with the ``booked`` Appointment (200 on a replay); 409
        ``expired`` (refund due), ``payment-reused``, ``already-paid``."""
        return await _book(request, None)

    @post("/Appointment/{appt_id:str}/$book", status_code=201,
          before_request=client_required("Appointment", "write"),
          summary="Argonaut $book on one held appointment")
    async def book_one(self, request: AnyRequest, appt_id: str) -> Response[Any]:
        return await _book(request, appt_id)

    @get("/Appointment/{appt_id:str}", before_request=client_required("Appointment", "read"),
         summary="One of the client's appointments (holds and bookings)")
    async def read(self, request: AnyRequest, appt_id: str) -> Response[Any]:
        api = api_of(request)
        rec = await common.own_record(api, client_of(request), appt_id)
        info = await common.session_info(api, rec.session_id)
        return common.answer(_appointment(rec, info))

    @put("/Appointment/{appt_id:str}", status_code=200,
         before_request=client_required("Appointment", "write"),
         summary="Cancel: the Appointment with status cancelled")
    async def update(self, request: AnyRequest, appt_id: str) -> Response[Any]:
        """Only ``status`` may change, to ``cancelled``: a hold is released, a
        booking cancelled (409 ``cancel-deadline`` after the session's deadline)."""
        body: Appointment = await read_body(request, Appointment)
        if body.id is not None and body.id != appt_id:
            raise OutcomeError.of("invalid-input", "the Appointment's id is not the one in the"
                                  " path")
        return await _cancel(request, appt_id, body.status)

    @patch("/Appointment/{appt_id:str}", status_code=200,
           before_request=client_required("Appointment", "write"),
           summary="Cancel: JSON Patch of the status to cancelled")
    async def patch(self, request: AnyRequest, appt_id: str) -> Response[Any]:
        ops: list[PatchOp] = await read_body(request, list[PatchOp], "patch")
        if len(ops) != 1 or ops[0].op != "replace" or ops[0].path != "/status" \
                or not isinstance(ops[0].value, str):
            raise OutcomeError.of("invalid-input", 'one operation: {"op": "replace", "path":'
                                  ' "/status", "value": "cancelled"}')
        return await _cancel(request, appt_id, ops[0].value)


async def _book(request: AnyRequest, appt_id: str | None) -> Response[Any]:
    api = api_of(request)
    client = client_of(request)
    body: Parameters | Appointment = await read_body(request, Parameters | Appointment)
    if isinstance(body, Appointment):
        raise OutcomeError.of("invalid-input", "send a Parameters resource with appt-id and"
                              " payment-reference")
    if appt_id is None:
        a = body.one("appt-id")
        appt_id = (a.text or "").rpartition("/")[2] if a is not None else ""
    pay = body.one("payment-reference")
    ref = pay.value_string if pay is not None else None
    if not ref or not _PAY_REF.fullmatch(ref):
        raise OutcomeError.of("invalid-input", "payment-reference (valueString):"
                              " [A-Za-z0-9_.:-]{1,64}")
    rec = await common.own_record(api, client, appt_id)
    fee = int(rec.fee or 0)
    amount = fee
    money = body.one("payment-amount")
    if money is not None:
        m = money.value_money
        if m is None or m.value is None or (m.currency or "CNY") != "CNY" \
                or not 0 <= m.value <= 10_000_000:
            raise OutcomeError.of("invalid-input", "payment-amount: valueMoney in CNY")
        amount = round(m.value * 100)
        if amount != fee:
            return outcome("amount-mismatch", f"the fee of this hold is {fee / 100:.2f} CNY")
    await take_quota(api, client)
    if not api.admission.enter():
        return outcome("overloaded", "too many requests in flight; retry shortly",
                       headers={"Retry-After": "1"})
    try:
        out = await confirm_paid(api, rec.id, ref, amount)
    finally:
        api.admission.leave()
    if isinstance(out, PaymentRefused):
        api.metrics.decision("fhir-book", out.kind)
        return outcome(out.kind, out.detail, server_ms=out.server_ms,
                       refund_due=out.refund_due)
    if isinstance(out, Refused):
        api.metrics.decision("fhir-book", out.reason.value)
        return await _refused(api, out, rec.session_id)
    booked = out.booked
    api.metrics.decision("fhir-book", "booked")
    info = await common.session_info(api, rec.session_id)
    fid = ids.appointment_id(booked.booking_id)
    res = fhir.appointment(fid, "booked", info, booked.slot_id, record_id=booked.booking_id,
                           unit=booked.unit, created_ms=rec.at_ms or None, fee=rec.fee)
    base = common.base_url(api)
    headers = {"Location": f"{base}/Appointment/{fid}"}
    if booked.replay:
        headers["Idempotent-Replayed"] = "true"
    return common.answer(fhir.bundle(base, [res], total=1), 200 if booked.replay else 201, headers)


async def _cancel(request: AnyRequest, appt_id: str, status: str | None) -> Response[Any]:
    api = api_of(request)
    client: FhirClient = client_of(request)
    if status != "cancelled":
        raise OutcomeError.of("invalid-input", "only the status may change, to cancelled")
    rec = await common.own_record(api, client, appt_id)
    info = await common.session_info(api, rec.session_id)
    if rec.state not in (RecordState.HELD, RecordState.BOOKED):
        return common.answer(_appointment(rec, info, "cancelled"))  # already ended
    await take_quota(api, client)
    if not api.admission.enter():
        return outcome("overloaded", "too many requests in flight; retry shortly",
                       headers={"Retry-After": "1"})
    try:
        if rec.state is RecordState.HELD:
            out: Any = await api.engine.release(rec.id, account=rec.account)
        else:
            out = await api.engine.cancel(rec.id, account=rec.account, reason="patient")
    finally:
        api.admission.leave()
    if isinstance(out, Refused):
        api.metrics.decision("fhir-cancel", out.reason.value)
        if out.reason is Reason.INVALID_STATE:  # it ended meanwhile (expired, paid)
            now = await api.engine.record(rec.id)
            if now is not None and now.state is RecordState.BOOKED:
                raise OutcomeError.of("invalid-state", "the hold was booked meanwhile: cancel"
                                      " the booking")
            return common.answer(_appointment(now or rec, info, "cancelled"))
        return await _refused(api, out, rec.session_id)
    api.metrics.decision("fhir-cancel", "cancelled")
    api.soldout.clear(rec.session_id)
    return common.answer(_appointment(rec, info, "cancelled"))
