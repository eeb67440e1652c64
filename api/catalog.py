"""Read queries of the browse catalogue (hospitals, departments, doctors,
sessions), and a small ops query, over the schema of ``engine.store``.

Private to the API: ``engine.store.queries`` holds the writes and the
queries the engine shares; these are the API's own reads.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from api.schemas import DepartmentOut, DoctorOut, HospitalOut, SessionOut, SlotOut
from engine.rules import Rules, load_rules
from engine.store.queries import Queryable

__all__ = [
    "MAX_DAYS",
    "departments",
    "doctors",
    "hospitals",
    "rules_for_session",
    "session",
    "sessions",
    "set_slot_capacity",
]

MAX_DAYS = 31
_slots = msgspec.json.Decoder(list[SlotOut])
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_SESSION_SQL = """
SELECT s.id, s.hospital_id, s.dept_id, s.doctor_id, d.name AS doctor_name, s.date, s.period,
       s.fee_cents, s.release_at, s.cutoff_at, s.starts_at, s.status, d.title AS doctor_title,
       s.location, (SELECT p.name FROM departments p WHERE p.id = s.dept_id) AS dept_name,
       coalesce(json_agg(json_build_object(
           'slot_id', sl.slot_id,
           'start', coalesce(to_char(sl.start_time, 'HH24:MI'), ''),
           'end', coalesce(to_char(sl.end_time, 'HH24:MI'), ''),
           'capacity', sl.capacity) ORDER BY sl.start_time, sl.slot_id)
         FILTER (WHERE sl.slot_id IS NOT NULL), '[]') AS slots
  FROM sessions s
  JOIN doctors d ON d.id = s.doctor_id
  LEFT JOIN slots sl ON sl.session_id = s.id
"""


def _ms(t: dt.datetime | None) -> int | None:
    return None if t is None else (t - _EPOCH) // dt.timedelta(milliseconds=1)


def _session(r: Any) -> SessionOut:
    return SessionOut(
        session_id=r["id"],
        hospital_id=r["hospital_id"],
        dept_id=r["dept_id"],
        doctor_id=r["doctor_id"],
        doctor_name=r["doctor_name"],
        date=r["date"].isoformat(),
        period=r["period"],
        fee=r["fee_cents"],
        release_at_ms=_ms(r["release_at"]) or 0,
        cutoff_ms=_ms(r["cutoff_at"]),
        starts_ms=_ms(r["starts_at"]),
        status=r["status"],
        slots=_slots.decode(r["slots"]),
        dept_name=r["dept_name"],
        doctor_title=r["doctor_title"],
        location=r["location"],
    )


async def hospitals(db: Queryable) -> list[HospitalOut]:
    rows = await db.fetch("SELECT id, name FROM hospitals ORDER BY id LIMIT 1000")
    return [HospitalOut(r["id"], r["name"]) for r in rows]


async def departments(db: Queryable, hospital_id: str) -> list[DepartmentOut] | None:
    """None if the hospital is unknown."""
    rows = await db.fetch(
        "SELECT h.id AS hid, d.id, d.name, d.intro FROM hospitals h"
        " LEFT JOIN departments d ON d.hospital_id = h.id WHERE h.id = $1 ORDER BY d.id",
        hospital_id,
    )
    if not rows:
        return None
    return [DepartmentOut(r["id"], r["hid"], r["name"], r["intro"]) for r in rows
            if r["id"] is not None]


async def doctors(db: Queryable, dept_id: str) -> list[DoctorOut] | None:
    """None if the department is unknown."""
    rows = await db.fetch(
        "SELECT p.id AS did, p.hospital_id AS hid, d.id, d.name, d.title, d.expertise"
        " FROM departments p"
        " LEFT JOIN doctors d ON d.dept_id = p.id WHERE p.id = $1 ORDER BY d.id",
        dept_id,
    )
    if not rows:
        return None
    return [
        DoctorOut(r["id"], r["did"], r["hid"], r["name"], r["title"], r["expertise"])
        for r in rows
        if r["id"] is not None
    ]


async def sessions(
    db: Queryable,
    date_from: dt.date,
    date_to: dt.date,
    *,
    hospital: str | None = None,
    dept: str | None = None,
    doctor: str | None = None,
    limit: int = 500,
) -> list[SessionOut]:
    rows = await db.fetch(
        _SESSION_SQL
        + " WHERE s.date BETWEEN $1 AND $2 AND ($3::text IS NULL OR s.hospital_id = $3)"
        " AND ($4::text IS NULL OR s.dept_id = $4) AND ($5::text IS NULL OR s.doctor_id = $5)"
        " GROUP BY s.id, d.name, d.title ORDER BY s.date, s.period, s.id LIMIT $6",
        date_from,
        date_to,
        hospital,
        dept,
        doctor,
        limit,
    )
    return [_session(r) for r in rows]


async def session(db: Queryable, session_id: str) -> SessionOut | None:
    r = await db.fetchrow(_SESSION_SQL + " WHERE s.id = $1 GROUP BY s.id, d.name, d.title",
                          session_id)
    return None if r is None else _session(r)


async def set_slot_capacity(db: Queryable, session_id: str, slot_id: str, capacity: int) -> None:
    """Record a capacity the engine accepted (the catalogue's copy)."""
    await db.execute(
        "UPDATE slots SET capacity = $3 WHERE session_id = $1 AND slot_id = $2",
        session_id,
        slot_id,
        capacity,
    )


async def rules_for_session(db: Any, session_id: str) -> Rules:
    """The rules of a session's hospital and department (the defaults if none are stored)."""
    row = await db.fetchrow("SELECT hospital_id, dept_id FROM sessions WHERE id = $1", session_id)
    if row is None:
        return Rules()
    rules = await load_rules(db, row["hospital_id"])
    return rules.for_dept(row["dept_id"])
