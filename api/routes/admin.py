"""Admin (staff tokens, by role): import sessions, change capacity, suspend or
resume a session (operator), look up a booking (any staff), run the audit
(operator, finance). Every change is a row of the staff audit trail."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.params import QueryParameter

from api import catalog
from api.context import api_of
from api.docs import ADMIN, errors
from api.guards import admin_required, staff_required
from api.problems import ProblemError, refused
from api.schemas import HOLD_ID_RE, CapacityIn, SuspendIn
from api.trail import record
from engine.model import SessionSpec
from engine.outcomes import Loaded, Refused, SlotLoad
from engine.rules import HospitalRules, apply_rules, load_rules
from engine.schedule_import import import_loaded
from engine.store import queries as q


class Imported(msgspec.Struct, frozen=True):
    sessions: list[Loaded]


class SuspendedOut(msgspec.Struct, frozen=True):
    session_id: str
    cancelled: int
    released: int
    server_ms: int


class ResumedOut(msgspec.Struct, frozen=True):
    session_id: str
    status: str = "open"


class PausedOut(msgspec.Struct, frozen=True):
    sessions: list[str]
    status: str = "paused"


_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


class AuditBreach(msgspec.Struct, frozen=True):
    session_id: str
    breach: str


class AuditOut(msgspec.Struct, frozen=True):
    ok: bool
    sessions: int
    breaches: list[AuditBreach]
    run_id: int | None = None


class AdminBookingOut(msgspec.Struct, frozen=True, kw_only=True):
    booking_id: str
    session_id: str
    slot_id: str
    unit: int | None
    account_id: str
    state: str
    fee: int | None = None
    payment_ref: str | None = None
    persisted: bool = False
    status: str | None = None
    his_status: str | None = None
    his_id: str | None = None


_MAX_IMPORT = 500
SessionList = Annotated[list[SessionSpec], msgspec.Meta(min_length=1, max_length=_MAX_IMPORT)]
_OPERATOR = staff_required("operator")


class AdminController(Controller):
    path = "/v1/admin"
    tags = ("admin",)
    before_request = staticmethod(admin_required)
    security = ADMIN

    @post("/sessions", status_code=200, responses=errors(401, 403, 409, 422),
          before_request=_OPERATOR,
          summary="Import sessions (the engine's session JSON): catalogue and inventory")
    async def import_sessions(
        self,
        request: Request[Any, Any, Any],
        data: SessionList,
        with_rules: Annotated[bool, QueryParameter(
            name="apply_rules",
            description="Apply the stored rules of each session's hospital and department"
                        " (release calendar, cut-off, pools, waitlist, deadlines)")] = False,
    ) -> Imported:
        """Idempotent. Written to PostgreSQL (the catalogue) first, then loaded
        into the engine; a session cannot move to another department, doctor
        or date (409). With ``apply_rules=true`` the hospital's rules (``PUT
        /v1/admin/rules/{hospital_id}``, the defaults if none) replace the
        session's calendar, pools, waitlist and deadline fields."""
        api = api_of(request)
        if not 1 <= len(data) <= _MAX_IMPORT:
            raise ProblemError.of("invalid-input", f"send 1..{_MAX_IMPORT} sessions",
                                  instance=request.scope["path"])
        if with_rules:
            per_hospital: dict[str, HospitalRules] = {}
            for s in data:
                if s.hospital not in per_hospital:
                    per_hospital[s.hospital] = await load_rules(api.pool, s.hospital)
            try:
                data = [apply_rules(s, per_hospital[s.hospital].for_dept(s.dept)) for s in data]
            except ValueError:  # a bad date; rules stored before validation of overrides
                raise ProblemError.of("invalid-input", "the rules cannot be applied",
                                      instance=request.scope["path"]) from None
        for s in data:  # the schema's pattern lets 2026-02-31 through; PostgreSQL would not
            try:
                dt.date.fromisoformat(s.date)
            except ValueError:
                raise ProblemError.of("invalid-input", f"session {s.session_id}: no such date",
                                      instance=request.scope["path"]) from None
        try:
            loaded = await import_loaded(api.engine, api.pool, data)
        except q.ScheduleConflict as exc:
            raise ProblemError.of("schedule-conflict", str(exc),
                                  instance=request.scope["path"]) from None
        except ValueError as exc:  # duplicate session ids
            raise ProblemError.of("invalid-input", str(exc),
                                  instance=request.scope["path"]) from None
        await record(request, "sessions.import", None, sessions=[s.session_id for s in data],
                     apply_rules=with_rules)
        for s in data:
            api.release_times.forget(s.session_id)
            api.soldout.clear(s.session_id)
            api.availability_cache.forget("s:" + s.session_id)
        api.catalog_cache.clear()
        return Imported(sessions=loaded)

    @put("/sessions/{session_id:str}/slots/{slot_id:str}/capacity", before_request=_OPERATOR,
         responses=errors(401, 403, 404, 409, 422), summary="Change a slot's capacity")
    async def capacity(
        self, request: Request[Any, Any, Any], session_id: str, slot_id: str, data: CapacityIn
    ) -> SlotLoad:
        """``requested`` is what was asked; ``capacity`` what the engine set (it
        never takes back held or booked units)."""
        api = api_of(request)
        out = await api.engine.set_capacity(session_id, slot_id, data.capacity)
        if isinstance(out, Refused):
            raise ProblemError(refused(out, request.scope["path"]))
        await catalog.set_slot_capacity(api.pool, session_id, slot_id, out.capacity)
        await record(request, "slot.capacity", f"{session_id}/{slot_id}",
                     requested=data.capacity, capacity=out.capacity)
        api.soldout.clear(session_id)
        api.availability_cache.forget("s:" + session_id)
        api.catalog_cache.clear()
        return out

    @post("/sessions/{session_id:str}/suspend", status_code=200, before_request=_OPERATOR,
          responses=errors(401, 403, 404, 409, 422), summary="Suspend a session (停诊)")
    async def suspend(
        self, request: Request[Any, Any, Any], session_id: str, data: SuspendIn
    ) -> SuspendedOut:
        """Every hold is released and every booking cancelled (and refunded)."""
        api = api_of(request)
        out = await api.engine.suspend(session_id, data.reason)
        if isinstance(out, Refused):
            raise ProblemError(refused(out, request.scope["path"]))
        await q.set_session_status(api.pool, session_id, "suspended")
        await record(request, "session.suspend", session_id, reason=data.reason,
                     cancelled=out.cancelled, released=out.released)
        api.availability_cache.forget("s:" + session_id)
        api.catalog_cache.clear()
        return SuspendedOut(out.session_id, out.cancelled, out.released, out.server_ms)

    @post("/sessions/{session_id:str}/resume", status_code=200, before_request=_OPERATOR,
          responses=errors(401, 403, 404),
          summary="Reopen a suspended or paused session")
    async def resume(self, request: Request[Any, Any, Any], session_id: str) -> ResumedOut:
        api = api_of(request)
        if not await api.engine.resume(session_id):
            raise ProblemError.of("not-found", "no such session", instance=request.scope["path"])
        await q.set_session_status(api.pool, session_id, "open")
        await record(request, "session.resume", session_id)
        api.availability_cache.forget("s:" + session_id)
        api.catalog_cache.clear()
        return ResumedOut(session_id)

    @post("/sessions/{session_id:str}/pause", status_code=200, before_request=_OPERATOR,
          responses=errors(401, 403, 404, 409, 422), summary="Pause sales of a session (暂停放号)")
    async def pause(self, request: Request[Any, Any, Any], session_id: str,
                    data: SuspendIn) -> PausedOut:
        """No new holds or waitlist joins (they answer 409 ``paused``) until
        ``/resume``; bookings and holds stand. 409 ``invalid-state`` for a
        suspended (停诊) session."""
        api = api_of(request)
        out = await api.engine.pause(session_id, data.reason)
        if out is not None:
            raise ProblemError(refused(out, request.scope["path"]))
        await q.set_session_status(api.pool, session_id, "paused")
        await record(request, "session.pause", session_id, reason=data.reason)
        self._forget(api, session_id)
        return PausedOut([session_id])

    @post("/departments/{dept_id:str}/days/{date:str}/pause", status_code=200,
          before_request=_OPERATOR, responses=errors(401, 403, 404, 422),
          summary="Pause sales of every session of a department-day (暂停放号)")
    async def pause_day(self, request: Request[Any, Any, Any], dept_id: str, date: str,
                        data: SuspendIn) -> PausedOut:
        """Every open session of the department-day; suspended ones stay as
        they are. 404 if the department-day has no session."""
        api = api_of(request)
        sids = await self._dept_day(request, dept_id, date)
        paused = []
        for sid in sids:
            if await api.engine.pause(sid, data.reason) is None:
                await q.set_session_status(api.pool, sid, "paused")
                self._forget(api, sid)
                paused.append(sid)
        await record(request, "dept_day.pause", f"{dept_id}/{date}", reason=data.reason,
                     sessions=paused)
        return PausedOut(paused)

    @post("/departments/{dept_id:str}/days/{date:str}/resume", status_code=200,
          before_request=_OPERATOR, responses=errors(401, 403, 404),
          summary="Reopen the paused sessions of a department-day")
    async def resume_day(self, request: Request[Any, Any, Any], dept_id: str,
                         date: str) -> PausedOut:
        api = api_of(request)
        sids = await self._dept_day(request, dept_id, date)
        resumed = []
        for sid in sids:
            if await api.engine.session_status(sid) == "paused" and await api.engine.resume(sid):
                await q.set_session_status(api.pool, sid, "open")
                self._forget(api, sid)
                resumed.append(sid)
        await record(request, "dept_day.resume", f"{dept_id}/{date}", sessions=resumed)
        return PausedOut(resumed, status="open")

    @staticmethod
    async def _dept_day(request: Request[Any, Any, Any], dept_id: str, date: str) -> list[str]:
        """The sessions of a department-day Redis has; 404 if none."""
        sids = await api_of(request).engine.dept_day_sessions(dept_id, date) \
            if _SAFE.fullmatch(dept_id) and _SAFE.fullmatch(date) else []
        if not sids:
            raise ProblemError.of("not-found", "no session that department-day",
                                  instance=request.scope["path"])
        return sids

    @staticmethod
    def _forget(api: Any, session_id: str) -> None:
        api.availability_cache.forget("s:" + session_id)
        api.soldout.clear(session_id)
        api.release_times.forget(session_id)
        api.catalog_cache.clear()

    @get("/bookings/{booking_id:str}", responses=errors(401, 404),
         summary="Look up any booking or hold")
    async def booking(self, request: Request[Any, Any, Any], booking_id: str) -> AdminBookingOut:
        api = api_of(request)
        if not HOLD_ID_RE.fullmatch(booking_id):
            raise ProblemError.of("not-found", "no such booking", instance=request.scope["path"])
        rec = await api.engine.record(booking_id)
        row = await q.booking_by_id(api.pool, booking_id)
        if rec is None and row is None:
            raise ProblemError.of("not-found", "no such booking", instance=request.scope["path"])
        if rec is None:
            assert row is not None
            return AdminBookingOut(
                booking_id=row.id, session_id=row.session_id, slot_id=row.slot_id, unit=row.unit,
                account_id=row.account_id, state=row.status, fee=row.fee_cents,
                payment_ref=row.payment_ref, persisted=True, status=row.status,
                his_status=row.his_status, his_id=row.his_id)
        return AdminBookingOut(
            booking_id=rec.id, session_id=rec.session_id, slot_id=rec.slot_id,
            unit=rec.unit, account_id=rec.account, state=rec.state.label, fee=rec.fee,
            payment_ref=rec.payment_ref or None, persisted=row is not None,
            status=None if row is None else row.status,
            his_status=None if row is None else row.his_status,
            his_id=None if row is None else row.his_id)

    @post("/audit", status_code=200, responses=errors(401, 403),
          before_request=staff_required("operator", "finance"),
          summary="Audit conservation of every session (capacity = free + held + booked)")
    async def audit(self, request: Request[Any, Any, Any]) -> AuditOut:
        api = api_of(request)
        started = dt.datetime.now(dt.UTC)
        breaches: list[AuditBreach] = []
        sids = await api.engine.session_ids()
        for sid in sids:
            a = await api.engine.audit(sid)
            breaches += [AuditBreach(sid, b) for b in a.breaches]
        ok = not breaches
        run_id = await q.record_audit_run(
            api.pool, started_at=started, finished_at=dt.datetime.now(dt.UTC), ok=ok,
            sessions=len(sids), breaches=breaches)
        await record(request, "audit.run", str(run_id), ok=ok, sessions=len(sids))
        return AuditOut(ok=ok, sessions=len(sids), breaches=breaches, run_id=run_id)
