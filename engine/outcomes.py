"""Typed results of engine decisions.

Every refusal is a value (``Refused`` with a ``Reason``), never an exception:
callers switch on the type. Lua scripts answer with small integer codes,
mirrored here by ``Code`` (the BullMQ habit: one table on each side).
"""

from __future__ import annotations

import enum

import msgspec


class Code(enum.IntEnum):
    OK = 0
    NOT_OPEN = -1
    SOLD_OUT = -2
    SUSPENDED = -3
    DUPLICATE = -4
    RATE_LIMITED = -5
    EXPIRED = -6
    NOT_FOUND = -7
    INVALID_STATE = -8
    IDEMPOTENCY_MISMATCH = -9
    CLOSED = -10
    CANCEL_DEADLINE = -11
    BANNED = -12
    LIMIT_REACHED = -13
    WAITLIST_FULL = -14
    RECOVERING = -15
    PAUSED = -16


class Reason(enum.StrEnum):
    NOT_OPEN = "not-open"
    SOLD_OUT = "sold-out"
    SUSPENDED = "suspended"
    DUPLICATE = "duplicate"
    RATE_LIMITED = "rate-limited"
    EXPIRED = "expired"
    NOT_FOUND = "not-found"
    INVALID_STATE = "invalid-state"
    IDEMPOTENCY_MISMATCH = "idempotency-mismatch"
    CLOSED = "closed"
    CANCEL_DEADLINE = "cancel-deadline"
    BANNED = "banned"
    LIMIT_REACHED = "limit-reached"
    WAITLIST_FULL = "waitlist-full"
    RECOVERING = "recovering"
    PAUSED = "paused"


REASON_OF_CODE: dict[int, Reason] = {
    Code.NOT_OPEN: Reason.NOT_OPEN,
    Code.SOLD_OUT: Reason.SOLD_OUT,
    Code.SUSPENDED: Reason.SUSPENDED,
    Code.DUPLICATE: Reason.DUPLICATE,
    Code.RATE_LIMITED: Reason.RATE_LIMITED,
    Code.EXPIRED: Reason.EXPIRED,
    Code.NOT_FOUND: Reason.NOT_FOUND,
    Code.INVALID_STATE: Reason.INVALID_STATE,
    Code.IDEMPOTENCY_MISMATCH: Reason.IDEMPOTENCY_MISMATCH,
    Code.CLOSED: Reason.CLOSED,
    Code.CANCEL_DEADLINE: Reason.CANCEL_DEADLINE,
    Code.BANNED: Reason.BANNED,
    Code.LIMIT_REACHED: Reason.LIMIT_REACHED,
    Code.WAITLIST_FULL: Reason.WAITLIST_FULL,
    Code.RECOVERING: Reason.RECOVERING,
    Code.PAUSED: Reason.PAUSED,
}

MESSAGES: dict[Reason, str] = {
    Reason.NOT_OPEN: "booking for this session is not open yet",
    Reason.SOLD_OUT: "no unit of this slot is free",
    Reason.SUSPENDED: "the doctor has stopped this session",
    Reason.DUPLICATE: "this patient already holds or has booked a unit that day",
    Reason.RATE_LIMITED: "too many requests; retry later",
    Reason.EXPIRED: "the hold expired and no unit was left: the payment is refunded",
    Reason.NOT_FOUND: "no such session, slot, hold or booking",
    Reason.INVALID_STATE: "the hold or booking is not in a state that allows this",
    Reason.IDEMPOTENCY_MISMATCH: "this idempotency key was used for another request",
    Reason.CLOSED: "booking for this session has closed",
    Reason.CANCEL_DEADLINE: "the cancellation deadline has passed",
    Reason.BANNED: "this patient is barred from booking for a period (missed appointments)",
    Reason.LIMIT_REACHED: "this patient has reached the hospital's limit of active bookings",
    Reason.WAITLIST_FULL: "the waitlist of this session is full",
    Reason.RECOVERING: "sales are closed while the engine recovers its state; retry shortly",
    Reason.PAUSED: "sales of this session are paused (暂停放号); come back later",
}


class Restore(enum.StrEnum):
    """What ``Engine.restore_booking`` did with a booking PostgreSQL holds."""

    RESTORED = "restored"  # put back on its unit
    ALREADY = "already"  # it was there
    #: Redis holds the record as ended, which is newer than a "booked" row
    #: whose later events PostgreSQL has not seen: never turned back.
    KEPT_CANCELLED = "kept-cancelled"
    KEPT_REFUNDED = "kept-refunded"
    KEPT_DISPLACED = "kept-displaced"


    @classmethod
    def kept(cls, state: str) -> Restore:
        """The outcome for a record Redis kept ended in ``state`` (c, r or x)."""
        return {"c": cls.KEPT_CANCELLED, "r": cls.KEPT_REFUNDED, "x": cls.KEPT_DISPLACED}[state]


class RecordState(enum.StrEnum):
    """A hold/booking record's state, as the scripts store it (one letter)."""

    HELD = "h"
    BOOKED = "b"
    EXPIRED = "x"
    RELEASED = "v"
    CANCELLED = "c"
    REFUND_DUE = "r"  # a payment that found no unit

    @property
    def label(self) -> str:
        """The word the API and reports use: held, booked, expired, ..."""
        return _LABELS[self]


_LABELS = {RecordState.HELD: "held", RecordState.BOOKED: "booked",
           RecordState.EXPIRED: "expired", RecordState.RELEASED: "released",
           RecordState.CANCELLED: "cancelled", RecordState.REFUND_DUE: "refund_due"}


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One hold or booking as Redis holds it (holds and bookings share an id,
    ``<partition>.<session>.<seq>``); the JSON keys are the scripts' short
    ones (``lua/includes/records.lua``)."""

    id: str
    session_id: str = msgspec.field(name="sid")
    slot_id: str = msgspec.field(name="slot")
    unit: int
    score: int = msgspec.field(name="sc")
    patient: str = msgspec.field(name="pat")
    account: str = msgspec.field(name="acct")
    state: RecordState = msgspec.field(name="st")
    #: A hold's payment deadline (kept on the booking it became).
    deadline_ms: int = msgspec.field(default=0, name="dl")
    at_ms: int = msgspec.field(default=0, name="at")
    fee: int | None = None
    payment_ref: str = msgspec.field(default="", name="pay")
    booked_at_ms: int = msgspec.field(default=0, name="bt")
    ended_ms: int = msgspec.field(default=0, name="ended")
    reason: str = msgspec.field(default="", name="rsn")
    #: A patient's cancel within a day of the visit (the no-show policy).
    late: int = 0
    #: The patient-wide reservation's request id of the hold.
    request_id: str = msgspec.field(default="", name="rq")
    #: 1 for a unit offered to the head of a waitlist (候补).
    waitlist_offer: int = msgspec.field(default=0, name="wl")
    #: 1 for a booking a rebuild put back from PostgreSQL.
    restored: int = 0
    #: How often this booking was rescheduled (改约), and the booking it came from.
    reschedules: int = msgspec.field(default=0, name="rs")
    previous_id: str = msgspec.field(default="", name="prev")


decode_record = msgspec.json.Decoder(Record).decode


class Held(msgspec.Struct, frozen=True, tag="held"):
    hold_id: str
    session_id: str
    slot_id: str
    unit: int
    expires_at_ms: int
    server_ms: int
    replay: bool = False
    ok: bool = True


class Booked(msgspec.Struct, frozen=True, tag="booked"):
    booking_id: str
    session_id: str
    slot_id: str
    unit: int
    server_ms: int
    late: bool = False
    replay: bool = False
    ok: bool = True


class Rescheduled(msgspec.Struct, frozen=True, tag="rescheduled"):
    """The new booking (paid by the old one's payment) and the old one, ended."""

    booking_id: str
    previous_id: str
    session_id: str
    slot_id: str
    unit: int
    fee: int
    previous_fee: int
    server_ms: int
    late: bool = False
    replay: bool = False
    ok: bool = True


class Released(msgspec.Struct, frozen=True, tag="released"):
    hold_id: str
    server_ms: int
    replay: bool = False
    ok: bool = True


class Cancelled(msgspec.Struct, frozen=True, tag="cancelled"):
    booking_id: str
    server_ms: int
    reason: str = ""
    late: bool = False
    replay: bool = False
    ok: bool = True


class Suspended(msgspec.Struct, frozen=True, tag="suspended"):
    session_id: str
    cancelled: int
    released: int
    server_ms: int
    ok: bool = True


class Refused(msgspec.Struct, frozen=True, tag="refused"):
    reason: Reason
    server_ms: int
    message: str = ""
    retry_after_ms: int | None = None
    release_at_ms: int | None = None
    cutoff_ms: int | None = None
    deadline_ms: int | None = None
    until_ms: int | None = None
    existing_id: str | None = None
    state: str | None = None
    what: str | None = None
    refund_due: bool = False
    replay: bool = False
    ok: bool = False


class SlotAvailability(msgspec.Struct, frozen=True):
    slot_id: str
    start: str
    end: str
    capacity: int
    free: int


class SessionAvailability(msgspec.Struct, frozen=True):
    session_id: str
    status: str
    release_at_ms: int
    cutoff_ms: int
    slots: list[SlotAvailability]
    waiting: int = 0

    @property
    def free(self) -> int:
        return sum(s.free for s in self.slots)

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.slots)


class Availability(msgspec.Struct, frozen=True):
    server_ms: int
    sessions: list[SessionAvailability]


class SlotLoad(msgspec.Struct, frozen=True):
    slot_id: str
    capacity: int
    requested: int


class Loaded(msgspec.Struct, frozen=True):
    session_id: str
    partition: int
    created: bool
    slots: list[SlotLoad]
    #: Whether the partition sells (its recovery marker is set); False for a
    #: partition that lost its data and waits for ``haoyuan rebuild``.
    open: bool = True


class SlotAudit(msgspec.Struct):
    slot_id: str
    capacity: int
    free: int
    held: int
    booked: int
    delayed: int = 0


class SessionAudit(msgspec.Struct):
    session_id: str
    capacity: int
    free: int
    held: int
    booked: int
    delayed: int
    ok: bool
    breaches: list[str]
    slots: list[SlotAudit]
    booked_units: dict[str, int] = {}


class Waitlisted(msgspec.Struct, frozen=True, tag="waitlisted"):
    session_id: str
    position: int
    server_ms: int
    replay: bool = False
    ok: bool = True
