"""PostgreSQL store and personal data: migrations, the unit arbiter, encryption at rest,
national ID validation, masking and log redaction. Real PostgreSQL (conftest fixtures)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.keys import partition_of
from engine.pii import (
    Crypto,
    CryptoConfigError,
    DecryptionError,
    InvalidNationalId,
    InvalidPhone,
    RedactingFilter,
    mask_id,
    mask_name,
    mask_phone,
    normalize_national_id,
    normalize_phone,
    redact,
    redact_processor,
)
from engine.store import queries as q
from engine.store.migrate import MigrationError, load, migrate
from engine.testing.servers import find_postgres_bindir

# ------------------------------------------------------------------ helpers

_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def with_check(first17: str) -> str:
    """An independent ISO 7064 MOD 11-2 implementation for the tests."""
    return first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, _W, strict=True)) % 11]


def full_width(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in s)


ID_X = with_check("11010519491231002")  # check digit X
ID_1 = with_check("44030619900307123")
NAME = "张三丰"
PHONE = "13912345678"
assert ID_X.endswith("X")


@pytest.fixture
async def db(fresh_pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    await migrate(fresh_pg_dsn)
    conn = await asyncpg.connect(fresh_pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def insert_booking(
    conn: asyncpg.Connection, bid: str, *, session: str = "S1", unit: int = 1
) -> None:
    await conn.execute(
        "INSERT INTO bookings (id, session_id, slot_id, unit, patient_ref, account_id, status)"
        " VALUES ($1, $2, '0800', $3, 'ref', 'a1', 'booked')",
        bid,
        session,
        unit,
    )


# ------------------------------------------------------------------ migrations


async def test_migrations_apply_once_then_noop(fresh_pg_dsn: str) -> None:
    names = [m.name for m in load()]
    assert names[0] == "0001_initial"
    assert await migrate(fresh_pg_dsn) == names
    assert await migrate(fresh_pg_dsn) == []
    conn = await asyncpg.connect(fresh_pg_dsn)
    try:
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        assert [r["name"] for r in rows] == names
        assert all(len(r["checksum"]) == 64 for r in rows)
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        assert {
            "hospitals",
            "departments",
            "doctors",
            "sessions",
            "slots",
            "accounts",
            "patients",
            "bookings",
            "booking_events",
            "booking_conflicts",
            "refunds",
            "outbox_dead_letters",
            "audit_runs",
            "schema_migrations",
        } <= tables
    finally:
        await conn.close()


async def test_concurrent_migrate_applies_each_file_once(fresh_pg_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_pg_dsn) for _ in range(4)))
    names = [m.name for m in load()]
    assert sorted(results, key=len) == [[], [], [], names]
    conn = await asyncpg.connect(fresh_pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
    finally:
        await conn.close()


async def test_changed_checksum_is_refused(fresh_pg_dsn: str) -> None:
    await migrate(fresh_pg_dsn)
    conn = await asyncpg.connect(fresh_pg_dsn)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    finally:
        await conn.close()
    with pytest.raises(MigrationError, match="checksum changed"):
        await migrate(fresh_pg_dsn)


# ------------------------------------------------------------------ the unit arbiter


async def test_partial_unique_index_is_the_arbiter(db: asyncpg.Connection) -> None:
    await insert_booking(db, "7.S1.1", unit=1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_booking(db, "7.S1.2", unit=1)
    await insert_booking(db, "7.S2.1", session="S2", unit=1)  # another session: fine
    await db.execute(
        "UPDATE bookings SET status = 'cancelled', cancelled_at = now() WHERE id = '7.S1.1'"
    )
    await insert_booking(db, "7.S1.2", unit=1)  # the unit is free again
    assert await q.active_bookings_by_session(db, "S1") == [("7.S1.2", 1)]
    assert await q.booked_counts(db) == {"S1": 1, "S2": 1}
    assert await q.booked_counts(db, ["S2", "nope"]) == {"S2": 1}
    row = await q.booking_by_id(db, "7.S1.1")
    assert row is not None and row.status == "cancelled" and row.his_status == "pending"
    assert await q.booking_by_id(db, "nope") is None
    mine = await q.bookings_for_account(db, "a1")
    assert [b.id for b in mine] == ["7.S1.2", "7.S2.1", "7.S1.1"]  # newest first
    assert await q.bookings_for_account(db, "a2") == []


async def test_booking_events_are_idempotent_per_stream_entry(db: asyncpg.Connection) -> None:
    sql = (
        "INSERT INTO booking_events (booking_id, event_type, stream_id) VALUES ($1, 'booked', $2)"
        " ON CONFLICT DO NOTHING"
    )
    for _ in range(2):  # redelivered outbox entry
        await db.execute(sql, "3.S1.1", "1700000000000-0")
    await db.execute(sql, "5.S9.1", "1700000000000-0")  # same id in another partition's stream
    assert await db.fetchval("SELECT count(*) FROM booking_events") == 2


# ------------------------------------------------------------------ patient data at rest


async def test_patient_binding_stores_only_ciphertext(
    db: asyncpg.Connection, fresh_pg_dsn: str
) -> None:
    crypto = Crypto.generate_dev()
    acct = await q.create_account(db, crypto.openid_hash("openid-1"))
    view = await q.bind_patient(db, crypto, acct, NAME, "+86 139-1234-5678", ID_1.lower())
    assert (view.masked_name, view.masked_phone, view.masked_id) == (
        "张*丰",
        "139****5678",
        mask_id(ID_1),
    )
    await insert_booking(db, "1.S1.1")
    await db.execute("UPDATE bookings SET patient_ref = $1", crypto.id_hash(ID_1))

    bindir = find_postgres_bindir()
    pg_dump = os.path.join(bindir, "pg_dump")
    if not os.access(pg_dump, os.X_OK):
        pg_dump = shutil.which("pg_dump") or pytest.skip("pg_dump not found")
    proc = await asyncio.create_subprocess_exec(
        pg_dump,
        "--no-owner",
        "--dbname",
        fresh_pg_dsn,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert b"CREATE TABLE public.patients" in out
    assert crypto.id_hash(ID_1).encode() in out  # the keyed hash is there ...
    for secret in (ID_1, NAME, PHONE, ID_1[6:14]):  # ... and no plaintext, in any encoding
        raw = secret.encode()
        for needle in (raw, raw.hex().encode(), base64.b64encode(raw)):
            assert needle not in out, f"plaintext leaked into pg_dump ({needle!r})"


async def test_decrypt_round_trip_and_aad_binding(db: asyncpg.Connection) -> None:
    crypto = Crypto.generate_dev()
    acct = await q.create_account(db, "h1")
    a = await q.bind_patient(db, crypto, acct, NAME, PHONE, ID_1)
    b = await q.bind_patient(db, crypto, acct, "李四", "13800000000", ID_X)
    row = await db.fetchrow("SELECT * FROM patients WHERE id = $1", uuid.UUID(a.patient_id))
    kw = {"table": "patients", "row_id": a.patient_id}
    assert crypto.decrypt(row["national_id_enc"], column="national_id_enc", **kw) == ID_1
    assert crypto.decrypt(row["name_enc"], column="name_enc", **kw) == NAME
    assert crypto.decrypt(row["phone_enc"], column="phone_enc", **kw) == PHONE
    with pytest.raises(DecryptionError):  # another column of the same row
        crypto.decrypt(row["name_enc"], column="phone_enc", **kw)
    # copy A's ciphertext into B's row: B no longer decrypts
    await db.execute(
        "UPDATE patients SET name_enc = $1 WHERE id = $2", row["name_enc"], uuid.UUID(b.patient_id)
    )
    with pytest.raises(DecryptionError) as err:
        await q.list_patients(db, crypto, acct)
    assert NAME not in str(err.value)
    # tampering and relabelling the key id fail too
    blob = bytearray(row["name_enc"])
    blob[-1] ^= 1
    with pytest.raises(DecryptionError):
        crypto.decrypt(bytes(blob), column="name_enc", **kw)
    other = Crypto.generate_dev()
    with pytest.raises(DecryptionError):  # same key id "dev", different key
        other.decrypt(row["name_enc"], column="name_enc", **kw)


async def test_key_rotation_keeps_old_data_readable(db: asyncpg.Connection) -> None:
    k1, k2, h = os.urandom(32), os.urandom(32), os.urandom(32)
    env = {
        "HAOYUAN_DATA_KEYS": f"k1:{base64.b64encode(k1).decode()}",
        "HAOYUAN_HMAC_KEY": base64.b64encode(h).decode(),
    }
    old = Crypto.from_env(env)
    assert old.active_key_id == "k1"
    acct = await q.create_account(db, "h1")
    await q.bind_patient(db, old, acct, NAME, PHONE, ID_1)

    env["HAOYUAN_DATA_KEYS"] += f",k2:{base64.b64encode(k2).decode()}"
    env["HAOYUAN_ACTIVE_KEY"] = "k2"
    new = Crypto.from_env(env)
    assert new.active_key_id == "k2" and new.id_hash(ID_1) == old.id_hash(ID_1)
    await q.bind_patient(db, new, acct, "李四", "13800000000", ID_X)
    views = await q.list_patients(db, new, acct)
    assert [v.masked_name for v in views] == ["张*丰", "李*"]
    rows = await db.fetch("SELECT key_id, name_enc FROM patients ORDER BY created_at")
    assert [r["key_id"] for r in rows] == ["k1", "k2"]
    assert [Crypto.key_id_of(r["name_enc"]) for r in rows] == ["k1", "k2"]
    with pytest.raises(DecryptionError, match="unknown data key"):
        await q.list_patients(db, old, acct)  # the old ring lacks k2
    assert old.with_active("k2", k2).active_key_id == "k2"


def test_crypto_config_errors_never_carry_key_material() -> None:
    secret = "c2VjcmV0LWtleS1tYXRlcmlhbA"  # not valid base64 (no padding)
    with pytest.raises(CryptoConfigError) as err:
        Crypto.from_env({"HAOYUAN_DATA_KEYS": f"k1:{secret}", "HAOYUAN_HMAC_KEY": "x"})
    assert secret not in str(err.value)
    short = base64.b64encode(b"short").decode()
    with pytest.raises(CryptoConfigError, match="32 bytes"):
        Crypto.from_env({"HAOYUAN_DATA_KEYS": f"k1:{short}", "HAOYUAN_HMAC_KEY": short})
    with pytest.raises(CryptoConfigError, match="not set"):
        Crypto.from_env({})
    key = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(CryptoConfigError, match="not in the key ring"):
        Crypto.from_env(
            {"HAOYUAN_DATA_KEYS": f"k1:{key}", "HAOYUAN_ACTIVE_KEY": "k9", "HAOYUAN_HMAC_KEY": key}
        )
    c = Crypto.generate_dev()
    assert c.dev and key not in repr(c)


# ------------------------------------------------------------------ accounts and patients


async def test_accounts_and_bindings(db: asyncpg.Connection) -> None:
    crypto = Crypto.generate_dev()
    a = await q.create_account(db, "hash-a")
    assert await q.create_account(db, "hash-a") == a
    b = await q.create_account(db, "hash-b")
    assert a != b

    p1 = await q.bind_patient(db, crypto, a, NAME, PHONE, ID_1)
    again = await q.bind_patient(db, crypto, a, NAME, PHONE, full_width(ID_1))
    assert again.patient_id == p1.patient_id  # idempotent, after normalisation
    assert await q.count_bound(db, a) == 1
    pb = await q.bind_patient(db, crypto, b, NAME, PHONE, ID_1)  # family member in two accounts
    assert pb.patient_id != p1.patient_id

    ref = await q.get_patient_ref(db, a, p1.patient_id)
    assert ref == crypto.id_hash(ID_1) == await q.get_patient_ref(db, b, pb.patient_id)
    assert await q.get_patient_ref(db, b, p1.patient_id) is None  # another account's patient
    assert await q.get_patient_ref(db, a, "not-a-uuid") is None
    assert not await q.unbind_patient(db, b, p1.patient_id)
    assert await q.unbind_patient(db, a, p1.patient_id)
    assert not await q.unbind_patient(db, a, p1.patient_id)
    assert await q.get_patient_ref(db, a, p1.patient_id) is None
    assert await q.list_patients(db, crypto, a) == []
    rebound = await q.bind_patient(db, crypto, a, NAME, PHONE, ID_1)
    assert rebound.patient_id != p1.patient_id

    with pytest.raises(q.AccountPatientLimit):
        await q.bind_patient(db, crypto, a, "李四", PHONE, ID_X, max_bound=1)
    with pytest.raises(InvalidNationalId):
        await q.bind_patient(db, crypto, a, NAME, PHONE, ID_1[:-1] + "0")
    with pytest.raises(LookupError):
        await q.bind_patient(db, crypto, "nobody", NAME, PHONE, ID_X)


async def test_concurrent_binds_respect_the_limit(fresh_pg_dsn: str) -> None:
    await migrate(fresh_pg_dsn)
    crypto = Crypto.generate_dev()
    pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=4, max_size=4)
    try:
        accounts = await asyncio.gather(*(q.create_account(pool, "h") for _ in range(8)))
        assert len(set(accounts)) == 1  # idempotent under concurrency
        acct = accounts[0]
        ids = [with_check(f"1101011990030712{i}") for i in range(4)]

        async def bind(nid: str) -> str:
            async with pool.acquire() as conn:
                try:
                    await q.bind_patient(conn, crypto, acct, NAME, PHONE, nid, max_bound=2)
                    return "ok"
                except q.AccountPatientLimit:
                    return "limit"

        results = await asyncio.gather(*(bind(i) for i in ids + ids))
        assert results.count("ok") >= 2
        assert await q.count_bound(pool, acct) == 2
    finally:
        await pool.close()


# ------------------------------------------------------------------ schedule and audits


def session(sid: str = "S1", **kw: object) -> q.StoredSession:
    base: dict[str, object] = {
        "session_id": sid,
        "hospital": "H1",
        "dept": "D1",
        "doctor": "DOC1",
        "date": "2030-01-02",
        "period": "AM",
        "fee_cents": 5000,
        "release_at_ms": 1_800_000_000_000,
        "slots": [q.StoredSlot("0800", "08:00", "08:30", 5), q.StoredSlot("0830", "08:30", "", 3)],
        "dept_name": "口腔科",
    }
    base.update(kw)
    return q.StoredSession(**base)  # type: ignore[arg-type]


async def test_upsert_schedule_is_idempotent_and_never_deletes(db: asyncpg.Connection) -> None:
    assert await q.upsert_schedule(db, [session(), session("S2", period="PM")]) == 2
    await insert_booking(db, "1.S1.1")
    await q.set_session_status(db, "S1", "suspended")
    smaller = session(fee_cents=6000, slots=[q.StoredSlot("0800", "08:00", "08:30", 2)])
    assert await q.upsert_schedule(db, [smaller]) == 1
    s1 = await db.fetchrow("SELECT * FROM sessions WHERE id = 'S1'")
    assert s1["fee_cents"] == 6000 and s1["status"] == "suspended"
    assert s1["partition"] == partition_of("D1", "2030-01-02")
    assert s1["release_at"] == dt.datetime.fromtimestamp(1_800_000_000, dt.UTC)
    assert s1["cutoff_at"] is None
    slots = await db.fetch("SELECT slot_id, capacity, end_time FROM slots WHERE session_id='S1'")
    assert {(r["slot_id"], r["capacity"]) for r in slots} == {("0800", 2), ("0830", 3)}
    assert await db.fetchval("SELECT name FROM departments WHERE id = 'D1'") == "口腔科"
    assert await db.fetchval("SELECT name FROM doctors WHERE id = 'DOC1'") == "DOC1"
    assert await db.fetchval("SELECT count(*) FROM bookings") == 1
    with pytest.raises(q.ScheduleConflict):
        await q.upsert_schedule(db, [session(doctor="DOC2")])
    assert not await q.set_session_status(db, "nope", "open")


async def test_record_audit_run(db: asyncpg.Connection) -> None:
    now = dt.datetime.now(dt.UTC)
    rid = await q.record_audit_run(
        db,
        started_at=now,
        finished_at=now,
        ok=False,
        sessions=3,
        breaches=[{"session": "S1", "what": "conservation"}],
        report={"checked": 3},
    )
    row = await db.fetchrow("SELECT * FROM audit_runs WHERE id = $1", rid)
    assert row["ok"] is False and row["sessions"] == 3
    assert '"conservation"' in row["breaches"] and row["report"] == '{"checked": 3}'


# ------------------------------------------------------------------ national ID, phone, masks


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (ID_X, ID_X),  # check digit X
        (ID_X.lower(), ID_X),  # lower-case x
        (full_width(ID_X.lower()), ID_X),  # full-width digits and ｘ
        (full_width(ID_1), ID_1),
        (f" {ID_1[:6]} {ID_1[6:14]} {ID_1[14:]}\u3000", ID_1),  # spaces, ideographic space
    ],
)
def test_national_id_normalised(raw: str, expected: str) -> None:
    assert normalize_national_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (ID_1[:-1] + ("0" if ID_1[-1] != "0" else "1"), "check digit"),
        ("110105491231002", "15-digit"),  # legacy number
        (with_check("11010519900230123"), "birth date"),  # 30 February
        (with_check("11010518991231123"), "birth date"),  # before 1900
        (with_check("11010521000101123"), "birth date"),  # in the future
        (ID_1 + "1", "18 characters"),
        (ID_1[:10] + "A" + ID_1[11:], "18 characters"),
        ("١١٠١٠٥١٩٤٩١٢٣١٠٠٢X", "18 characters"),  # Arabic-Indic digits are not ASCII digits
        ("", "18 characters"),
    ],
)
def test_national_id_rejected(raw: str, why: str) -> None:
    with pytest.raises(InvalidNationalId, match=why) as err:
        normalize_national_id(raw)
    if raw:
        assert raw not in str(err.value)


@settings(max_examples=300, deadline=None)
@given(
    region=st.integers(110000, 829999),
    born=st.dates(dt.date(1900, 1, 1), dt.date(2024, 12, 31)),
    seq=st.integers(0, 999),
)
def test_valid_ids_normalise_to_themselves_and_masks_hide_birth(
    region: int, born: dt.date, seq: int
) -> None:
    nid = with_check(f"{region:06d}{born:%Y%m%d}{seq:03d}")
    assert normalize_national_id(nid) == nid
    assert normalize_national_id(full_width(nid.lower())) == nid
    masked = mask_id(nid)
    assert masked == nid[:3] + "*" * 11 + nid[-4:]
    assert f"{born:%Y%m%d}" not in masked and set(masked[3:14]) == {"*"}
    assert redact(f"x {nid} y") == f"x {masked} y"


@pytest.mark.parametrize(
    "raw",
    ["13812341234", "+86 138 1234 1234", "+86-138-1234-1234", "0086 13812341234", "8613812341234"],
)
def test_phone_normalised(raw: str) -> None:
    assert normalize_phone(raw) == "13812341234"


@pytest.mark.parametrize("raw", ["1381234123", "23812341234", "12812341234", "+1 13812341234", ""])
def test_phone_rejected(raw: str) -> None:
    with pytest.raises(InvalidPhone) as err:
        normalize_phone(raw)
    if raw:
        assert raw not in str(err.value)


def test_masks() -> None:
    assert mask_id("110101199003071234") == "110***********1234"
    assert mask_phone("13812341234") == "138****1234"
    assert mask_name("张三丰") == "张*丰"
    assert mask_name("张三") == "张*"
    assert mask_name("欧阳娜娜") == "欧**娜"
    assert mask_name("张") == "*"


def test_redact_masks_ids_and_phones_in_log_lines() -> None:
    line = (
        f"bind id={ID_1} other {ID_X.lower()} fw={full_width(ID_1)} tel=+86 139-1234-5678 "
        f"m={PHONE}; stream 1700000000000-0 seq=42"
    )
    out = redact(line)
    assert ID_1 not in out and ID_X.lower() not in out and PHONE not in out
    assert "139-1234-5678" not in out and full_width(ID_1) not in out
    assert mask_id(ID_1) in out and "139****5678" in out
    assert "1700000000000-0" in out and "seq=42" in out

    event = redact_processor(None, "info", {"event": f"bound {ID_1}", "phone": int(PHONE), "n": 3})
    assert event == {"event": f"bound {mask_id(ID_1)}", "phone": "139****5678", "n": 3}

    record = logging.LogRecord(
        "t", logging.INFO, __file__, 1, "patient %s phone %s", (ID_1, PHONE), None
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"patient {mask_id(ID_1)} phone 139****5678"
