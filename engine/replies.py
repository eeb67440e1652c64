"""What each Lua script answers, typed.

Every decision script answers one JSON object; ``o`` is its outcome code
(``engine.outcomes.Code``) and a refusal carries its details in the fields
of ``Reply``. Each script's reply is one msgspec Struct, decoded once by a
decoder built here, and every call goes through a ``Call`` that names the
script and its reply type (``ScriptRunner.call``): a script name mistyped,
a field renamed on one side only, or an unknown field (``forbid_unknown_fields``)
fails at the first call, and ``tests/test_lua_contract.py`` checks the table
against ``lua/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from engine.outcomes import MESSAGES, REASON_OF_CODE, Code, Reason, Refused

__all__ = [
    "CALLS",
    "AvailabilityReply",
    "Call",
    "CancelReply",
    "CapacityReply",
    "ConfirmReply",
    "ExpireReply",
    "HoldReply",
    "LeaveReply",
    "LineReply",
    "LoadReply",
    "PatientReply",
    "ReleaseReply",
    "Reply",
    "RescheduleReply",
    "RestoreReply",
    "SuspendReply",
    "WaitlistReply",
]


class Reply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields every decision reply may carry: the outcome and, for a
    refusal, its details."""

    o: int
    now: int = 0
    #: A replay of an earlier answer (idempotency).
    rp: int = 0
    retry_ms: int | None = None
    who: str | None = None  # rate-limited: "account" or "patient"
    release_ms: int | None = None
    night: int = 0  # not-open because of the night closure
    cutoff_ms: int | None = None
    deadline_ms: int | None = None
    until_ms: int | None = None
    existing: str | None = None  # duplicate: the patient's active hold or booking
    st: str | None = None  # invalid-state: the state found
    what: str | None = None  # not-found: what was missing
    holder: str | None = None  # restore: the record holding the unit
    #: The patient-wide count to settle (patient, member, active until ms or
    #: 0 to drop): every record the call started or ended, waitlist offers
    #: included (lua/includes/records.lua ``note_settle``).
    settle: list[tuple[str, str, int]] = []

    @property
    def ok(self) -> bool:
        return self.o == Code.OK

    def refused(self) -> Refused:
        """This (non-OK) reply as the caller's ``Refused`` value."""
        reason = REASON_OF_CODE[self.o]
        return Refused(
            reason=reason, server_ms=self.now, message=MESSAGES[reason],
            retry_after_ms=self.retry_ms, until_ms=self.until_ms, release_at_ms=self.release_ms,
            cutoff_ms=self.cutoff_ms, deadline_ms=self.deadline_ms, existing_id=self.existing,
            state=self.st, what=self.what, refund_due=reason is Reason.EXPIRED,
            replay=bool(self.rp),
        )


class SlotLoadReply(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    cap: int
    requested: int


class LoadReply(Reply, kw_only=True):
    sid: str = ""
    created: bool = False
    open: int = 1
    slots: list[SlotLoadReply] = []


class CapacityReply(Reply, kw_only=True):
    slot: str = ""
    cap: int = 0
    requested: int = 0


class SuspendReply(Reply, kw_only=True):
    cancelled: int = 0
    released: int = 0


class HoldReply(Reply, kw_only=True):
    id: str = ""
    sid: str = ""
    slot: str = ""
    unit: int = 0
    dl: int = 0  # the payment deadline


class _Ended(Reply, kw_only=True):
    """A reply about one record: its id, patient and the request id of the
    patient-wide reservation (settled by the engine)."""

    id: str = ""
    pat: str = ""
    rq: str = ""


class ConfirmReply(_Ended, kw_only=True):
    sid: str = ""
    slot: str = ""
    unit: int = 0
    late: int = 0
    pay: str = ""
    reason: str = ""  # expired: why the payment found no unit


class ReleaseReply(_Ended, kw_only=True):
    pass


class CancelReply(_Ended, kw_only=True):
    reason: str = ""
    late: int = 0


class RescheduleReply(_Ended, kw_only=True):
    old: str = ""
    sid: str = ""
    slot: str = ""
    unit: int = 0
    fee: int = 0
    old_fee: int = 0
    late: int = 0


class RestoreReply(Reply, kw_only=True):
    restored: int = 0
    ended: str | None = None  # the state Redis kept (never revived)


class ExpireReply(Reply, kw_only=True):
    expired: int = 0
    requeued: int = 0
    closed: int = 0
    more: int = 0


class WaitlistReply(Reply, kw_only=True):
    position: int = 0


class LeaveReply(Reply, kw_only=True):
    removed: int = 0


class PatientReply(Reply, kw_only=True):
    active: int = 0


class SlotAvail(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    cap: int
    free: int
    start: str = ""
    end: str = ""


class SessionAvail(msgspec.Struct, forbid_unknown_fields=True):
    sid: str
    status: str
    release_ms: int
    cutoff_ms: int
    waiting: int
    slots: list[SlotAvail]


class AvailabilityReply(msgspec.Struct, forbid_unknown_fields=True):
    now: int
    sessions: list[SessionAvail]


class LineReply(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The waiting room's line at ``now``: positions ``issued`` so far and
    admitted up to ``served``; ``takeTicket`` adds the caller's ``pos``, when
    its turn comes (``due``) and whether it is ``new``."""

    served: float
    issued: int
    now: int
    pos: int = 0
    #: When the caller's turn comes (ms, Redis time).
    due: int = 0
    new: int = 0


R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One script and how its answer decodes."""

    script: str
    decode: Callable[[Any], R]


def _json(t: type[R]) -> Callable[[Any], R]:
    decoder = msgspec.json.Decoder(t)
    return decoder.decode


def _raw(v: Any) -> Any:
    return v


LOAD_SESSION = Call("loadSession", _json(LoadReply))
SET_CAPACITY = Call("setCapacity", _json(CapacityReply))
SUSPEND_SESSION = Call("suspendSession", _json(SuspendReply))
RESUME_SESSION = Call("resumeSession", _json(Reply))
PAUSE_SESSION = Call("pauseSession", _json(Reply))
HOLD_UNIT = Call("holdUnit", _json(HoldReply))
REMEMBER_REFUSAL = Call("rememberRefusal", _json(HoldReply))
CONFIRM_HOLD = Call("confirmHold", _json(ConfirmReply))
RELEASE_HOLD = Call("releaseHold", _json(ReleaseReply))
CANCEL_BOOKING = Call("cancelBooking", _json(CancelReply))
RESTORE_BOOKING = Call("restoreBooking", _json(RestoreReply))
EXPIRE_HOLDS = Call("expireHolds", _json(ExpireReply))
JOIN_WAITLIST = Call("joinWaitlist", _json(WaitlistReply))
LEAVE_WAITLIST = Call("leaveWaitlist", _json(LeaveReply))
RESERVE_PATIENT = Call("reservePatient", _json(PatientReply))
SETTLE_PATIENT = Call("settlePatient", _json(Reply))
GET_AVAILABILITY = Call("getAvailability", _json(AvailabilityReply))
#: A whole-session snapshot for the audit (free lists may be empty objects
#: in Lua's JSON: read as a plain mapping).
READ_SESSION = Call("readSession", _json(dict[str, Any]))
READ_BINDING = Call("readBinding", _raw)
WRITE_BINDING = Call("writeBinding", _raw)
READ_ACCESS = Call("readAccess", _raw)
REVOKE_TOKENS = Call("revokeTokens", _raw)
LIMIT_ATTEMPTS = Call("limitAttempts", _raw)
RAISE_SEQUENCE = Call("raiseSequence", _raw)
TAKE_TICKET = Call("takeTicket", _json(LineReply))
RESCHEDULE_BOOKING = Call("rescheduleBooking", _json(RescheduleReply))
READ_LINE = Call("readLine", _json(LineReply))

#: Every script the engine calls (the contract test checks it against lua/).
CALLS: tuple[Call[Any], ...] = (
    LOAD_SESSION, SET_CAPACITY, SUSPEND_SESSION, RESUME_SESSION, PAUSE_SESSION, HOLD_UNIT,
    REMEMBER_REFUSAL, CONFIRM_HOLD, RELEASE_HOLD, CANCEL_BOOKING, RESTORE_BOOKING, EXPIRE_HOLDS,
    JOIN_WAITLIST, LEAVE_WAITLIST, RESERVE_PATIENT, SETTLE_PATIENT, GET_AVAILABILITY, READ_SESSION,
    READ_BINDING, WRITE_BINDING, READ_ACCESS, REVOKE_TOKENS, LIMIT_ATTEMPTS, RAISE_SEQUENCE,
    TAKE_TICKET, READ_LINE, RESCHEDULE_BOOKING,
)
