"""The waitlist (候补) of a sold-out session: join, leave.

A unit that comes back to the public (cancel, expiry, release) goes to the
head of the waitlist as a hold with its own payment window, paid through the
usual payment callback; an unpaid offer passes to the next patient. Joining
while units are free is refused (409 ``units-free``: hold one instead).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, post

from api.context import api_of
from api.docs import ACCOUNT, errors
from api.guards import account_of, account_required, bearer_of
from api.problems import ProblemError, json_response, problem, refused
from api.routes.browse import _ID
from api.routes.holds import patient_or_problem
from api.schemas import WaitlistIn, WaitlistOut
from engine.outcomes import Reason, Refused

_encode = msgspec.json.Encoder().encode
_REPLAYED = {"Idempotent-Replayed": "true"}


class WaitlistController(Controller):
    path = "/v1/sessions"
    tags = ("book",)
    before_request = staticmethod(account_required)
    security = ACCOUNT

    @post("/{session_id:str}/waitlist", status_code=201,
          responses=errors(401, 403, 404, 409, 422),
          summary="Join the waitlist (候补) of a sold-out session")
    async def join(
        self, request: Request[Any, Any, Any], session_id: str, data: WaitlistIn
    ) -> Response[WaitlistOut]:
        """201 with the patient's position (1 = next offer); joining again
        answers 200 with the same position. 409 ``units-free`` while units
        can be held, ``duplicate`` (the patient already holds or booked that
        day), ``waitlist-full``, ``suspended`` or ``closed`` (past the cut-off);
        404 for a session that does not exist or a patient not the account's;
        403 ``patient-unverified`` for a patient whose real name is not verified."""
        api = api_of(request)
        path: str = request.scope["path"]
        account = account_of(request)
        if not _ID.fullmatch(session_id):
            raise ProblemError.of("not-found", "no such session", instance=path)
        patient = await patient_or_problem(api, bearer_of(request), data.patient_id, path,
                                           "waitlist")
        if not isinstance(patient, str):
            return patient
        out = await api.engine.join_waitlist(session_id, patient=patient, account=account)
        if isinstance(out, Refused):
            api.metrics.decision("waitlist", out.reason.value)
            if out.reason is Reason.INVALID_STATE and out.state == "units_free":
                return problem("units-free", "units of this session are free: hold one",
                               instance=path, server_ms=out.server_ms or None)
            return refused(out, path)
        api.metrics.decision("waitlist", "waitlisted")
        api.demand.note(session_id, "joined", account)
        await api.engine.note_mine(account, f"w:{session_id}:{patient}")
        api.availability_cache.forget("s:" + session_id)
        body = WaitlistOut(out.session_id, out.position, out.server_ms, out.replay)
        return json_response(_encode(body), 200 if out.replay else 201,
                             _REPLAYED if out.replay else None)

    @delete("/{session_id:str}/waitlist/{patient_id:str}", status_code=204,
            responses=errors(401, 404), summary="Leave the waitlist of a session")
    async def leave(
        self, request: Request[Any, Any, Any], session_id: str, patient_id: str
    ) -> Response[None]:
        """Idempotent: 204 whether or not the patient was waiting; 404 for a
        patient not the account's. An offer already made stays a hold (release
        it with ``DELETE /v1/holds/{id}``)."""
        api = api_of(request)
        path: str = request.scope["path"]
        account = account_of(request)
        acc = await api.patient_access(bearer_of(request), patient_id)
        if acc.ref is None:  # an unverified patient may leave (it could not have joined)
            raise ProblemError.of("not-found", "no such patient", instance=path)
        patient = acc.ref
        if _ID.fullmatch(session_id) and await api.engine.leave_waitlist(
                session_id, patient=patient, account=account):
            api.availability_cache.forget("s:" + session_id)
        return Response(None, status_code=204)
