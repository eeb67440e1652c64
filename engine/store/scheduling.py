"""Reads for the scheduling standards (the FHIR facade, SMART bulk publishing):
sessions with the names of their hospital, department and doctor, hospitals
with their contact, and the last bulk publication.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import msgspec

from engine.store.queries import Queryable

__all__ = [
    "BulkFile",
    "HospitalInfo",
    "SessionInfo",
    "SlotInfo",
    "bulk_file",
    "bulk_manifest",
    "hospitals",
    "replace_bulk",
    "sessions",
    "set_contact",
]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class SlotInfo(msgspec.Struct, frozen=True):
    slot_id: str
    start: str  # HH:MM, local time of the session
    end: str
    capacity: int


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    hospital_id: str
    hospital_name: str
    dept_id: str
    dept_name: str
    doctor_id: str
    doctor_name: str
    date: str
    period: str
    fee: int
    release_at_ms: int
    status: str
    #: Minutes east of UTC of the session's local times (480: China).
    tz_min: int
    slots: list[SlotInfo]


class HospitalInfo(msgspec.Struct, frozen=True, kw_only=True):
    hospital_id: str
    name: str
    #: phone, url, line (list), city, district, state, postal_code, country,
    #: latitude, longitude (all optional; ``haoyuan fhir-location``).
    contact: dict[str, Any]


_slots = msgspec.json.Decoder(list[SlotInfo])
_contact = msgspec.json.Decoder(dict[str, Any])

_SQL = """
SELECT s.id, s.hospital_id, h.name AS hospital_name, s.dept_id, dp.name AS dept_name,
       s.doctor_id, d.name AS doctor_name, s.date, s.period, s.fee_cents, s.release_at,
       s.status, coalesce((s.spec->>'tz_min')::int, 480) AS tz_min,
       coalesce(json_agg(json_build_object(
           'slot_id', sl.slot_id,
           'start', coalesce(to_char(sl.start_time, 'HH24:MI'), '00:00'),
           'end', coalesce(to_char(sl.end_time, 'HH24:MI'), '00:00'),
           'capacity', sl.capacity) ORDER BY sl.start_time, sl.slot_id)
         FILTER (WHERE sl.slot_id IS NOT NULL), '[]') AS slots
  FROM sessions s
  JOIN hospitals h ON h.id = s.hospital_id
  JOIN departments dp ON dp.id = s.dept_id
  JOIN doctors d ON d.id = s.doctor_id
  LEFT JOIN slots sl ON sl.session_id = s.id
 WHERE s.date BETWEEN $1 AND $2
   AND ($3::text[] IS NULL OR s.hospital_id = ANY($3))
   AND ($4::text[] IS NULL OR s.dept_id = ANY($4))
   AND ($5::text[] IS NULL OR s.doctor_id = ANY($5))
   AND ($6::text[] IS NULL OR s.id = ANY($6))
 GROUP BY s.id, h.name, dp.name, d.name
 ORDER BY s.date, s.period, s.id
 LIMIT $7
"""


async def sessions(
    db: Queryable,
    date_from: dt.date,
    date_to: dt.date,
    *,
    hospitals: Sequence[str] | None = None,
    depts: Sequence[str] | None = None,
    doctors: Sequence[str] | None = None,
    session_ids: Sequence[str] | None = None,
    limit: int = 2000,
) -> list[SessionInfo]:
    """Sessions of a date range (inclusive), optionally of some hospitals,
    departments, doctors or ids; ordered by date, half-day and id."""
    def opt(v: Sequence[str] | None) -> list[str] | None:
        return None if v is None else list(v)

    rows = await db.fetch(_SQL, date_from, date_to, opt(hospitals), opt(depts), opt(doctors),
                          opt(session_ids), limit)
    return [SessionInfo(
        session_id=r["id"], hospital_id=r["hospital_id"], hospital_name=r["hospital_name"],
        dept_id=r["dept_id"], dept_name=r["dept_name"], doctor_id=r["doctor_id"],
        doctor_name=r["doctor_name"], date=r["date"].isoformat(), period=r["period"],
        fee=r["fee_cents"], release_at_ms=(r["release_at"] - _EPOCH)
        // dt.timedelta(milliseconds=1), status=r["status"], tz_min=r["tz_min"],
        slots=_slots.decode(r["slots"])) for r in rows]


async def hospitals(db: Queryable, ids: Sequence[str] | None = None) -> list[HospitalInfo]:
    rows = await db.fetch(
        "SELECT id, name, contact::text AS contact FROM hospitals"
        " WHERE $1::text[] IS NULL OR id = ANY($1) ORDER BY id",
        None if ids is None else list(ids))
    return [HospitalInfo(hospital_id=r["id"], name=r["name"], contact=_contact.decode(
        r["contact"])) for r in rows]


async def set_contact(db: Queryable, hospital_id: str, contact: dict[str, Any]) -> bool:
    """Merge ``contact`` into a hospital's contact (a None value removes the key)."""
    keep = {k: v for k, v in contact.items() if v is not None}
    drop = [k for k, v in contact.items() if v is None]
    done = await db.fetchval(
        "UPDATE hospitals SET contact = (contact || $2::jsonb) - $3::text[] WHERE id = $1"
        " RETURNING true", hospital_id, msgspec.json.encode(keep).decode(), drop)
    return bool(done)


class BulkFile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: str
    body: bytes
    etag: str
    resources: int
    jurisdiction: list[str] = []


async def replace_bulk(db: Any, files: Sequence[BulkFile], *, transaction_time: dt.datetime,
                       fingerprint: str) -> None:
    """One publication replaces the last one, in one transaction."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM bulk_files")
        await conn.executemany(
            "INSERT INTO bulk_files (name, type, body, etag, resources, jurisdiction,"
            " generated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(f.name, f.type, f.body, f.etag, f.resources, f.jurisdiction, transaction_time)
             for f in files])
        await conn.execute(
            "INSERT INTO bulk_publication (id, transaction_time, fingerprint, files)"
            " VALUES (true, $1, $2, $3) ON CONFLICT (id) DO UPDATE SET"
            " transaction_time = $1, fingerprint = $2, files = $3",
            transaction_time, fingerprint, len(files))


async def bulk_manifest(db: Queryable) -> tuple[dt.datetime, str, list[BulkFile]] | None:
    """(transaction time, fingerprint, files without bodies) of the last publication."""
    pub = await db.fetchrow("SELECT transaction_time, fingerprint FROM bulk_publication")
    if pub is None:
        return None
    rows = await db.fetch("SELECT name, type, etag, resources, jurisdiction FROM bulk_files"
                          " ORDER BY CASE type WHEN 'Location' THEN 0 WHEN 'Schedule' THEN 1"
                          " ELSE 2 END, name")
    return pub["transaction_time"], pub["fingerprint"], [
        BulkFile(name=r["name"], type=r["type"], body=b"", etag=r["etag"],
                 resources=r["resources"], jurisdiction=list(r["jurisdiction"]))
        for r in rows]


async def bulk_file(db: Queryable, name: str) -> BulkFile | None:
    r = await db.fetchrow("SELECT name, type, body, etag, resources, jurisdiction"
                          " FROM bulk_files WHERE name = $1", name)
    return None if r is None else BulkFile(name=r["name"], type=r["type"], body=bytes(r["body"]),
                                           etag=r["etag"], resources=r["resources"],
                                           jurisdiction=list(r["jurisdiction"]))
