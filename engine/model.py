"""Input schemas for the engine: a session (出诊) and its slots (时段)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

import msgspec

SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
SlotId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_:-]{1,32}$")]
#: No whitespace, "|" (key separator), control characters (PostgreSQL refuses
#: NUL in text) or lone surrogates (not encodable).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                   pattern=r"^[^\s|\x00-\x1f\x7f\ud800-\udfff]+$")]
Date = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]
Clock = Annotated[str, msgspec.Meta(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
#: A fee in cents: PostgreSQL keeps it in an integer column.
Fee = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
#: Epoch milliseconds (or a duration) up to 2100-01-01: PostgreSQL and Python
#: timestamps end at year 9999 (294276), 2**53 ms is the year 287,396.
MAX_MS = 4_102_444_800_000
Ms = Annotated[int, msgspec.Meta(ge=0, le=MAX_MS)]
Kind = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$")]


#: 号源池: pool indices in Redis scores (0 is the public pool).
POOLS = {"public": 0, "phone": 1, "window": 2, "referral": 3}
PoolName = Literal["phone", "window", "referral"]


class SlotSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    slot_id: SlotId
    start: Clock
    end: Clock
    capacity: Annotated[int, msgspec.Meta(ge=0, le=9999)]
    #: Units set aside for channels when the slot is created; the rest are public.
    pools: dict[PoolName, Annotated[int, msgspec.Meta(ge=0, le=9999)]] = {}


Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
LongText = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]


class Display(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What patients see when they browse: names and words, never a rule.
    Each field given updates the stored one; a field left out keeps it."""

    hospital_name: Text | None = None
    dept_name: Text | None = None
    #: 科室介绍
    dept_intro: LongText | None = None
    doctor_name: Text | None = None
    #: 职称: 主任医师, 副主任医师, ...
    doctor_title: Text | None = None
    #: 擅长
    doctor_expertise: LongText | None = None
    #: Where the visit is: building, floor, room (就诊地点)
    location: Text | None = None


class SessionSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One doctor, one date, one half-day. Times are epoch milliseconds."""

    session_id: SessionId
    hospital: Name
    dept: Name
    doctor: Name
    date: Date
    period: Literal["AM", "PM"]
    fee: Fee
    release_at_ms: Ms
    slots: Annotated[list[SlotSpec], msgspec.Meta(min_length=1, max_length=96)]
    cutoff_ms: Ms = 0
    starts_ms: Ms = 0
    cancel_before_ms: Ms = 0
    hold_ttl_ms: Annotated[int, msgspec.Meta(ge=1000, le=86_400_000)] = 600_000
    scope: Literal["dept", "doctor"] = "dept"
    #: 候补: payment window of a unit offered to the waitlist head (0 = no waitlist).
    waitlist_ttl_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 0
    waitlist_max: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    #: Anti-scalper: a returned unit comes back after a random delay in [0, this).
    rerelease_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0
    #: When the channels' unsold pool units return to the public (0 = never).
    pool_return_ms: Ms = 0
    #: Booking closed at night: local minutes of the day [from, to) (equal = never).
    night_from_min: Annotated[int, msgspec.Meta(ge=0, le=1440)] = 0
    night_to_min: Annotated[int, msgspec.Meta(ge=0, le=1440)] = 0
    tz_min: Annotated[int, msgspec.Meta(ge=-720, le=840)] = 480
    #: expert / general ...: picks the cancellation deadline in the hospital rules.
    kind: Kind = "general"
    #: At most this many active holds and bookings per patient across the
    #: hospital (the hospital's rule; 0 = the engine's default).
    max_active_per_patient: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    #: Names and words shown when browsing (PostgreSQL only; never in Redis).
    display: Display | None = None

    def __post_init__(self) -> None:
        # The pattern admits 2026-02-31; the calendar does not.
        try:
            dt.date.fromisoformat(self.date)
        except ValueError:
            raise ValueError(f"date {self.date!r} is not a calendar date") from None
        for s in self.slots:
            if sum(s.pools.values()) > s.capacity:
                raise ValueError(f"slot {s.slot_id}: pools exceed its capacity")

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.slots)

    def lua_json(self) -> bytes:
        """The JSON that loadSession-5.lua reads."""
        return msgspec.json.encode(
            {
                "sid": self.session_id,
                "hospital": self.hospital,
                "dept": self.dept,
                "doctor": self.doctor,
                "date": self.date,
                "period": self.period,
                "fee": self.fee,
                "release_ms": self.release_at_ms,
                "cutoff_ms": self.cutoff_ms,
                "starts_ms": self.starts_ms,
                "cancel_before_ms": self.cancel_before_ms,
                "hold_ttl_ms": self.hold_ttl_ms,
                "scope": self.scope,
                "waitlist_ttl_ms": self.waitlist_ttl_ms,
                "waitlist_max": self.waitlist_max,
                "rerelease_ms": self.rerelease_ms,
                "pool_return_ms": self.pool_return_ms,
                "night_from_min": self.night_from_min,
                "night_to_min": self.night_to_min,
                "tz_min": self.tz_min + 1440,  # kept non-negative in Redis
                "max_active": self.max_active_per_patient,
                "slots": [
                    {"id": s.slot_id, "start": s.start, "end": s.end, "cap": s.capacity,
                     **({"pools": {str(POOLS[k]): v for k, v in s.pools.items()}}
                        if s.pools else {})}
                    for s in self.slots
                ],
            }
        )


def parse_session(data: bytes | str) -> SessionSpec:
    """Decode and validate one session; raises msgspec.ValidationError."""
    return msgspec.json.decode(data, type=SessionSpec)


def parse_sessions(data: bytes | str) -> list[SessionSpec]:
    return msgspec.json.decode(data, type=list[SessionSpec])
