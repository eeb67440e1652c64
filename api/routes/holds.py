"""Holds (锁号): take a unit, look at it, let it go; the payment callback confirms it.

POST /v1/holds is the release-morning hot path. In order, cheapest first:

1. "not open yet" from the release instant Redis told this worker, and the
   locally estimated Redis time (no Redis call);
2. "sold out" from this worker's sold-out cache (no Redis call) for
   requests without an Idempotency-Key; a keyed request's cached sold-out
   is stored under its key first (Engine.remember_refusal: one tiny script,
   batched, after step 3), or its stored answer is returned if it has one,
   so a key gets the same answer on every worker, however often it is retried;
3. the token's revocation and the patient ref, one batched Redis read
   (``Api.patient_access``; PostgreSQL only when the binding mirror misses):
   401 for a revoked token, 404 for a patient not the account's, 403
   ``patient-unverified`` for a binding whose real name is not verified;
4. admission: above ``max_inflight`` engine calls in flight, 429 at once;
5. one engine call (one Lua script, batched with concurrent calls).

The not-open and unkeyed sold-out answers come from this worker's caches
and tell what the public availability endpoint tells anyone; every answer
that reads or changes anything of an account's (step 3 on, keyed sold-outs
included) sees a revoked token at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import HeaderParameter

from api.auth import Bearer
from api.context import Api, api_of
from api.docs import ACCOUNT, PAYMENT, errors
from api.guards import account_of, account_required, bearer_of, payment_signed
from api.paying import PaymentRefused, confirm_paid
from api.problems import REASONS, ProblemError, json_response, problem, refused, retry_after
from api.schemas import (
    HOLD_ID_RE,
    BookingOut,
    HoldIn,
    HoldOut,
    HoldView,
    MineOut,
    MyHold,
    MyPlace,
    PaymentIn,
    ReleasedOut,
)
from api.waiting import Ticket
from engine.outcomes import MESSAGES, Held, Reason, Record, RecordState, Refused

log = structlog.get_logger("haoyuan.api")
_encode = msgspec.json.Encoder().encode
_NOT_OPEN = REASONS[Reason.NOT_OPEN]
_SOLD_OUT = REASONS[Reason.SOLD_OUT]
_REPLAYED = {"Idempotent-Replayed": "true"}
_BEARER = {"WWW-Authenticate": 'Bearer realm="haoyuan"'}
#: The scope key of a hold's arrival instant (stamped by api.fastpath).
ARRIVED = "haoyuan.arrived_ms"


def shed(api: Api, op: str, path: str) -> Response[Any]:
    api.metrics.decision(op, "shed")
    ms, headers = retry_after(api.settings.shed_retry_after_s * 1000)
    return problem("overloaded", "too many requests in flight; retry after the given time",
                   instance=path, headers=headers, retry_after_ms=ms)


def not_found(path: str, what: str) -> ProblemError:
    return ProblemError.of("not-found", f"no such {what}", instance=path)


async def recovering_or_not_found(api: Api, record_id: str, path: str, what: str
                                  ) -> ProblemError:
    """A record Redis does not have: 503 ``recovering`` if its partition lost
    its state (a rebuild will bring it back), else 404."""
    if HOLD_ID_RE.fullmatch(record_id) and await api.recovering(int(record_id.split(".")[0])):
        return ProblemError(refused(recovering_now(api), path))
    return not_found(path, what)


def recovering_now(api: Api) -> Refused:
    return Refused(Reason.RECOVERING, api.clock.now_ms(), MESSAGES[Reason.RECOVERING])


async def own_record(api: Api, record_id: str, account: str, path: str) -> Record:
    """The account's own hold or booking record; anything else is a 404."""
    rec = None if not HOLD_ID_RE.fullmatch(record_id) else await api.engine.record(record_id)
    if rec is None:
        raise await recovering_or_not_found(api, record_id, path, "hold or booking")
    if rec.account != account:
        raise not_found(path, "hold or booking")
    return rec


async def patient_or_problem(api: Api, who: Bearer, patient_id: str, path: str, op: str
                             ) -> str | Response[Any]:
    """The ref of a verified patient of the account, or the problem to answer."""
    acc = await api.patient_access(who, patient_id)
    if acc.revoked:
        return problem("unauthorized", "the token was revoked", instance=path, headers=_BEARER)
    if acc.ref is None:
        return problem("not-found", "no such patient", instance=path)
    if not acc.verified:
        api.metrics.decision(op, "patient-unverified")
        return problem("patient-unverified",
                       "the patient's real name is not verified: POST /v1/patients/{id}/verify",
                       instance=path)
    return acc.ref


async def decide_hold(
    api: Api, who: Bearer, data: HoldIn, idempotency_key: str | None, path: str,
    *, arrived_ms: int | None = None, ticket: str | None = None,
) -> Response[Any]:
    """The hold decision, cheapest answers first (see the module docstring).

    ``arrived_ms`` is when this worker received the request (its estimate
    of Redis time): a request that arrived before the release instant is
    "not open" however late it is decided (a fair start), and one that has
    waited longer than ``max_request_age_ms`` is answered at once. ``ticket``
    is the waiting-room ticket it came with (X-Waiting-Ticket)."""
    m = api.metrics
    account = who.account
    sid, slot = data.session_id, data.slot_id
    now = api.clock.now_ms()
    arrived = now if arrived_ms is None else min(arrived_ms, now)
    release_at = api.release_times.get(sid)
    if release_at is not None and arrived < release_at - api.settings.not_open_margin_ms:
        m.decision("hold", "not-open-cached")
        return problem(_NOT_OPEN, MESSAGES[Reason.NOT_OPEN], instance=path,
                       server_ms=now, release_at_ms=release_at)
    cached_sold_out = api.soldout.hit(sid, slot)
    if cached_sold_out and idempotency_key is None:
        m.decision("hold", "sold-out-cached")
        api.demand.note(sid, "tried", account)
        api.demand.note(sid, "refused", account)
        return problem(_SOLD_OUT, MESSAGES[Reason.SOLD_OUT], instance=path,
                       server_ms=api.clock.now_ms())
    room = api.waiting
    admitted = False
    if room.enabled:
        adm = room.check(account, ticket, now)
        if adm.verdict == "waiting" and ticket is not None:
            m.decision("hold", "waiting")
            return waiting_answer(room.current(ticket, adm.position, adm.due_ms, now), path, now)
        admitted = adm.verdict == "admitted"
        if not admitted and room.active():
            # A line has formed: this account's place in it (asked again, the
            # same place: a client that does not send its ticket is served in
            # its turn all the same).
            t = await take_place(api, account)
            if t is None:
                return shed(api, "hold", path)
            if not t.due:
                m.decision("hold", "queued")
                return waiting_answer(t, path, now)
            admitted = True
    max_age = api.settings.max_request_age_ms
    if not admitted and (now - arrived > max_age or api.admission.lagging()):
        return await queue_or_shed(api, account, path, "shed")
    patient = await patient_or_problem(api, who, data.patient_id, path, "hold")
    if not isinstance(patient, str):
        return patient
    if not admitted and api.clock.now_ms() - arrived > max_age:
        return await queue_or_shed(api, account, path, "shed-age")
    if not api.admission.enter(priority=admitted):
        return await queue_or_shed(api, account, path, "shed")
    t0 = time.perf_counter()
    try:
        if cached_sold_out and idempotency_key is not None:
            # The same answer for the key everywhere: store the sold-out under
            # it, or get the answer it already has (a retry).
            out = await api.engine.remember_refusal(sid, slot, patient=patient, account=account,
                                                    idempotency_key=idempotency_key)
        else:
            out = await api.engine.hold(sid, slot, patient=patient, account=account,
                                        idempotency_key=idempotency_key, arrived_ms=arrived)
    finally:
        api.admission.leave()
        m.engine_call("hold", time.perf_counter() - t0)
    if isinstance(out, Held):
        m.decision("hold", "held")
        api.demand.note(sid, "tried", account)
        with contextlib.suppress(Exception):  # a display index: never the hold's answer
            await api.engine.note_mine(account, out.hold_id)
        body = HoldOut(out.hold_id, out.session_id, out.slot_id, out.unit,
                       out.expires_at_ms, out.server_ms, out.replay)
        return json_response(_encode(body), 201, _REPLAYED if out.replay else None)
    if out.reason is Reason.SOLD_OUT:
        api.demand.note(sid, "tried", account)
        api.demand.note(sid, "refused", account)
    if out.reason is Reason.SOLD_OUT and not out.replay:  # a replay tells nothing new
        api.soldout.mark(sid, slot)
    elif out.reason is Reason.NOT_OPEN and out.release_at_ms is not None:
        api.release_times.set(sid, out.release_at_ms)
    elif out.reason is Reason.NOT_FOUND and out.what == "session" \
            and await api.session_recovering(sid):
        out = recovering_now(api)
    cached_keyed = cached_sold_out and out.reason is Reason.SOLD_OUT and not out.replay
    m.decision("hold", "sold-out-cached-keyed" if cached_keyed else out.reason.value)
    return refused(out, path)


def waiting_answer(t: Ticket, path: str, now_ms: int) -> Response[Any]:
    """429 ``waiting-room``: the ticket, the place and when to come back."""
    return problem("waiting-room", f"you are number {t.position} in the line, "
                   f"{t.ahead} ahead of you", instance=path,
                   headers={"Retry-After": str(max(1, math.ceil(t.retry_after_ms / 1000)))},
                   retry_after_ms=t.retry_after_ms, server_ms=now_ms, ticket=t.token,
                   position=t.position, ahead=t.ahead)


async def queue_or_shed(api: Api, account: str, path: str, why: str) -> Response[Any]:
    """A hold that is not decided now: a place in the waiting room's line
    (its ticket and wait), or, with the waiting room off or out of reach, 429
    ``overloaded``."""
    t = await take_place(api, account) if api.waiting.enabled else None
    if t is None:
        return shed(api, "hold", path)
    api.metrics.decision("hold", why)
    return waiting_answer(t, path, api.clock.now_ms())


async def take_place(api: Api, account: str) -> Ticket | None:
    """The account's place in the waiting room's line; None when Redis is
    out of reach (the caller sheds plainly)."""
    try:
        return await api.waiting.take(account)
    except Exception:
        return None


class HoldController(Controller):
    path = "/v1/holds"
    tags = ("book",)

    @post("/", status_code=201, before_request=account_required, security=ACCOUNT,
          responses=errors(401, 403, 404, 409, 422, 429), summary="Hold a unit of a slot")
    async def hold(
        self,
        request: Request[Any, Any, Any],
        data: HoldIn,
        idempotency_key: Annotated[str | None, HeaderParameter(
            name="Idempotency-Key", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]{1,64}$",
            description="Send the same key on a retry: it returns the first answer")] = None,
        waiting_ticket: Annotated[str | None, HeaderParameter(
            name="X-Waiting-Ticket", min_length=1, max_length=80,
            description="The ticket of a 429 waiting-room answer: come back with it at "
                        "retry_after_ms; an admitted ticket skips the line")] = None,
    ) -> Response[HoldOut]:
        """201 with the hold (pay before ``expires_at_ms``); 409 not-open (with
        ``release_at_ms`` and ``server_ms``), sold-out, duplicate, suspended or
        closed; 429 rate-limited or shed (Retry-After); 404 for a patient that
        is not the account's; 403 ``patient-unverified`` for a patient whose
        real name is not verified, ``banned`` for a barred one. (Served by
        ``api.fastpath`` in front of Litestar when the request is well-formed;
        this handler is its twin and fallback.)"""
        scope: Any = request.scope
        return await decide_hold(api_of(request), bearer_of(request), data, idempotency_key,
                                 scope["path"], arrived_ms=scope.get(ARRIVED),
                                 ticket=waiting_ticket)

    @get("/", before_request=account_required, security=ACCOUNT, responses=errors(401),
         summary="The account's live holds (waitlist offers included) and waitlist places")
    async def mine(self, request: Request[Any, Any, Any]) -> MineOut:
        """Each hold with its payment deadline (``offer`` for one the
        waitlist made, to pay before ``expires_at_ms``), and each waitlist
        place with its position. Holds that ended and places that were
        offered or left are not listed."""
        api = api_of(request)
        account = account_of(request)
        holds, places = await api.engine.mine(account)
        rows = await api.pool.fetch("SELECT id, id_hash FROM patients WHERE account_id = $1"
                                    " AND unbound_at IS NULL", account)
        pid = {r["id_hash"]: str(r["id"]) for r in rows}
        return MineOut(
            server_ms=api.clock.now_ms(),
            holds=[MyHold(hold_id=h.id, session_id=h.session_id, slot_id=h.slot_id,
                          unit=h.unit, expires_at_ms=h.deadline_ms, fee=h.fee,
                          offer=bool(h.waitlist_offer), patient_id=pid.get(h.patient))
                   for h in sorted(holds, key=lambda h: h.deadline_ms)],
            waitlist=[MyPlace(session_id=s, position=n, patient_id=pid.get(p))
                      for s, p, n in places])

    @get("/{hold_id:str}", before_request=account_required, security=ACCOUNT,
         responses=errors(401, 404), summary="One of the account's holds")
    async def view(self, request: Request[Any, Any, Any], hold_id: str) -> HoldView:
        api = api_of(request)
        rec = await own_record(api, hold_id, account_of(request), request.scope["path"])
        held = rec.state is RecordState.HELD
        return HoldView(
            hold_id=rec.id, session_id=rec.session_id, slot_id=rec.slot_id, unit=rec.unit,
            state=rec.state.label,  # type: ignore[arg-type]
            expires_at_ms=rec.deadline_ms if held else None, fee=rec.fee,
        )

    @delete("/{hold_id:str}", status_code=200, before_request=account_required, security=ACCOUNT,
            responses=errors(401, 404, 409, 429), summary="Release one of the account's holds")
    async def release(self, request: Request[Any, Any, Any], hold_id: str) -> Response[ReleasedOut]:
        api = api_of(request)
        path: str = request.scope["path"]
        if not HOLD_ID_RE.fullmatch(hold_id):
            raise not_found(path, "hold")
        if not api.admission.enter():
            return shed(api, "release", path)
        try:
            out = await api.engine.release(hold_id, account=account_of(request))
        finally:
            api.admission.leave()
        if isinstance(out, Refused):
            api.metrics.decision("release", out.reason.value)
            if out.reason is Reason.NOT_FOUND:
                raise await recovering_or_not_found(api, hold_id, path, "hold")
            return refused(out, path)
        api.metrics.decision("release", "released")
        api.soldout.clear(hold_id.split(".")[1])  # a unit came back
        body = ReleasedOut(hold_id=hold_id, server_ms=out.server_ms, replay=out.replay)
        return json_response(_encode(body))

    @post("/{hold_id:str}/confirm", status_code=200, before_request=payment_signed,
          security=PAYMENT, responses=errors(401, 404, 409, 422, 429),
          summary="Payment callback: the hold becomes a booking")
    async def confirm(
        self, request: Request[Any, Any, Any], hold_id: str, data: PaymentIn
    ) -> Response[BookingOut]:
        """Signed by the payment side over method, path, timestamp and body
        (not callable with an account token). Idempotent: a repeated callback
        (same hold, reference and amount) answers the same booking. A payment
        after the hold ended books a free unit if one is left (``late``), else
        409 expired with ``refund_due``. A payment reference books one hold,
        ever: reused for another hold it is 409 ``payment-reused``; a second
        reference for a hold already paid is 409 ``already-paid``; both are
        recorded for refund."""
        api = api_of(request)
        path: str = request.scope["path"]
        log.info("payment_callback", hold_id=hold_id, payment_ref=data.payment_ref,
                 amount=data.amount)
        if not api.admission.enter():
            return shed(api, "confirm", path)
        try:
            out = await confirm_paid(api, hold_id, data.payment_ref, data.amount)
        finally:
            api.admission.leave()
        if isinstance(out, PaymentRefused):
            api.metrics.decision("confirm", out.kind)
            return problem(out.kind, out.detail, instance=path, server_ms=out.server_ms,
                           refund_due=out.refund_due)
        if isinstance(out, Refused):
            api.metrics.decision("confirm", out.reason.value)
            return refused(out, path)
        b, fee = out
        api.metrics.decision("confirm", "booked")
        body = BookingOut(booking_id=b.booking_id, session_id=b.session_id,
                          slot_id=b.slot_id, unit=b.unit, status="booked",
                          fee=fee, server_ms=b.server_ms, late=b.late, replay=b.replay)
        return json_response(_encode(body))
