"""Typed async queries over asyncpg: schedules, accounts, patients, bookings, audits.

Functions take a connection (``pool.acquire()``) or, where no transaction is
needed, a pool. Rows come back as msgspec Structs. Patient data leaves only
masked (``PatientView``); a patient is named elsewhere by its ref, the keyed
hash of its national ID (``Crypto.id_hash``).
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import msgspec

from engine.keys import partition_of
from engine.pii import (
    Crypto,
    mask_id,
    mask_name,
    mask_phone,
    normalize_national_id,
    normalize_phone,
)

__all__ = [
    "AccountPatientLimit",
    "BookingRow",
    "Connection",
    "IdAccountLimit",
    "PatientView",
    "Queryable",
    "ScheduleConflict",
    "StoredSession",
    "StoredSlot",
    "active_bookings_by_session",
    "bind_patient",
    "booked_counts",
    "booking_by_id",
    "bookings_for_account",
    "count_bound",
    "create_account",
    "find_account",
    "get_patient_ref",
    "list_patients",
    "lock_id",
    "record_audit_run",
    "set_session_status",
    "store_openid",
    "unbind_patient",
    "upsert_schedule",
]


class Queryable(Protocol):
    """What a pool and a connection both offer (the subset used here)."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def executemany(self, command: str, args: Iterable[Sequence[Any]]) -> None: ...
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any, column: int = 0) -> Any: ...


class Connection(Queryable, Protocol):
    """A single connection: it can open a transaction."""

    def transaction(self) -> Any: ...


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ts(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


# --------------------------------------------------------------------------- schedule


class StoredSlot(msgspec.Struct, frozen=True):
    slot_id: str
    start: str  # "HH:MM"
    end: str  # "HH:MM"
    capacity: int


class StoredSession(msgspec.Struct, frozen=True, kw_only=True):
    """A session as recorded; times are epoch milliseconds like ``SessionSpec``.

    ``cutoff_ms``/``starts_ms`` of 0 mean "not set" (NULL). Names default to
    the ids when not given, and a given name updates the stored one.
    """

    session_id: str
    hospital: str
    dept: str
    doctor: str
    date: str  # "YYYY-MM-DD"
    period: Literal["AM", "PM"]
    fee_cents: int
    release_at_ms: int
    slots: list[StoredSlot]
    cutoff_ms: int = 0
    starts_ms: int = 0
    cancel_before_ms: int = 0
    hold_ttl_ms: int = 600_000
    scope: Literal["dept", "doctor"] = "dept"
    hospital_name: str | None = None
    dept_name: str | None = None
    doctor_name: str | None = None
    doctor_title: str | None = None
    dept_intro: str | None = None
    doctor_expertise: str | None = None
    location: str | None = None
    #: The ``SessionSpec`` as loaded (JSON), so a rebuild loads it again as it was.
    spec_json: str | None = None

    @property
    def partition(self) -> int:
        return partition_of(self.dept, self.date)

    @classmethod
    def from_spec(cls, spec: Any, **names: str | None) -> StoredSession:
        """From an ``engine.model.SessionSpec`` (its ``display``, plus optional names)."""
        d = getattr(spec, "display", None)
        if d is not None:
            for f in ("hospital_name", "dept_name", "dept_intro", "doctor_name", "doctor_title",
                      "doctor_expertise", "location"):
                names.setdefault(f, getattr(d, f))
        return cls(
            session_id=spec.session_id,
            hospital=spec.hospital,
            dept=spec.dept,
            doctor=spec.doctor,
            date=spec.date,
            period=spec.period,
            fee_cents=spec.fee,
            release_at_ms=spec.release_at_ms,
            slots=[StoredSlot(s.slot_id, s.start, s.end, s.capacity) for s in spec.slots],
            cutoff_ms=spec.cutoff_ms,
            starts_ms=spec.starts_ms,
            cancel_before_ms=spec.cancel_before_ms,
            hold_ttl_ms=spec.hold_ttl_ms,
            scope=spec.scope,
            spec_json=msgspec.json.encode(spec).decode(),
            **names,
        )


class ScheduleConflict(ValueError):
    """A session cannot move to another department, doctor or date (as in Redis)."""


async def upsert_schedule(conn: Connection, sessions: Sequence[StoredSession]) -> int:
    """Create or update sessions, their slots, hospitals, departments and doctors.

    Idempotent. Never deletes anything: slots missing from the input stay,
    bookings are not touched, and an existing session keeps its status
    (use ``set_session_status``). Returns the number of sessions written.
    """
    if not sessions:
        return 0
    async with conn.transaction():
        existing = await conn.fetch(
            "SELECT id, dept_id, doctor_id, date FROM sessions WHERE id = any($1::text[])"
            " FOR UPDATE",
            [s.session_id for s in sessions],
        )
        by_id = {r["id"]: r for r in existing}
        for s in sessions:
            r = by_id.get(s.session_id)
            if r is not None and (
                r["dept_id"] != s.dept
                or r["doctor_id"] != s.doctor
                or r["date"] != dt.date.fromisoformat(s.date)
            ):
                raise ScheduleConflict(
                    f"session {s.session_id} cannot move to another department, doctor or date"
                )
        await conn.executemany(
            "INSERT INTO hospitals (id, name) VALUES ($1, coalesce($2, $1))"
            " ON CONFLICT (id) DO UPDATE SET name = coalesce($2, hospitals.name)",
            _unique((s.hospital, s.hospital_name) for s in sessions),
        )
        await conn.executemany(
            "INSERT INTO departments (id, hospital_id, name, intro)"
            " VALUES ($1, $2, coalesce($3, $1), $4)"
            " ON CONFLICT (id) DO UPDATE SET hospital_id = $2,"
            " name = coalesce($3, departments.name), intro = coalesce($4, departments.intro)",
            _unique((s.dept, s.hospital, s.dept_name, s.dept_intro) for s in sessions),
        )
        await conn.executemany(
            "INSERT INTO doctors (id, hospital_id, dept_id, name, title, expertise)"
            " VALUES ($1, $2, $3, coalesce($4, $1), $5, $6)"
            " ON CONFLICT (id) DO UPDATE SET hospital_id = $2, dept_id = $3,"
            " name = coalesce($4, doctors.name), title = coalesce($5, doctors.title),"
            " expertise = coalesce($6, doctors.expertise)",
            _unique(
                (s.doctor, s.hospital, s.dept, s.doctor_name, s.doctor_title, s.doctor_expertise)
                for s in sessions
            ),
        )
        await conn.executemany(
            "INSERT INTO sessions (id, hospital_id, dept_id, doctor_id, date, period, fee_cents,"
            " release_at, cutoff_at, starts_at, cancel_before_ms, hold_ttl_ms, scope, partition,"
            " spec, location)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb,"
            " $16)"
            " ON CONFLICT (id) DO UPDATE SET hospital_id = $2, period = $6, fee_cents = $7,"
            " release_at = $8, cutoff_at = $9, starts_at = $10, cancel_before_ms = $11,"
            " hold_ttl_ms = $12, scope = $13, partition = $14,"
            " spec = coalesce($15::jsonb, sessions.spec),"
            " location = coalesce($16, sessions.location), updated_at = now()",
            [
                (
                    s.session_id,
                    s.hospital,
                    s.dept,
                    s.doctor,
                    dt.date.fromisoformat(s.date),
                    s.period,
                    s.fee_cents,
                    _ts(s.release_at_ms),
                    _ts(s.cutoff_ms) if s.cutoff_ms else None,
                    _ts(s.starts_ms) if s.starts_ms else None,
                    s.cancel_before_ms,
                    s.hold_ttl_ms,
                    s.scope,
                    s.partition,
                    s.spec_json,
                    s.location,
                )
                for s in sessions
            ],
        )
        await conn.executemany(
            "INSERT INTO slots (session_id, slot_id, start_time, end_time, capacity)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (session_id, slot_id) DO UPDATE SET start_time = $3, end_time = $4,"
            " capacity = $5",
            [
                (s.session_id, x.slot_id, _clock(x.start), _clock(x.end), x.capacity)
                for s in sessions
                for x in s.slots
            ],
        )
    return len(sessions)


def _unique(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per id (the first column); a later row with a name wins over ``None``."""
    out: dict[Any, tuple[Any, ...]] = {}
    for row in rows:
        prev = out.get(row[0])
        out[row[0]] = (
            row
            if prev is None
            else tuple(new if new is not None else old for new, old in zip(row, prev, strict=True))
        )
    return list(out.values())


def _clock(text: str) -> dt.time | None:
    return dt.time.fromisoformat(text) if text else None


async def set_session_status(
    db: Queryable, session_id: str, status: Literal["open", "suspended", "paused"]
) -> bool:
    """Record a session's status (停诊 = suspended, 暂停放号 = paused); False if
    the session is unknown."""
    tag = await db.execute(
        "UPDATE sessions SET status = $2, updated_at = now() WHERE id = $1", session_id, status
    )
    return tag != "UPDATE 0"


# --------------------------------------------------------------------------- accounts


async def find_account(db: Queryable, openid_hash: str) -> str | None:
    """The account id of a (keyed) openid hash, or None if it has none yet."""
    got: str | None = await db.fetchval(
        "SELECT id FROM accounts WHERE openid_hash = $1", openid_hash)
    return got


async def store_openid(db: Queryable, crypto: Any, account_id: str, openid: str) -> None:
    """The account's openid, encrypted (AAD: accounts.openid_enc and the
    account), where it is not stored yet: the WeChat subscribe message is
    sent to it (engine.notify). A no-op once stored."""
    await db.execute(
        "UPDATE accounts SET openid_enc = $2, openid_key_id = $3 WHERE id = $1"
        " AND openid_enc IS NULL", account_id,
        crypto.encrypt(openid, table="accounts", column="openid_enc", row_id=account_id),
        crypto.active_key_id)


async def create_account(db: Queryable, openid_hash: str) -> str:
    """The account id for a (keyed) openid hash, created on first sight. Idempotent."""
    if not openid_hash:
        raise ValueError("openid_hash is required")
    new_id = "a" + secrets.token_hex(12)
    got: str | None = await db.fetchval(
        "INSERT INTO accounts (id, openid_hash) VALUES ($1, $2)"
        " ON CONFLICT (openid_hash) DO NOTHING RETURNING id",
        new_id,
        openid_hash,
    )
    if got is None:
        got = await db.fetchval("SELECT id FROM accounts WHERE openid_hash = $1", openid_hash)
    if got is None:  # pragma: no cover - accounts are never deleted
        raise RuntimeError("account vanished during creation")
    return got


# --------------------------------------------------------------------------- patients


class PatientView(msgspec.Struct, frozen=True):
    """A bound patient as shown to its account: masked, never raw."""

    patient_id: str
    masked_name: str
    masked_phone: str
    masked_id: str
    created_at: dt.datetime
    #: The engine's patient ref (keyed hash of the ID): for the engine and its
    #: binding mirror, never shown in an answer.
    ref: str = ""
    #: The real-name check's state (``engine.identity.Verification``): only
    #: ``self`` and ``data`` may hold.
    verification: str = "unverified"

    @property
    def verified(self) -> bool:
        return self.verification in ("self", "data")


class IdAccountLimit(ValueError):
    """The national ID is bound to the maximum number of accounts."""


class AccountPatientLimit(ValueError):
    """The account already binds the maximum number of patients."""


def _parse_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        return None


def _view(crypto: Crypto, r: Any) -> PatientView:
    pid = str(r["id"])

    def dec(column: str) -> str:
        return crypto.decrypt(r[column], table="patients", column=column, row_id=pid)

    return PatientView(
        patient_id=pid,
        masked_name=mask_name(dec("name_enc")),
        masked_phone=mask_phone(dec("phone_enc")),
        masked_id=mask_id(dec("national_id_enc")),
        created_at=r["created_at"],
        ref=r["id_hash"],
        verification=r["verification"],
    )


#: Advisory lock namespace of one national ID's bindings (with hashtext(id_hash)).
_ID_LOCK = 20050


async def lock_id(conn: Queryable, ref: str) -> None:
    """Serialise changes to one ID's bindings until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _ID_LOCK, ref)


async def bind_patient(
    conn: Connection,
    crypto: Crypto,
    account_id: str,
    name: str,
    phone: str,
    national_id: str,
    *,
    max_bound: int | None = None,
    verification: str = "unverified",
    verification_ref: str | None = None,
    max_accounts: int | None = None,
    on_displace: Callable[[str, str], Awaitable[None]] | None = None,
) -> PatientView:
    """Bind a real-name patient to an account; the masked view of the binding.

    The ID is validated and normalised (``InvalidNationalId``), the phone too
    (``InvalidPhone``); the three fields are stored encrypted with
    AAD = patients/<column>/<patient id>. Binding the same ID again to the same
    account returns the existing binding (idempotent). With ``max_bound``,
    a new binding beyond that many raises ``AccountPatientLimit`` (checked
    under a row lock on the account, so concurrent binds cannot overshoot).

    ``verification`` is the real-name check's outcome for the new binding
    (``engine.identity.verification_of``). With ``max_accounts``, one ID is
    bound to at most that many accounts (under a lock on the ID): a verified
    binding displaces the oldest unverified ones of other accounts to make
    room (``on_displace(account, patient id)`` runs for each inside the
    transaction, before the commit: the binding mirror's tombstone) and is
    refused (``IdAccountLimit``) only when that many other accounts hold
    verified bindings; a ``self``-verified binding (the person) is never
    refused; an unverified one only gets a free place.
    """
    nid = normalize_national_id(national_id)
    tel = normalize_phone(phone)
    name = " ".join(name.split())
    if not name or len(name) > 64:
        raise ValueError("patient name must be 1..64 characters")
    ref = crypto.id_hash(nid)
    pid = str(uuid.uuid4())

    def enc(column: str, value: str) -> bytes:
        return crypto.encrypt(value, table="patients", column=column, row_id=pid)

    cols = "id, name_enc, phone_enc, national_id_enc, created_at, id_hash, verification"
    verified = verification in ("self", "data")
    async with conn.transaction():
        locked = await conn.fetchval("SELECT id FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        if locked is None:
            raise LookupError("unknown account")
        row = await conn.fetchrow(
            f"SELECT {cols} FROM patients"
            " WHERE account_id = $1 AND id_hash = $2 AND unbound_at IS NULL",
            account_id,
            ref,
        )
        if row is None:
            if max_bound is not None:
                n = await conn.fetchval(
                    "SELECT count(*) FROM patients WHERE account_id = $1 AND unbound_at IS NULL",
                    account_id,
                )
                if n >= max_bound:
                    raise AccountPatientLimit(f"an account binds at most {max_bound} patients")
            if max_accounts is not None:
                await _make_room(conn, ref, account_id, verification, max_accounts, on_displace)
            row = await conn.fetchrow(
                "INSERT INTO patients (id, account_id, id_hash, name_enc, phone_enc,"
                " national_id_enc, key_id, verification, verified_at, verification_ref)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                f" RETURNING {cols}",
                uuid.UUID(pid),
                account_id,
                ref,
                enc("name_enc", name),
                enc("phone_enc", tel),
                enc("national_id_enc", nid),
                crypto.active_key_id,
                verification,
                dt.datetime.now(dt.UTC) if verified else None,
                verification_ref,
            )
    return _view(crypto, row)


async def _make_room(
    conn: Connection,
    ref: str,
    account_id: str,
    verification: str,
    max_accounts: int,
    on_displace: Callable[[str, str], Awaitable[None]] | None,
) -> None:
    """The per-ID limit of ``bind_patient`` (see there), under the ID's lock."""
    await lock_id(conn, ref)
    others = await conn.fetch(
        "SELECT id, account_id, verification FROM patients"
        " WHERE id_hash = $1 AND unbound_at IS NULL AND account_id <> $2"
        " ORDER BY created_at, id",
        ref,
        account_id,
    )
    unverified = [o for o in others if o["verification"] not in ("self", "data")]
    held_by_verified = len(others) - len(unverified)
    if verification != "self":
        full = held_by_verified if verification == "data" else len(others)
        if full >= max_accounts:
            raise IdAccountLimit(f"an ID number is bound to at most {max_accounts} accounts")
    for o in unverified[: max(0, len(others) + 1 - max_accounts)]:
        if on_displace is not None:
            await on_displace(o["account_id"], str(o["id"]))
        await conn.execute(
            "UPDATE patients SET unbound_at = now(), unbound_reason = 'displaced'"
            " WHERE id = $1",
            o["id"],
        )


async def list_patients(db: Queryable, crypto: Crypto, account_id: str) -> list[PatientView]:
    """The account's bound patients, oldest first, masked."""
    rows = await db.fetch(
        "SELECT id, name_enc, phone_enc, national_id_enc, created_at, id_hash, verification"
        " FROM patients"
        " WHERE account_id = $1 AND unbound_at IS NULL ORDER BY created_at, id",
        account_id,
    )
    return [_view(crypto, r) for r in rows]


async def unbind_patient(db: Queryable, account_id: str, patient_id: str) -> bool:
    """Unbind one of the account's patients; False if it is not bound to that account.

    The row stays (ciphertext) as the record behind past bookings.
    """
    pid = _parse_uuid(patient_id)
    if pid is None:
        return False
    tag = await db.execute(
        "UPDATE patients SET unbound_at = now()"
        " WHERE id = $1 AND account_id = $2 AND unbound_at IS NULL",
        pid,
        account_id,
    )
    return tag != "UPDATE 0"


async def get_patient_ref(db: Queryable, account_id: str, patient_id: str) -> str | None:
    """The patient ref (ID hash) if ``patient_id`` is bound to ``account_id``, else None."""
    pid = _parse_uuid(patient_id)
    if pid is None:
        return None
    ref: str | None = await db.fetchval(
        "SELECT id_hash FROM patients WHERE id = $1 AND account_id = $2 AND unbound_at IS NULL",
        pid,
        account_id,
    )
    return ref


async def count_bound(db: Queryable, account_id: str) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM patients WHERE account_id = $1 AND unbound_at IS NULL", account_id
    )
    return n


# --------------------------------------------------------------------------- bookings

BookingStatus = Literal["booked", "cancelled", "refund_due", "conflict"]
HisStatus = Literal["pending", "accepted", "rejected", "unknown", "cancel_pending", "cancelled",
                    "lookup_cancelled", "cancel_refused"]


class BookingRow(msgspec.Struct, frozen=True):
    id: str
    session_id: str
    slot_id: str
    unit: int | None
    patient_ref: str
    account_id: str
    fee_cents: int
    payment_ref: str | None
    status: BookingStatus
    status_reason: str | None
    booked_at: dt.datetime
    cancelled_at: dt.datetime | None
    his_status: HisStatus
    his_id: str | None
    his_attempts: int
    his_updated_at: dt.datetime | None
    stream_id: str | None
    his_reason: str | None = None
    his_visit_start: dt.datetime | None = None
    his_visit_end: dt.datetime | None = None
    his_place: str | None = None


_BOOKING_COLS = ", ".join(BookingRow.__struct_fields__)


def _booking(r: Any) -> BookingRow:
    return BookingRow(*(r[f] for f in BookingRow.__struct_fields__))


async def bookings_for_account(
    db: Queryable, account_id: str, *, limit: int = 100
) -> list[BookingRow]:
    """The account's bookings, newest first."""
    rows = await db.fetch(
        f"SELECT {_BOOKING_COLS} FROM bookings WHERE account_id = $1"
        " ORDER BY booked_at DESC, id LIMIT $2",
        account_id,
        limit,
    )
    return [_booking(r) for r in rows]


async def booking_by_id(db: Queryable, booking_id: str) -> BookingRow | None:
    r = await db.fetchrow(f"SELECT {_BOOKING_COLS} FROM bookings WHERE id = $1", booking_id)
    return None if r is None else _booking(r)


async def active_bookings_by_session(db: Queryable, session_id: str) -> list[tuple[str, int]]:
    """``(booking id, unit)`` of the session's booked rows, by unit."""
    rows = await db.fetch(
        "SELECT id, unit FROM bookings WHERE session_id = $1 AND status = 'booked' ORDER BY unit",
        session_id,
    )
    return [(r["id"], r["unit"]) for r in rows]


async def booked_counts(db: Queryable, session_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Booked rows per session (all sessions with any, or just ``session_ids``)."""
    if session_ids is None:
        rows = await db.fetch(
            "SELECT session_id, count(*) AS n FROM bookings WHERE status = 'booked'"
            " GROUP BY session_id"
        )
    else:
        rows = await db.fetch(
            "SELECT session_id, count(*) AS n FROM bookings"
            " WHERE status = 'booked' AND session_id = any($1::text[]) GROUP BY session_id",
            list(session_ids),
        )
    return {r["session_id"]: r["n"] for r in rows}


# --------------------------------------------------------------------------- audits

_json = msgspec.json.Encoder()


async def record_audit_run(
    db: Queryable,
    *,
    started_at: dt.datetime,
    finished_at: dt.datetime | None,
    ok: bool,
    sessions: int,
    breaches: Sequence[Any] = (),
    report: Any = None,
) -> int:
    """Store one audit run (``breaches`` and ``report`` any msgspec-encodable value); its id."""
    run_id: int = await db.fetchval(
        "INSERT INTO audit_runs (started_at, finished_at, ok, sessions, breaches, report)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb) RETURNING id",
        started_at,
        finished_at,
        ok,
        sessions,
        _json.encode(breaches).decode(),
        _json.encode({} if report is None else report).decode(),
    )
    return run_id
