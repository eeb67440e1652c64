"""Admin, hospital rules: the rules per hospital, attendance and bans (the
no-show policy), and holds made by staff for the staff channels (号源池).

Staff tokens as ``api.routes.admin``: rules and ban lifts need an operator,
attendance a window clerk or an operator, staff-channel holds a window
clerk; every change is a row of the staff audit trail. Sessions imported with
``?apply_rules=true`` take their release calendar, pools, waitlist and
deadlines from the rules stored here (``engine.rules.apply_rules``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.params import HeaderParameter

from api import catalog
from api.context import api_of
from api.docs import ADMIN, errors
from api.guards import admin_required, staff_of, staff_required
from api.problems import ProblemError, json_response, refused
from api.schemas import HOLD_ID_RE, AttendanceIn, BanLiftedOut, HoldOut, StaffHoldIn
from api.trail import record
from engine.outcomes import Held
from engine.pii import InvalidNationalId
from engine.rules import (
    AttendanceResult,
    HospitalRules,
    Rules,
    lift_ban,
    load_rules,
    record_attendance,
    save_rules,
)

_NAME = re.compile(r"[^\s|\x00-\x1f\x7f\ud800-\udfff]{1,64}")  # as engine.model.Name
_REF = re.compile(r"[A-Za-z0-9_:.-]{1,128}", re.ASCII)
_encode = msgspec.json.Encoder().encode
_REPLAYED = {"Idempotent-Replayed": "true"}
_OPERATOR = staff_required("operator")

__all__ = ["RulesController"]


def _validate(rules: HospitalRules) -> str | None:
    """What is wrong with a department override, or None (they are partial objects)."""
    base = msgspec.structs.asdict(rules.default)
    for dept, doc in rules.departments.items():
        if not _NAME.fullmatch(dept):
            return "department ids are 1..64 characters without spaces or '|'"
        try:
            msgspec.convert(base | doc, Rules)
        except msgspec.ValidationError as exc:
            return f"departments.{dept}: {exc}"
    return None


class RulesController(Controller):
    path = "/v1/admin"
    tags = ("admin",)
    before_request = staticmethod(admin_required)
    security = ADMIN

    @get("/rules/{hospital_id:str}", responses=errors(401, 403, 404), before_request=_OPERATOR,
         summary="A hospital's rules (the defaults if none are stored)")
    async def get_rules(self, request: Request[Any, Any, Any], hospital_id: str) -> HospitalRules:
        if not _NAME.fullmatch(hospital_id):
            raise ProblemError.of("not-found", "no such hospital", instance=request.scope["path"])
        return await load_rules(api_of(request).pool, hospital_id)

    @put("/rules/{hospital_id:str}", responses=errors(401, 403, 404, 422),
         before_request=_OPERATOR,
         summary="Replace a hospital's rules (default and department overrides)")
    async def put_rules(
        self, request: Request[Any, Any, Any], hospital_id: str, data: HospitalRules
    ) -> HospitalRules:
        """Apply to sessions imported afterwards with ``?apply_rules=true``, to
        the no-show policy at once. Department overrides are partial objects
        of the same fields; an unknown field or a value out of range is a 422."""
        path: str = request.scope["path"]
        if not _NAME.fullmatch(hospital_id):
            raise ProblemError.of("not-found", "no such hospital", instance=path)
        wrong = _validate(data)
        if wrong is not None:
            raise ProblemError.of("invalid-input", wrong, instance=path)
        api = api_of(request)
        await save_rules(api.pool, hospital_id, data)
        await record(request, "rules.put", hospital_id,
                     departments=sorted(data.departments))
        return await load_rules(api.pool, hospital_id)

    @post("/bookings/{booking_id:str}/attendance", status_code=200,
          responses=errors(401, 403, 404, 422), before_request=staff_required("clerk", "operator"),
          summary="Record whether the patient came (no-shows may ban the patient)")
    async def attendance(
        self, request: Request[Any, Any, Any], booking_id: str, data: AttendanceIn
    ) -> AttendanceResult:
        """Counts the patient's no-shows (and late cancels, if the hospital says
        so) in the hospital's window; at the limit the patient is banned
        (``banned_until_ms``). 404 for a booking that is unknown to the record
        (PostgreSQL) or not booked."""
        api = api_of(request)
        path: str = request.scope["path"]
        if not HOLD_ID_RE.fullmatch(booking_id):
            raise ProblemError.of("not-found", "no such booking", instance=path)
        rules = await catalog.rules_for_session(api.pool, booking_id.split(".")[1])
        out = await record_attendance(api.pool, api.engine, booking_id, data.attended, rules)
        if out is None:
            raise ProblemError.of("not-found", "no such booked booking", instance=path)
        await record(request, "booking.attendance", booking_id, attended=data.attended,
                     banned_until_ms=out.banned_until_ms)
        return out

    @delete("/patients/{patient_ref:str}/ban", status_code=200, responses=errors(401, 403, 404),
            before_request=_OPERATOR,
            summary="Lift a patient's ban")
    async def lift(self, request: Request[Any, Any, Any], patient_ref: str) -> BanLiftedOut:
        """Idempotent: ``lifted`` counts the bans lifted by this call (0 if none)."""
        api = api_of(request)
        if not _REF.fullmatch(patient_ref):
            raise ProblemError.of("not-found", "no such patient", instance=request.scope["path"])
        n = await lift_ban(api.pool, api.engine, patient_ref, staff_of(request).id)
        await record(request, "ban.lift", patient_ref, lifted=n)
        return BanLiftedOut(patient_ref=patient_ref, lifted=n)

    @post("/holds", status_code=201, responses=errors(401, 403, 404, 409, 422, 429),
          before_request=staff_required("clerk"),
          summary="Hold a unit for a patient of a staff channel (phone, window, referral)")
    async def staff_hold(
        self,
        request: Request[Any, Any, Any],
        data: StaffHoldIn,
        idempotency_key: Annotated[str | None, HeaderParameter(
            name="Idempotency-Key", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]{1,64}$",
            description="Send the same key on a retry: it returns the first answer")] = None,
    ) -> Response[HoldOut]:
        """Draws from the channel's pool first, then the public pool (after the
        pools' return time, from the public pool only). The hold's account is
        ``staff:<channel>``; it is paid through the usual payment callback
        (``POST /v1/holds/{id}/confirm``). Refusals as for ``POST /v1/holds``."""
        api = api_of(request)
        path: str = request.scope["path"]
        if (data.national_id is None) == (data.patient_ref is None):
            raise ProblemError.of("invalid-input", "give the patient's national_id (or, from an"
                                  " integration, patient_ref): exactly one", instance=path)
        if data.national_id is not None:
            try:
                ref = api.crypto.id_hash(data.national_id)
            except InvalidNationalId as exc:
                raise ProblemError.of("invalid-national-id", str(exc), instance=path) from None
        else:
            ref = str(data.patient_ref)
        out = await api.engine.hold(data.session_id, data.slot_id, patient=ref,
                                    account=f"staff:{data.channel}",
                                    idempotency_key=idempotency_key, channel=data.channel)
        if not isinstance(out, Held):
            api.metrics.decision("staff_hold", out.reason.value)
            return refused(out, path)
        api.metrics.decision("staff_hold", "held")
        if not out.replay:
            await record(request, "hold.staff", out.hold_id, session_id=out.session_id,
                         slot_id=out.slot_id, channel=data.channel, patient_ref=ref)
        api.availability_cache.forget("s:" + data.session_id)
        body = HoldOut(out.hold_id, out.session_id, out.slot_id, out.unit,
                       out.expires_at_ms, out.server_ms, out.replay)
        return json_response(_encode(body), 201, _REPLAYED if out.replay else None)

