"""The account's bookings (预约): list, look at one, cancel one.

The list comes from PostgreSQL (the record, written by the outbox writer a
moment after confirmation); one booking's state comes from Redis (current)
with its HIS status from PostgreSQL once persisted.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Controller, Request, Response, get, post
from litestar.params import HeaderParameter

from api import catalog
from api.context import api_of
from api.docs import ACCOUNT, errors
from api.guards import account_of, account_required
from api.patient_words import reason_text, refund_text
from api.problems import json_response, refused
from api.routes.holds import not_found, own_record, recovering_or_not_found, shed
from api.schemas import (
    HOLD_ID_RE,
    IDEMPOTENCY_RE,
    BookingOut,
    CancelledOut,
    RefundView,
    RescheduledOut,
    RescheduleIn,
)
from engine.outcomes import Reason, RecordState, Refused
from engine.store import queries as q
from engine.store.payments import REFUND_COLS, RefundOrder, refund_order

log = structlog.get_logger("haoyuan.api")
_encode = msgspec.json.Encoder().encode
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_BOOKED_STATES = frozenset({RecordState.BOOKED, RecordState.CANCELLED, RecordState.REFUND_DUE})


def _ms(t: dt.datetime | None) -> int | None:
    return None if t is None else (t - _EPOCH) // dt.timedelta(milliseconds=1)


_CST = dt.timezone(dt.timedelta(hours=8))


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(_CST).isoformat()


def _row(r: q.BookingRow, refund: RefundOrder | None = None) -> BookingOut:
    return BookingOut(
        booking_id=r.id, session_id=r.session_id, slot_id=r.slot_id, unit=r.unit,
        status=r.status, fee=r.fee_cents, booked_at_ms=_ms(r.booked_at),
        cancelled_at_ms=_ms(r.cancelled_at), his_status=r.his_status,
        his_appointment_id=r.his_id if r.his_status not in ("pending", "unknown") else None,
        visit_start=_iso(r.his_visit_start), visit_end=_iso(r.his_visit_end), place=r.his_place,
        reason_text=reason_text(r.status, r.status_reason, r.his_status, r.his_reason),
        refund=None if refund is None else RefundView(
            state=refund.state, amount=refund.amount, state_text=refund_text(refund.state)),
    )


async def _refunds(db: q.Queryable, ids: list[str]) -> dict[str, RefundOrder]:
    if not ids:
        return {}
    rows = await db.fetch(f"SELECT {REFUND_COLS} FROM refund_orders"
                          " WHERE booking_id = any($1::text[])", ids)
    return {r["booking_id"]: refund_order(r) for r in rows}


class BookingController(Controller):
    path = "/v1/bookings"
    tags = ("book",)
    before_request = staticmethod(account_required)
    security = ACCOUNT

    @get("/", responses=errors(401), summary="The account's bookings, newest first")
    async def list_(self, request: Request[Any, Any, Any]) -> list[BookingOut]:
        api = api_of(request)
        rows = await q.bookings_for_account(api.pool, account_of(request))
        refunds = await _refunds(api.pool, [r.id for r in rows])
        return [_row(r, refunds.get(r.id)) for r in rows]

    @get("/{booking_id:str}", responses=errors(401, 404), summary="One of the account's bookings")
    async def view(self, request: Request[Any, Any, Any], booking_id: str) -> BookingOut:
        api = api_of(request)
        path: str = request.scope["path"]
        rec = await own_record(api, booking_id, account_of(request), path)
        if rec.state not in _BOOKED_STATES:
            raise not_found(path, "booking")
        status = rec.state.label
        row = await q.booking_by_id(api.pool, booking_id)
        seen = None if row is None else _row(
            row, (await _refunds(api.pool, [booking_id])).get(booking_id))
        return BookingOut(
            booking_id=rec.id, session_id=rec.session_id, slot_id=rec.slot_id,
            unit=rec.unit, status=status,  # type: ignore[arg-type]
            fee=rec.fee, booked_at_ms=rec.booked_at_ms or None,
            cancelled_at_ms=rec.ended_ms or None if status == "cancelled" else None,
            his_status=None if row is None else row.his_status,
            late=bool(rec.late),
            his_appointment_id=None if seen is None else seen.his_appointment_id,
            visit_start=None if seen is None else seen.visit_start,
            visit_end=None if seen is None else seen.visit_end,
            place=None if seen is None else seen.place,
            reason_text=None if seen is None else seen.reason_text,
            refund=None if seen is None else seen.refund,
        )

    @post("/{booking_id:str}/reschedule", status_code=200,
          responses=errors(401, 403, 404, 409, 422, 429),
          summary="Move one of the account's bookings to another session or slot (改约)")
    async def reschedule(
        self, request: Request[Any, Any, Any], booking_id: str, data: RescheduleIn,
        idempotency_key: Annotated[str | None, HeaderParameter(
            name="Idempotency-Key", min_length=1, max_length=64,
            pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
    ) -> Response[RescheduledOut]:
        """The new unit is certain before the old booking goes: 409 sold-out
        (and every refusal) leaves the old booking as it was. The new booking
        is paid by the old one's payment; a fee difference is recorded for
        finance (``fee_difference``). Refused inside the old session's cancel
        deadline; within a day of the visit it counts as a late cancel; the
        hospital's rules may limit reschedules (409 limit-reached)."""
        api = api_of(request)
        path: str = request.scope["path"]
        if not HOLD_ID_RE.fullmatch(booking_id):
            raise not_found(path, "booking")
        if idempotency_key is not None and not IDEMPOTENCY_RE.fullmatch(idempotency_key):
            idempotency_key = None
        account = account_of(request)
        rules = await catalog.rules_for_session(api.pool, booking_id.split(".")[1])
        if not api.admission.enter():
            return shed(api, "reschedule", path)
        try:
            out = await api.engine.reschedule(
                booking_id, account=account, session_id=data.session_id,
                slot_id=data.slot_id, idempotency_key=idempotency_key,
                max_reschedules=rules.max_reschedules)
            if isinstance(out, Refused) and out.reason is Reason.NOT_FOUND \
                    and out.what == "partition":
                out = await api.engine.reschedule_across(
                    booking_id, account=account, session_id=data.session_id,
                    slot_id=data.slot_id, max_reschedules=rules.max_reschedules,
                    idempotency_key=idempotency_key)
        finally:
            api.admission.leave()
        if isinstance(out, Refused):
            api.metrics.decision("reschedule", out.reason.value)
            if out.reason is Reason.NOT_FOUND and out.what == "booking":
                raise await recovering_or_not_found(api, booking_id, path, "booking")
            return refused(out, path)
        api.metrics.decision("reschedule", "rescheduled")
        api.soldout.clear(data.session_id)
        api.soldout.clear(booking_id.split(".")[1])
        body = RescheduledOut(
            booking_id=out.booking_id, previous_id=out.previous_id, session_id=out.session_id,
            slot_id=out.slot_id, unit=out.unit, fee=out.fee, previous_fee=out.previous_fee,
            fee_difference=out.fee - out.previous_fee, late=out.late, server_ms=out.server_ms,
            replay=out.replay)
        return json_response(_encode(body))

    @post("/{booking_id:str}/cancel", status_code=200, responses=errors(401, 404, 409, 429),
          summary="Cancel one of the account's bookings")
    async def cancel(
        self, request: Request[Any, Any, Any], booking_id: str
    ) -> Response[CancelledOut]:
        """Idempotent; refused after the session's cancellation deadline (409)."""
        api = api_of(request)
        path: str = request.scope["path"]
        if not HOLD_ID_RE.fullmatch(booking_id):
            raise not_found(path, "booking")
        if not api.admission.enter():
            return shed(api, "cancel", path)
        try:
            out = await api.engine.cancel(booking_id, account=account_of(request), reason="patient")
        finally:
            api.admission.leave()
        if isinstance(out, Refused):
            api.metrics.decision("cancel", out.reason.value)
            if out.reason is Reason.NOT_FOUND:
                raise await recovering_or_not_found(api, booking_id, path, "booking")
            return refused(out, path)
        api.metrics.decision("cancel", "cancelled")
        api.soldout.clear(booking_id.split(".")[1])
        body = CancelledOut(booking_id=booking_id, server_ms=out.server_ms, reason=out.reason,
                            replay=out.replay)
        return json_response(_encode(body))
