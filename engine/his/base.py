"""The HIS contract: what the engine sends to the hospital information system.

A booking travels to the HIS at least once, carrying our booking id as its
idempotency identifier. Every call answers one of three outcomes:

- ``accepted``: the HIS holds the booking (or, for ``cancel``, no longer does);
- ``rejected``: the HIS refused it for a business reason (``reason`` says
  which, e.g. ``doctor_stopped``, ``patient_unknown``); the booking must be
  compensated, not retried;
- ``unknown``: the request may or may not have taken effect (a read timeout
  after the request went out). Reconcile with ``lookup``; never treat it as a
  failure and never as a success.

``ensure_patient`` finds or creates the patient (conditional create on the
national ID): ``accepted`` with the HIS's patient id in ``his_id``;
``rejected`` (reason ``patient_ambiguous`` when several patients match, or
the HIS's refusal) needs a human; ``unknown`` is looked up by sending it
again (the conditional create is idempotent).

``changes`` reads the HIS's change feed: the Appointments (booked, cancelled
at the window or by phone, arrived, no-show) and Schedules (停诊) updated
after an instant, oldest first, as :class:`HisChange` values.

When nothing can have happened (connection refused, 5xx, 429, an open
circuit breaker) the client raises :class:`HisUnavailable`: safe to retry
after a backoff.

``lookup`` answers with the same :class:`HisResult`:

- ``accepted`` (``his_id`` set): the HIS has it booked (or already seen:
  arrived, checked in, fulfilled, no-show);
- ``rejected`` with reason ``cancelled`` (or ``entered-in-error``): the HIS
  has it, cancelled;
- ``rejected`` with reason ``not_found`` (``his_id`` is ``None``): the HIS has
  no record of it, so sending it again is safe (and idempotent anyway);
- ``unknown`` with the HIS status as reason (``proposed``, ``pending``,
  ``waitlist``): the HIS has not decided yet; ``timeout`` when the read timed
  out.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec

Outcome = Literal["accepted", "rejected", "unknown"]
Period = Literal["AM", "PM"]

#: ``lookup`` reasons.
REASON_NOT_FOUND = "not_found"
REASON_CANCELLED = "cancelled"
REASON_TIMEOUT = "timeout"


class HisPatient:
    """The patient as the HIS registers them: only ever built on the
    forwarder's path, from the decrypted binding, and never logged (its
    ``repr`` shows masks)."""

    __slots__ = ("birth_date", "gender", "name", "national_id", "patient_ref", "phone")

    def __init__(self, *, patient_ref: str, national_id: str, name: str, phone: str,
                 gender: Literal["male", "female"], birth_date: str) -> None:
        self.patient_ref = patient_ref
        self.national_id = national_id
        self.name = name
        self.phone = phone
        self.gender = gender
        self.birth_date = birth_date

    @classmethod
    def of(cls, patient_ref: str, national_id: str, name: str, phone: str) -> HisPatient:
        """Gender and birth date derived from the ID (GB 11643-1999: YYYYMMDD at
        positions 7-14; the 17th digit odd for male, even for female)."""
        from engine.pii import normalize_national_id

        nid = normalize_national_id(national_id)
        return cls(patient_ref=patient_ref, national_id=nid, name=name, phone=phone,
                   gender="male" if int(nid[16]) % 2 else "female",
                   birth_date=f"{nid[6:10]}-{nid[10:12]}-{nid[12:14]}")

    def __repr__(self) -> str:
        from engine.pii import mask_id, mask_name, mask_phone

        return (f"HisPatient({mask_id(self.national_id)}, {mask_name(self.name)},"
                f" {mask_phone(self.phone)}, {self.gender})")


class HisBooking(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One confirmed booking as the HIS sees it. No raw personal data."""

    #: Our booking id, e.g. ``12.S20261201-D01-AM.57``: the idempotency key.
    booking_id: str
    session_id: str
    slot_id: str
    #: Queue number (号序) within the session.
    unit: int
    #: Opaque keyed hash of the patient's ID (never the ID itself).
    patient_ref: str
    doctor_id: str
    dept_id: str
    #: ISO 8601 datetimes; with an offset, or naive in hospital local time.
    start: str
    end: str
    #: Registration fee in cents (分).
    fee: int
    #: The HIS's own patient id (``ensure_patient``); None: the Appointment
    #: names the patient by ``patient_ref`` (no patient data at hand).
    patient_his_id: str | None = None


class HisResult(msgspec.Struct, frozen=True):
    outcome: Outcome
    his_id: str | None = None
    reason: str | None = None
    #: The visit window the HIS gave the appointment (ISO 8601), and where.
    start: str | None = None
    end: str | None = None
    place: str | None = None


class HisChange(msgspec.Struct, frozen=True, kw_only=True):
    """One resource the HIS changed (its change feed)."""

    resource: Literal["Appointment", "Schedule"]
    his_id: str
    version: str
    #: ``meta.lastUpdated`` (FHIR instant): the cursor moves past it.
    last_updated: str
    #: Appointment: its status (booked, cancelled, arrived, noshow, ...);
    #: Schedule: ``active`` or ``inactive`` (停诊).
    status: str
    #: Our booking id (Appointment) or session id (Schedule), if it is ours.
    booking_id: str | None = None
    session_id: str | None = None
    #: Why (cancelationReason's code or text), e.g. doctor_stopped.
    reason: str | None = None


class HisSlot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    start: str
    end: str
    capacity: int


class HisSchedule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One session (出诊): a doctor's half-day in a department, with its slots."""

    session_id: str
    hospital_id: str
    dept_id: str
    doctor_id: str
    #: ``YYYY-MM-DD``
    date: str
    period: Period
    #: Registration fee in cents (分).
    fee: int
    slots: tuple[HisSlot, ...] = ()
    #: ``False`` when the HIS withdrew the session (停诊).
    active: bool = True


class HisError(Exception):
    """Base of the HIS client's errors."""


class HisUnavailable(HisError):
    """Nothing happened on the HIS side (down, 5xx, 429, circuit open): retry later."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class HisProtocolError(HisError):
    """The HIS answered something we cannot interpret."""


@runtime_checkable
class HisClient(Protocol):
    """What the forwarder and the schedule sync need from a HIS back-end."""

    async def book(self, b: HisBooking) -> HisResult:
        """Create the appointment, idempotently on ``b.booking_id``."""
        ...

    async def cancel(self, booking_id: str, reason: str) -> HisResult:
        """Cancel it. Unknown or already cancelled bookings are ``accepted``."""
        ...

    async def lookup(self, booking_id: str) -> HisResult:
        """What the HIS knows of the booking (see the module docstring)."""
        ...

    async def fetch_schedules(self, start_date: str, end_date: str) -> list[HisSchedule]:
        """Sessions dated within ``[start_date, end_date]`` (``YYYY-MM-DD``)."""
        ...

    async def ensure_patient(self, p: HisPatient) -> HisResult:
        """Find or create the patient, idempotently on the national ID."""
        ...

    async def changes(self, resource: Literal["Appointment", "Schedule"], since: str
                      ) -> list[HisChange]:
        """Resources of this type updated after ``since`` (an instant; '' = all)."""
        ...

    async def aclose(self) -> None: ...
