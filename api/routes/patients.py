"""Real-name patients (就诊人) of the logged-in account: bind, list, unbind;
verify a binding's real name; see and revoke the other accounts bound to
the same ID number.

Answers are masked; a malformed ID or phone is a 422 that never echoes it.
Another account's patient id is a 404, like one that does not exist.

A binding holds only once a real-name authority confirmed it
(``engine.identity``): the bind asks at once and answers ``verified``;
``POST /v1/patients/{id}/verify`` asks again (after an outage, or with a
ticket of the face check that proves the account holder is the patient).
One ID number is bound to at most ``HAOYUAN_MAX_ACCOUNTS_PER_PATIENT``
accounts: a verified binding displaces unverified ones of other accounts.
A verified binding sees the other accounts' bindings of its ID and revokes
unverified ones; one verified as the person (``self``) revokes any.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog
from litestar import Controller, Request, Response, delete, get, post

from api.context import Api, api_of
from api.docs import ACCOUNT, errors
from api.guards import account_of, account_required
from api.problems import ProblemError, retry_after
from api.schemas import CoBindingOut, PatientIn, PatientOut, VerifyIn
from engine.identity import Claim, RealNameUnavailable, Verdict, verification_of
from engine.pii import InvalidNationalId, InvalidPhone, normalize_national_id, normalize_phone
from engine.store import bindings as b
from engine.store import queries as q

log = structlog.get_logger("haoyuan.api")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ms(t: dt.datetime) -> int:
    return (t - _EPOCH) // dt.timedelta(milliseconds=1)


def _out(v: q.PatientView) -> PatientOut:
    return PatientOut(
        patient_id=v.patient_id,
        name=v.masked_name,
        phone=v.masked_phone,
        national_id=v.masked_id,
        created_at_ms=_ms(v.created_at),
        verified=v.verified,
        verification=v.verification,  # type: ignore[arg-type]
    )


async def _check(api: Api, claim: Claim) -> Verdict | None:
    """The authority's verdict; None when nothing could be checked."""
    try:
        return await api.realname.verify(claim)
    except RealNameUnavailable as exc:
        log.warning("realname_unavailable", error=str(exc)[:200])
        return None


async def _mirror(api: Api, account: str, view: q.PatientView) -> None:
    """The binding mirror holds a ref only for a verified binding (read by
    every hold). A fill, never an overwrite: a revocation that committed
    meanwhile left a tombstone, which must stay. PostgreSQL stays the truth:
    should this write fail, holds miss, ask the store and fill it."""
    if not view.verified:
        return
    try:
        await api.engine.mirror_binding(account, view.patient_id, view.ref, fill=True)
    except Exception as exc:
        log.warning("binding_mirror_write_failed", error=type(exc).__name__)


def _limit_problem(api: Api, path: str) -> ProblemError:
    n = api.settings.max_accounts_per_patient
    return ProblemError.of(
        "id-account-limit",
        f"this ID number is bound to {n} verified accounts; one of them may revoke the others",
        instance=path)


class PatientController(Controller):
    path = "/v1/patients"
    tags = ("patients",)
    before_request = staticmethod(account_required)
    security = ACCOUNT

    @post("/", status_code=201, responses=errors(401, 409, 422),
          summary="Bind a real-name patient to the account (checked at once)")
    async def bind(self, request: Request[Any, Any, Any], data: PatientIn) -> PatientOut:
        """The real name is checked with the authority before the answer:
        ``verified`` says whether the patient can hold (``verification``:
        ``self`` with a face-check ``ticket`` that proves the account holder
        is the patient, ``data`` when ID, name and phone belong together;
        ``mismatch``, ``unknown`` or ``unavailable`` otherwise: the binding
        is kept, cannot hold, and may be verified again). Binding the same
        ID again answers the existing binding. At most
        ``HAOYUAN_MAX_PATIENTS`` (5) patients per account (409
        ``patient-limit``), and ``HAOYUAN_MAX_ACCOUNTS_PER_PATIENT`` (3)
        accounts per ID number (409 ``id-account-limit``, for a verified
        binding only when that many other accounts hold verified ones)."""
        api = api_of(request)
        path = request.url.path
        account = account_of(request)
        try:
            nid = normalize_national_id(data.national_id)
            tel = normalize_phone(data.phone)
        except InvalidNationalId as exc:
            raise ProblemError.of("invalid-national-id", str(exc), instance=path) from None
        except InvalidPhone as exc:
            raise ProblemError.of("invalid-phone", str(exc), instance=path) from None
        name = " ".join(data.name.split())
        if not name or len(name) > 64:
            raise ProblemError.of("invalid-input", "patient name must be 1..64 characters",
                                  instance=path)
        # No check (an authority call has a price) for a binding that exists
        # or one the account has no room for.
        existing = await b.bound_view(api.pool, api.crypto, account, api.crypto.id_hash(nid))
        if existing is not None:
            return _out(existing)
        if await q.count_bound(api.pool, account) >= api.settings.max_patients:
            raise ProblemError.of(
                "patient-limit", f"an account binds at most {api.settings.max_patients} patients",
                instance=path)
        verdict = await _check(api, Claim(national_id=nid, name=name, phone=tel,
                                          account=account, ticket=data.ticket))

        async def tombstone(other_account: str, other_id: str) -> None:
            await api.engine.mirror_binding(other_account, other_id, None)

        try:
            async with api.pool.acquire() as conn:
                view = await q.bind_patient(
                    conn, api.crypto, account, name, tel, nid,
                    max_bound=api.settings.max_patients,
                    verification=verification_of(verdict),
                    verification_ref=verdict.reference if verdict else None,
                    max_accounts=api.settings.max_accounts_per_patient,
                    on_displace=tombstone)
        except q.AccountPatientLimit:
            raise ProblemError.of(
                "patient-limit", f"an account binds at most {api.settings.max_patients} patients",
                instance=path) from None
        except q.IdAccountLimit:
            raise _limit_problem(api, path) from None
        except LookupError:
            raise ProblemError.of("unauthorized", "unknown account", instance=path) from None
        log.info("patient_bound", verification=view.verification)
        await _mirror(api, account, view)
        return _out(view)

    @get("/", responses=errors(401), summary="The account's patients (masked)")
    async def list_(self, request: Request[Any, Any, Any]) -> list[PatientOut]:
        api = api_of(request)
        views = await q.list_patients(api.pool, api.crypto, account_of(request))
        return [_out(v) for v in views]

    @post("/{patient_id:str}/verify", status_code=200, responses=errors(401, 404, 409, 503),
          summary="Check a binding's real name again (after an outage, or with a ticket)")
    async def verify(self, request: Request[Any, Any, Any], patient_id: str,
                     data: VerifyIn | None = None) -> PatientOut:
        """A check never takes a verification away: the answer is the
        stronger of the recorded and the new outcome. A ``self`` binding, or
        a ``data`` one without a ``ticket``, is answered as it is. 503 when
        the authority cannot be reached (nothing changes)."""
        api = api_of(request)
        path = request.url.path
        account = account_of(request)
        found = await b.claim_of(api.pool, api.crypto, account, patient_id)
        if found is None:
            raise ProblemError.of("not-found", "no such patient", instance=path)
        view, nid, name, tel = found
        ticket = data.ticket if data is not None else None
        if view.verification == "self" or (view.verification == "data" and not ticket):
            await _mirror(api, account, view)
            return _out(view)
        verdict = await _check(api, Claim(national_id=nid, name=name, phone=tel,
                                          account=account, ticket=ticket))
        if verdict is None:
            ms, headers = retry_after(5000)
            raise ProblemError.of("unavailable", "the real-name check is unavailable; retry later",
                                  instance=path, headers=headers, retry_after_ms=ms)
        try:
            async with api.pool.acquire() as conn:
                got = await b.set_verification(
                    conn, api.crypto, account, patient_id, verification_of(verdict),
                    verdict.reference, max_accounts=api.settings.max_accounts_per_patient)
        except q.IdAccountLimit:
            raise _limit_problem(api, path) from None
        if got is None:
            raise ProblemError.of("not-found", "no such patient", instance=path)
        log.info("patient_verified", verification=got.verification)
        await _mirror(api, account, got)
        return _out(got)

    @get("/{patient_id:str}/bindings", responses=errors(401, 403, 404),
         summary="The other accounts bound to this patient's ID number (masked)")
    async def co_bindings(self, request: Request[Any, Any, Any],
                          patient_id: str) -> list[CoBindingOut]:
        """Oldest first, each with the name and phone (masked) that account
        entered and its verification. Only for a verified binding (403
        ``patient-unverified``)."""
        api = api_of(request)
        path = request.url.path
        try:
            rows = await b.co_bindings(api.pool, api.crypto, account_of(request), patient_id)
        except b.NotAllowed:
            raise ProblemError.of("patient-unverified", "verify this patient's real name first",
                                  instance=path) from None
        if rows is None:
            raise ProblemError.of("not-found", "no such patient", instance=path)
        return [CoBindingOut(binding_id=r.binding_id, name=r.masked_name, phone=r.masked_phone,
                             verified=r.verification in ("self", "data"),
                             verification=r.verification,  # type: ignore[arg-type]
                             created_at_ms=_ms(r.created_at))
                for r in rows]

    @delete("/{patient_id:str}/bindings/{binding_id:str}", status_code=204,
            responses=errors(401, 403, 404),
            summary="Revoke another account's binding of this patient's ID number")
    async def revoke(self, request: Request[Any, Any, Any], patient_id: str,
                     binding_id: str) -> Response[None]:
        """A verified binding revokes unverified ones; a binding verified as
        the person (``self``: the face check) revokes any (403
        ``not-revocable`` otherwise, ``patient-unverified`` for an unverified
        caller). The revoked binding can no longer hold, on every worker at
        once; its holds and bookings stay as they are."""
        api = api_of(request)
        path = request.url.path

        async def tombstone(other_account: str, other_id: str) -> None:
            await api.engine.mirror_binding(other_account, other_id, None)

        try:
            async with api.pool.acquire() as conn:
                done = await b.revoke_binding(conn, account_of(request), patient_id, binding_id,
                                              tombstone)
        except b.NotAllowed as exc:
            if exc.why == "unverified":
                raise ProblemError.of("patient-unverified",
                                      "verify this patient's real name first",
                                      instance=path) from None
            raise ProblemError.of("not-revocable",
                                  "a verified binding: only one verified as the patient"
                                  " (face check) may revoke it", instance=path) from None
        if not done:
            raise ProblemError.of("not-found", "no such binding", instance=path)
        log.info("binding_revoked")
        return Response(None, status_code=204)

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
