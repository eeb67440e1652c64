"""Real-name patients (就诊人) of the logged-in account: bind, list, unbind.

Answers are masked; a malformed ID or phone is a 422 that never echoes it.
Another account's patient id is a 404, like one that does not exist.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog
from litestar import Controller, Request, Response, delete, get, post

from api.context import api_of
from api.docs import ACCOUNT, errors
from api.guards import account_of, account_required
from api.problems import ProblemError
from api.schemas import PatientIn, PatientOut
from engine.pii import InvalidNationalId, InvalidPhone
from engine.store import queries as q

log = structlog.get_logger("haoyuan.api")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _out(v: q.PatientView) -> PatientOut:
    return PatientOut(
        patient_id=v.patient_id,
        name=v.masked_name,
        phone=v.masked_phone,
        national_id=v.masked_id,
        created_at_ms=(v.created_at - _EPOCH) // dt.timedelta(milliseconds=1),
    )


class PatientController(Controller):
    path = "/v1/patients"
    tags = ("patients",)
    before_request = staticmethod(account_required)
    security = ACCOUNT

    @post("/", status_code=201, responses=errors(401, 409, 422),
          summary="Bind a real-name patient to the account")
    async def bind(self, request: Request[Any, Any, Any], data: PatientIn) -> PatientOut:
        """Binding the same ID again answers the existing binding. At most
        ``HAOYUAN_MAX_PATIENTS`` (5) patients per account."""
        api = api_of(request)
        path = request.url.path
        try:
            async with api.pool.acquire() as conn:
                view = await q.bind_patient(
                    conn, api.crypto, account_of(request), data.name, data.phone,
                    data.national_id, max_bound=api.settings.max_patients)
        except InvalidNationalId as exc:
            raise ProblemError.of("invalid-national-id", str(exc), instance=path) from None
        except InvalidPhone as exc:
            raise ProblemError.of("invalid-phone", str(exc), instance=path) from None
        except q.AccountPatientLimit:
            raise ProblemError.of(
                "patient-limit", f"an account binds at most {api.settings.max_patients} patients",
                instance=path) from None
        except LookupError:
            raise ProblemError.of("unauthorized", "unknown account", instance=path) from None
        except ValueError:
            raise ProblemError.of("invalid-input", "patient name must be 1..64 characters",
                                  instance=path) from None
        # The binding mirror (read by every hold); PostgreSQL stays the truth:
        # if this write fails, holds fall back to the store and fill it.
        try:
            await api.engine.mirror_binding(account_of(request), view.patient_id, view.ref)
        except Exception as exc:
            log.warning("binding_mirror_write_failed", error=type(exc).__name__)
        return _out(view)

    @get("/", responses=errors(401), summary="The account's patients (masked)")
    async def list_(self, request: Request[Any, Any, Any]) -> list[PatientOut]:
        api = api_of(request)
        views = await q.list_patients(api.pool, api.crypto, account_of(request))
        return [_out(v) for v in views]

    @delete("/{patient_id:str}", status_code=204, responses=errors(401, 404),
            summary="Unbind one of the account's patients")
    async def unbind(self, request: Request[Any, Any, Any], patient_id: str) -> Response[None]:
        api = api_of(request)
        account = account_of(request)
        if await q.get_patient_ref(api.pool, account, patient_id) is None:
            raise ProblemError.of("not-found", "no such patient", instance=request.url.path)
        # Tombstone first: should the store update then fail, holds see the
        # patient as unbound (less access, never more); a rebind clears it.
        await api.engine.mirror_binding(account, patient_id, None)
        if not await q.unbind_patient(api.pool, account, patient_id):
            raise ProblemError.of("not-found", "no such patient", instance=request.url.path)
        return Response(None, status_code=204)
