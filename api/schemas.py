"""Request and response bodies (msgspec Structs): the API's contract.

Inputs forbid unknown fields (mass assignment is a 422, nothing changes).
Identifiers share the engine's patterns (``engine.model``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from engine.model import SessionId, SlotId

__all__ = [
    "HOLD_ID_RE",
    "IDEMPOTENCY_RE",
    "AttendanceIn",
    "BanLiftedOut",
    "BookingOut",
    "CancelledOut",
    "CapacityIn",
    "CoBindingOut",
    "DepartmentOut",
    "DoctorOut",
    "HoldIn",
    "HoldOut",
    "HoldView",
    "HospitalOut",
    "PatientIn",
    "PatientOut",
    "PaymentIn",
    "ReleasedOut",
    "SessionOut",
    "SlotOut",
    "StaffHoldIn",
    "SuspendIn",
    "TokenOut",
    "VerifyIn",
    "WaitlistIn",
    "WaitlistOut",
    "WechatLoginIn",
]

#: Hold and booking ids: ``<partition>.<session id>.<sequence>``.
HOLD_ID_RE = re.compile(r"\d{1,3}\.[A-Za-z0-9_-]{1,64}\.\d{1,19}", re.ASCII)
IDEMPOTENCY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)

Uuid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Ms = Annotated[int, msgspec.Meta(ge=0)]


# --------------------------------------------------------------------------- auth


class WechatLoginIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class TokenOut(msgspec.Struct, frozen=True):
    token: str
    expires_at_ms: int
    account_id: str
    token_type: Literal["Bearer"] = "Bearer"


# --------------------------------------------------------------------------- patients


#: A one-time ticket of a real-name / face check the person took on the
#: phone (WeChat 实名核身): it proves the account holder is the patient.
Ticket = Annotated[str, msgspec.Meta(min_length=1, max_length=512,
                                     pattern=r"^[A-Za-z0-9_.:=+/-]+$")]
#: A binding's real-name check: ``self`` (the account holder is the
#: patient), ``data`` (ID, name and phone belong together), or why not.
Verification = Literal["self", "data", "mismatch", "unknown", "unavailable", "unverified"]


class PatientIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    phone: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    national_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    ticket: Ticket | None = None


class VerifyIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    ticket: Ticket | None = None


class PatientOut(msgspec.Struct, frozen=True):
    """A bound patient, masked: ``张*丰``, ``138****1234``, ``110***********1234``.
    Only a ``verified`` patient can hold."""

    patient_id: str
    name: str
    phone: str
    national_id: str
    created_at_ms: int
    verified: bool = False
    verification: Verification = "unverified"


class CoBindingOut(msgspec.Struct, frozen=True):
    """Another account's binding of the same ID number (masked as that account entered it)."""

    binding_id: str
    name: str
    phone: str
    verified: bool
    verification: Verification
    created_at_ms: int


# --------------------------------------------------------------------------- catalogue


class HospitalOut(msgspec.Struct, frozen=True):
    hospital_id: str
    name: str


class DepartmentOut(msgspec.Struct, frozen=True):
    dept_id: str
    hospital_id: str
    name: str
    #: 科室介绍
    intro: str | None = None


class DoctorOut(msgspec.Struct, frozen=True):
    doctor_id: str
    dept_id: str
    hospital_id: str
    name: str
    #: 职称
    title: str | None = None
    #: 擅长
    expertise: str | None = None


class SlotOut(msgspec.Struct, frozen=True):
    slot_id: str
    start: str
    end: str
    capacity: int


class SessionOut(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    hospital_id: str
    dept_id: str
    doctor_id: str
    doctor_name: str
    date: str
    period: Literal["AM", "PM"]
    fee: int
    release_at_ms: int
    cutoff_ms: int | None = None
    starts_ms: int | None = None
    status: Literal["open", "suspended", "paused"]
    slots: list[SlotOut]
    dept_name: str | None = None
    doctor_title: str | None = None
    #: 就诊地点
    location: str | None = None


# --------------------------------------------------------------------------- holds, bookings


class HoldIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    session_id: SessionId
    slot_id: SlotId
    patient_id: Uuid


class HoldOut(msgspec.Struct, frozen=True):
    hold_id: str
    session_id: str
    slot_id: str
    unit: int
    expires_at_ms: int
    server_ms: int
    replay: bool = False


HoldState = Literal["held", "booked", "expired", "released", "cancelled", "refund_due"]


class HoldView(msgspec.Struct, frozen=True, kw_only=True):
    hold_id: str
    session_id: str
    slot_id: str
    unit: int
    state: HoldState
    expires_at_ms: int | None = None
    fee: int | None = None


class MyHold(msgspec.Struct, frozen=True, kw_only=True):
    """A live hold of the account: pay before ``expires_at_ms``."""

    hold_id: str
    session_id: str
    slot_id: str
    unit: int
    expires_at_ms: int
    fee: int | None = None
    #: Made for the account by the waitlist (候补): a unit came back.
    offer: bool = False
    patient_id: str | None = None


class MyPlace(msgspec.Struct, frozen=True, kw_only=True):
    """A place in a session's waitlist."""

    session_id: str
    position: int
    patient_id: str | None = None


class MineOut(msgspec.Struct, frozen=True, kw_only=True):
    server_ms: int
    holds: list[MyHold]
    waitlist: list[MyPlace]


class PaymentIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    payment_ref: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    amount: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]


class BookingOut(msgspec.Struct, frozen=True, kw_only=True):
    booking_id: str
    session_id: str
    slot_id: str
    unit: int | None
    status: Literal["booked", "cancelled", "refund_due", "conflict"]
    fee: int | None = None
    server_ms: int | None = None
    booked_at_ms: int | None = None
    cancelled_at_ms: int | None = None
    his_status: str | None = None
    late: bool = False
    replay: bool = False
    #: The HIS's appointment id, once it accepted the booking.
    his_appointment_id: str | None = None
    #: The visit window the HIS gave (ISO 8601, China time) and where to go.
    visit_start: str | None = None
    visit_end: str | None = None
    place: str | None = None
    #: Why the booking ended without a visit, in the patient's words.
    reason_text: str | None = None
    #: Its refund, if it has one.
    refund: RefundView | None = None


class RefundView(msgspec.Struct, frozen=True, kw_only=True):
    """A booking's refund as the patient sees it."""

    state: Literal["due", "requested", "succeeded", "failed"]
    #: Fen.
    amount: int
    state_text: str


class ReleasedOut(msgspec.Struct, frozen=True):
    hold_id: str
    server_ms: int
    status: Literal["released"] = "released"
    replay: bool = False


class CancelledOut(msgspec.Struct, frozen=True):
    booking_id: str
    server_ms: int
    reason: str
    status: Literal["cancelled"] = "cancelled"
    replay: bool = False


class RescheduleIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where to move the booking: another session or slot (改约)."""

    session_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    slot_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class RescheduledOut(msgspec.Struct, frozen=True, kw_only=True):
    """The new booking, paid by the old one's payment; the old one is cancelled."""

    booking_id: str
    previous_id: str
    session_id: str
    slot_id: str
    unit: int
    fee: int
    previous_fee: int
    #: What the patient owes (positive) or is owed (negative): finance
    #: settles it (a recorded fee adjustment).
    fee_difference: int
    #: Inside a day of the old visit: counted as a late cancel.
    late: bool
    server_ms: int
    replay: bool = False


class WaitlistIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    patient_id: Uuid


class WaitlistOut(msgspec.Struct, frozen=True):
    """The patient's place on the session's waitlist (候补), 1 = next offer."""

    session_id: str
    position: int
    server_ms: int
    replay: bool = False


# --------------------------------------------------------------------------- admin


class CapacityIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    capacity: Annotated[int, msgspec.Meta(ge=0, le=9999)]


class SuspendIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    reason: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}$")] = "doctor_stopped"


#: A patient ref: the keyed hash of the national ID (``Crypto.id_hash``).
PatientRef = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_:.-]{1,128}$")]


class StaffHoldIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A hold made by hospital staff for a patient of a staff channel (号源池).

    The patient is named by the ID card the clerk reads (``national_id``):
    the server finds the patient from it, and staff never handle the keyed
    hash. ``patient_ref`` (the hash itself) is still taken from integrations
    that have it; exactly one of the two."""

    session_id: SessionId
    slot_id: SlotId
    channel: Literal["phone", "window", "referral"]
    national_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] | None = None
    patient_ref: PatientRef | None = None


class AttendanceIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    attended: bool


class BanLiftedOut(msgspec.Struct, frozen=True):
    patient_ref: str
    lifted: int
