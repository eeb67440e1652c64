"""The examples in examples/ run as written (README and --help point at them)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.schedule_import import example_file, load_json_file

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_example_validates_and_is_what_the_command_prints() -> None:
    specs = load_json_file(example_file())
    assert len(specs) == 2 and specs[0].max_active_per_patient == 3
    assert {s.slot_id for s in specs[0].slots} == {"0800", "0830"}
    assert example_file() == ROOT / "examples" / "sessions.json"


async def test_the_import_example_imports_through_the_command(
        fresh_redis: Any, redis_url: str, db_pool: asyncpg.Pool, fresh_pg_dsn: str) -> None:
    async def haoyuan(*args: str) -> tuple[int, bytes]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await p.communicate()
        return p.returncode or 0, out

    rc, out = await haoyuan("import", "--example")
    assert rc == 0 and json.loads(out) == json.loads(example_file().read_text())
    rc, out = await haoyuan("import", "--schema")
    assert rc == 0 and json.loads(out)["type"] == "array"
    rc, out = await haoyuan("import", str(example_file()), "--redis-url", redis_url,
                            "--pg-dsn", fresh_pg_dsn)
    assert rc == 0, out
    report = json.loads(out)
    assert report["sessions"] == 2 and report["capacity"] == 18 and report["recovering"] == []
    rows = await db_pool.fetch("SELECT id FROM sessions ORDER BY id")
    assert [r["id"] for r in rows] == ["CARDIO-DR_LI-20261210-AM", "DERM-DR_WANG-20261210-PM"]
    # What patients see when browsing came with it (the first session's display).
    from api import catalog

    (dept,) = [d for d in await catalog.departments(db_pool, "H1") or [] if d.dept_id == "CARDIO"]
    assert dept.name == "心内科" and dept.intro and "冠心病" in dept.intro
    (doc,) = await catalog.doctors(db_pool, "CARDIO") or []
    assert (doc.name, doc.title) == ("李明", "主任医师") and doc.expertise
    one = await catalog.session(db_pool, "CARDIO-DR_LI-20261210-AM")
    assert one is not None and one.location == "门诊楼3层 心内科诊区"
    assert (one.dept_name, one.doctor_title) == ("心内科", "主任医师")
    # A re-import keeps them.
    rc, _ = await haoyuan("import", str(example_file()), "--redis-url", redis_url,
                          "--pg-dsn", fresh_pg_dsn)
    assert rc == 0
    assert (await catalog.doctors(db_pool, "CARDIO") or [])[0].expertise == doc.expertise


@pytest.mark.timeout(60)
async def test_the_embedding_example_runs(fresh_redis: Any, redis_url: str) -> None:
    p = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "embed.py"), redis_url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    assert p.returncode == 0, err.decode()
    text = out.decode()
    assert "held unit 1" in text and "second patient: sold-out" in text
    assert "audit ok: True (capacity 1, booked 1)" in text


@pytest.mark.timeout(120)
async def test_the_fhir_backend_example_runs_against_the_api(
        fresh_redis: Any, redis_url: str, fresh_pg_dsn: str) -> None:
    """examples/fhir_backend.py (the README's and the OpenAPI document's
    example): search, hold, book, cancel through /fhir/r4 of a real API."""
    import datetime as dt

    import httpx
    import msgspec

    from engine.store.migrate import migrate
    from tests.apikit import ADMIN, granian, server_env
    from tests.enginekit import make_spec
    from tests.fhirkit import add_client

    day = (dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).date()
           + dt.timedelta(days=2)).isoformat()
    await migrate(fresh_pg_dsn)
    auth = await add_client(fresh_pg_dsn, "example-backend", identity="trusted")
    with granian(server_env(redis_url, fresh_pg_dsn), workers=1) as base:
        async with httpx.AsyncClient(base_url=base) as c:
            r = await c.post("/v1/admin/sessions", headers={**ADMIN, "Content-Type":
                                                            "application/json"},
                             content=msgspec.json.encode([make_spec("EX1", date=day)]))
            assert r.status_code == 200, r.text
        p = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "fhir_backend.py"), base,
            auth["Authorization"][7:], cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
    assert p.returncode == 0, (out + err).decode()
    text = out.decode()
    assert f"slot EX1.0800 at {day}T08:00:00+08:00" in text
    assert "retried hold answers the same: True" in text
    assert "second hold for the patient: 409 duplicate" in text
    assert "booked: 201 booked" in text and "cancelled: 200 cancelled" in text
