"""Staff: who am I, the audit trail (operator), revoking an account's tokens
(operator), refunds due and their payout (finance).

Staff members are added and disabled with ``haoyuan staff add|list|disable``
(``engine.store.staff``): each has one role and a token shown once.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import Parameter, QueryParameter

from api.context import api_of
from api.docs import ADMIN, errors
from api.guards import admin_required, staff_of, staff_required
from api.problems import ProblemError
from api.routes.auth import revoke_all
from api.schemas import HOLD_ID_RE
from api.trail import record
from engine.stats import SessionStats, fold, totals
from engine.stats import stats as day_stats
from engine.store import refunds as rf
from engine.store import staff as st

__all__ = ["StaffController"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ACCOUNT = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_FILTER = Annotated[str | None, Parameter(max_length=128, pattern=r"^[A-Za-z0-9_:./,-]+$")]


def _ms(t: dt.datetime | None) -> int | None:
    return None if t is None else (t - _EPOCH) // dt.timedelta(milliseconds=1)


class StatsOut(msgspec.Struct, frozen=True):
    """Statistics of the days ``from``..``to`` (see engine.stats)."""

    date_from: str = msgspec.field(name="from")
    date_to: str = msgspec.field(name="to")
    hospital: str | None = None
    sessions: list[SessionStats] = []
    by_doctor: list[dict[str, Any]] = []
    by_department: list[dict[str, Any]] = []
    by_day: list[dict[str, Any]] = []


class WhoAmI(msgspec.Struct, frozen=True):
    staff_id: str
    username: str
    roles: list[str]


class AuditEntryOut(msgspec.Struct, frozen=True):
    id: int
    at_ms: int
    actor: str
    role: str
    action: str
    target: str | None
    detail: dict[str, Any]


class TokensRevokedOut(msgspec.Struct, frozen=True):
    account_id: str
    revoked_until_ms: int


class RefundOut(msgspec.Struct, frozen=True, kw_only=True):
    booking_id: str
    reason: str
    created_at_ms: int
    fee: int | None = None
    payment_ref: str | None = None
    paid_at_ms: int | None = None
    paid_ref: str | None = None
    paid_by: str | None = None
    replay: bool = False
    #: due, requested, succeeded or failed (see engine.refunds).
    state: str = "due"
    cause: str = ""
    amount: int = 0
    provider: str = ""
    out_refund_no: str = ""
    attempts: int = 0
    last_error: str | None = None


class RefundPaidIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The payment side's reference of the refund transfer."""

    paid_ref: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


def _refund(r: rf.RefundRow, replay: bool = False) -> RefundOut:
    return RefundOut(booking_id=r.booking_id, reason=r.reason,
                     created_at_ms=_ms(r.created_at) or 0, fee=r.fee_cents,
                     payment_ref=r.payment_ref, paid_at_ms=_ms(r.paid_at), paid_ref=r.paid_ref,
                     paid_by=r.paid_by, replay=replay, state=r.state, cause=r.cause,
                     amount=r.amount, provider=r.provider, out_refund_no=r.out_refund_no,
                     attempts=r.attempts, last_error=r.last_error)


class StaffController(Controller):
    path = "/v1/admin"
    tags = ("admin",)
    before_request = staticmethod(admin_required)
    security = ADMIN

    @get("/whoami", responses=errors(401), summary="The staff member of this token")
    async def whoami(self, request: Request[Any, Any, Any]) -> WhoAmI:
        a = staff_of(request)
        return WhoAmI(a.id, a.username, sorted(a.roles))

    @get("/audit-trail", responses=errors(401, 403), before_request=staff_required("operator"),
         summary="Who did what, newest first (the staff audit trail)")
    async def audit_trail(
        self,
        request: Request[Any, Any, Any],
        actor: _FILTER = None,
        target: _FILTER = None,
        action: _FILTER = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> list[AuditEntryOut]:
        rows = await st.audit_trail(api_of(request).pool, actor=actor, target=target,
                                    action=action, limit=limit)
        return [AuditEntryOut(r.id, _ms(r.at) or 0, r.actor, r.role, r.action, r.target,
                              r.detail) for r in rows]

    @post("/accounts/{account_id:str}/revoke-tokens", status_code=200,
          responses=errors(401, 403, 404), before_request=staff_required("operator"),
          summary="Revoke every token of an account (on every worker at once)")
    async def revoke_tokens(self, request: Request[Any, Any, Any],
                            account_id: str) -> TokensRevokedOut:
        """The account logs in again for a new token."""
        api = api_of(request)
        if not _ACCOUNT.fullmatch(account_id) or not await api.pool.fetchval(
                "SELECT true FROM accounts WHERE id = $1", account_id):
            raise ProblemError.of("not-found", "no such account", instance=request.scope["path"])
        until = await revoke_all(api, account_id, staff_of(request).id)
        await record(request, "account.revoke_tokens", account_id)
        return TokensRevokedOut(account_id, until * 1000)

    @get("/stats", responses=errors(401, 403, 422), before_request=staff_required(
        "operator", "finance"), summary="Statistics per day, department and doctor")
    async def stats(
        self,
        request: Request[Any, Any, Any],
        date_from: Annotated[dt.date, QueryParameter(name="from",
                                                     description="first day (YYYY-MM-DD)")],
        date_to: Annotated[dt.date | None, QueryParameter(
            name="to", description="last day (default: the first), at most a year on")] = None,
        hospital: Annotated[str | None, Parameter(max_length=64)] = None,
    ) -> StatsOut:
        """What ``haoyuan stats --json`` prints (``engine.stats``): each
        session's figures and their sums per doctor, department and day. The
        demand Redis collected is moved into PostgreSQL first."""
        api = api_of(request)
        last = date_to or date_from
        if last < date_from or (last - date_from).days > 366:
            raise ProblemError.of("invalid-input", "to must not be before from, nor a year after",
                                  instance=request.scope["path"])
        async with api.pool.acquire() as conn:
            await fold(api.engine, conn)
        rows = await day_stats(api.pool, date_from=date_from, date_to=last, hospital=hospital)
        return StatsOut(date_from.isoformat(), last.isoformat(), hospital, rows,
                        totals(rows, ("date", "dept_id", "doctor_id")),
                        totals(rows, ("date", "dept_id")), totals(rows, ("date",)))

    @get("/refunds", responses=errors(401, 403), before_request=staff_required("finance"),
         summary="Refunds due (or paid), oldest first")
    async def refunds(
        self,
        request: Request[Any, Any, Any],
        status: Literal["due", "paid", "requested", "failed"] = "due",
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> list[RefundOut]:
        """``due``: every refund not done yet (due, requested, failed); ``paid``:
        done (by the provider or by hand); ``requested``, ``failed``: just those."""
        state = status if status in ("requested", "failed") else None
        rows = await rf.refunds(api_of(request).pool, paid=status == "paid", limit=limit,
                                state=state)
        return [_refund(r) for r in rows]

    @post("/refunds/{booking_id:str}/paid", status_code=200, responses=errors(401, 403, 404, 409),
          before_request=staff_required("finance"), summary="Record that a refund was paid out")
    async def refund_paid(self, request: Request[Any, Any, Any], booking_id: str,
                          data: RefundPaidIn) -> RefundOut:
        """For refunds finance pays out by hand (a provider without a refund API
        here, or a refund the provider failed). Idempotent for the same
        ``paid_ref`` (``replay``); a refund already paid under another
        reference, or by the provider, is a 409 ``invalid-state``."""
        api = api_of(request)
        path: str = request.scope["path"]
        got = None
        if HOLD_ID_RE.fullmatch(booking_id):
            got = await rf.mark_refund_paid(api.pool, booking_id, data.paid_ref,
                                            staff_of(request).id)
        if got is None:
            raise ProblemError.of("not-found", "no refund is due for this booking", instance=path)
        row, how = got
        if how == "conflict":
            raise ProblemError.of("invalid-state", "this refund was paid under another reference",
                                  instance=path)
        if how == "paid":
            await record(request, "refund.paid", booking_id, paid_ref=data.paid_ref,
                         fee=row.fee_cents)
        return _refund(row, replay=how == "replay")
