"""The demo hospital: departments, doctors and one day's sessions, with a
popularity skew (a few famous doctors take most of the demand)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from engine.model import SessionSpec, SlotSpec

CST = dt.timezone(dt.timedelta(hours=8))

DEPARTMENTS = [
    ("STOMA", "Stomatology"), ("CARDIO", "Cardiology"), ("PEDS", "Paediatrics"),
    ("DERM", "Dermatology"), ("ORTHO", "Orthopaedics"), ("OPHTH", "Ophthalmology"),
    ("GASTRO", "Gastroenterology"), ("NEURO", "Neurology"),
]


def demo_sessions(*, release_at_ms: int, date: str, departments: int, doctors_per_dept: int,
                  slots_per_session: int, units_per_slot: int, hold_ttl_ms: int
                  ) -> list[SessionSpec]:
    """One AM and one PM session per doctor; slots of 30 minutes from 08:00 / 13:30."""
    day = dt.date.fromisoformat(date)
    specs = []
    for d_id, _name in DEPARTMENTS[:departments]:
        for k in range(doctors_per_dept):
            doctor = f"{d_id}-DR{k + 1:02d}"
            halves: tuple[tuple[Literal["AM", "PM"], int], ...] = (("AM", 8 * 60),
                                                                    ("PM", 13 * 60 + 30))
            for period, first in halves:
                slots = []
                for i in range(slots_per_session):
                    start, end = first + 30 * i, first + 30 * (i + 1)
                    slots.append(SlotSpec(
                        slot_id=f"{start // 60:02d}{start % 60:02d}",
                        start=f"{start // 60:02d}:{start % 60:02d}",
                        end=f"{end // 60:02d}:{end % 60:02d}",
                        capacity=units_per_slot))
                starts = dt.datetime.combine(day, dt.time(first // 60, first % 60), CST)
                specs.append(SessionSpec(
                    session_id=f"{date.replace('-', '')}-{doctor}-{period}",
                    hospital="DEMO-H1", dept=d_id, doctor=doctor, date=date, period=period,
                    fee=5000 if k == 0 else 1500,  # the famous expert costs more
                    release_at_ms=release_at_ms, hold_ttl_ms=hold_ttl_ms,
                    starts_ms=int(starts.timestamp() * 1000), cancel_before_ms=30 * 60_000,
                    slots=slots))
    return specs


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(w)
    return [x / total for x in w]
