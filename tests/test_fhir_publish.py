"""SMART Scheduling Links bulk publishing: the worker writes Location,
Schedule and Slot NDJSON files (booking deep links, capacity extensions)
that validate with fhir.resources; it publishes again on an import and when
a slot sells out or comes back, never sooner than its minimum interval, and
not at all when nothing an aggregator must know changed; every API worker
serves the manifest and the files (ETag, 304, max-age); the command runs."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from engine import Engine, Held
from engine.config import PublishConfig
from engine.schedule_import import import_sessions
from engine.scheduling import ids
from engine.scheduling import resources as R
from engine.scheduling.publish import CST, BulkPublisher
from engine.store.scheduling import set_contact
from tests import fhirkit as fk
from tests.apikit import flushed_app
from tests.enginekit import config, make_spec

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def _day(offset: int) -> str:
    return (dt.datetime.now(CST).date() + dt.timedelta(days=offset)).isoformat()


def _lines(body: bytes) -> list[dict[str, Any]]:
    return [fk.validate(json.loads(line)) for line in body.decode().splitlines()]


async def test_publisher_writes_valid_files_and_republishes_on_changes_only(
        fresh_redis: Any, redis_url: str, db_pool: asyncpg.Pool) -> None:
    async with Engine.connect(redis_url, config()) as eng:
        await import_sessions(eng, db_pool, [
            make_spec("PB1", dept="PD1", date=_day(1), caps=(1, 2)),
            make_spec("PB2", dept="PD2", date=_day(2), caps=(3,),
                      release_at_ms=int(dt.datetime.now(dt.UTC).timestamp() * 1000) + 3_600_000),
            make_spec("PBX", dept="PD1", date=_day(40), caps=(3,))])  # past the horizon
        assert await set_contact(db_pool, "H1", {"phone": "010-12345678", "state": "BJ",
                                                 "city": "Beijing", "line": ["1 Road"],
                                                 "postal_code": "100000"})
        cfg = PublishConfig(public_url="https://book.example", publish_min_interval_s=3600,
                            booking_link="https://book.example/s/{session_id}/{slot_id}")
        pub = BulkPublisher(eng, db_pool, cfg)
        first = await pub.publish_once()
        assert first.outcome == "published" and first.files == 3 and first.resources == 1 + 2 + 3
        rows = {r["name"]: r for r in await db_pool.fetch("SELECT * FROM bulk_files")}
        assert set(rows) == {"locations.ndjson", "schedules.ndjson", "slots-H1.ndjson"}
        assert rows["slots-H1.ndjson"]["jurisdiction"] == ["BJ"]
        loc = _lines(rows["locations.ndjson"]["body"])[0]
        assert loc["telecom"][0] == {"system": "phone", "value": "010-12345678"}
        assert loc["address"]["postalCode"] == "100000"
        schedules = _lines(rows["schedules.ndjson"]["body"])
        assert {s["id"] for s in schedules} == {"PB1", "PB2"}
        slots = {s["id"]: s for s in _lines(rows["slots-H1.ndjson"]["body"])}
        free = slots[ids.slot_id("PB1", "0800")]
        assert free["status"] == "free" and fk.ext(free, R.EXT_SLOT_CAPACITY) == 1
        assert fk.ext(free, R.EXT_BOOKING_LINK) == "https://book.example/s/PB1/0800"
        assert fk.ext(free, R.EXT_BOOKING_PHONE) == "010-12345678"
        later = slots[ids.slot_id("PB2", "0800")]
        assert later["status"] == "busy-unavailable" and fk.ext(later, R.EXT_RELEASE_AT)

        # Nothing an aggregator must know changed: no new publication.
        assert (await pub.publish_once()).outcome == "unchanged"
        # A hold moves a free count only (0830: 2 -> 1): still unchanged.
        h = await eng.hold("PB1", "0830", patient="pat-a", account="acct-a")
        assert isinstance(h, Held)
        assert (await pub.publish_once()).outcome == "unchanged"
        # Slot 0800 sells out: a change, but within the minimum interval.
        h2 = await eng.hold("PB1", "0800", patient="pat-b", account="acct-b")
        assert isinstance(h2, Held)
        assert (await pub.publish_once()).outcome == "rate-limited"
        pub.config = dataclasses.replace(cfg, publish_min_interval_s=0)
        again = await pub.publish_once()
        assert again.outcome == "published" and again.fingerprint != first.fingerprint
        body = await db_pool.fetchval(
            "SELECT body FROM bulk_files WHERE name = 'slots-H1.ndjson'")
        sold = {s["id"]: s for s in _lines(body)}[ids.slot_id("PB1", "0800")]
        assert sold["status"] == "busy" and fk.ext(sold, R.EXT_AVAILABILITY) == "sold-out"
        # An import (a new session) is a change too.
        await import_sessions(eng, db_pool, [make_spec("PB3", dept="PD3", date=_day(3),
                                                       caps=(1,))])
        third = await pub.publish_once()
        assert third.outcome == "published" and third.resources == again.resources + 2


async def test_the_api_serves_the_manifest_and_files(redis_url: str, fresh_pg_dsn: str) -> None:
    app = await flushed_app(redis_url, fresh_pg_dsn, public_url="https://h.example",
                            max_loop_lag_ms=0)
    async with AsyncTestClient(app) as client:
        empty = (await client.get("/fhir/r4/$bulk-publish")).json()
        assert empty["output"] == [] and empty["request"].endswith("/$bulk-publish")
        pool = await asyncpg.create_pool(fresh_pg_dsn, min_size=1, max_size=2)
        try:
            async with Engine.connect(redis_url, config()) as eng:
                await import_sessions(eng, pool, [make_spec("PA1", dept="PAD", date=_day(1))])
                await BulkPublisher(eng, pool, PublishConfig(
                    public_url="https://h.example")).publish_once()
        finally:
            await pool.close()
        await asyncio.sleep(1.1)  # the manifest's micro-cache
        r = await client.get("/fhir/r4/$bulk-publish")
        assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=60"
        manifest = r.json()
        assert manifest["request"] == "https://h.example/fhir/r4/$bulk-publish"
        dt.datetime.fromisoformat(manifest["transactionTime"])
        assert [o["type"] for o in manifest["output"]] == ["Location", "Schedule", "Slot"]
        for o in manifest["output"]:
            assert o["url"].startswith("https://h.example/fhir/r4/bulk/")
            path = "/fhir/r4/bulk/" + o["url"].rsplit("/", 1)[1]
            f = await client.get(path)
            assert f.status_code == 200
            assert f.headers["content-type"].startswith("application/fhir+ndjson")
            assert all(x["resourceType"] == o["type"] for x in _lines(f.content))
            again = await client.get(path, headers={"If-None-Match": f.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        fk.outcome(await client.get("/fhir/r4/bulk/nothing.ndjson"), 404, "not-found")


async def test_the_publish_and_fhir_client_commands(
        fresh_redis: Any, redis_url: str, db_pool: asyncpg.Pool, fresh_pg_dsn: str) -> None:
    async def haoyuan(*args: str) -> tuple[int, bytes, bytes]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", *args, "--redis-url", redis_url,
            "--pg-dsn", fresh_pg_dsn, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
        return p.returncode or 0, out, err

    rc, out, err = await haoyuan("fhir-client", "add", "backend-1", "--scopes",
                                 "system/Slot.read", "system/Appointment.write")
    assert rc == 0, err
    added = json.loads(out)
    assert added["token"].startswith("hyf_") and b"shown once" in err
    assert added["scopes"] == ["system/Slot.read", "system/Appointment.write"]
    stored = await db_pool.fetchval("SELECT secret_hash FROM fhir_clients")
    assert added["token"].rsplit("_", 1)[1] not in stored
    rc, out, err = await haoyuan("fhir-client", "add", "backend-1", "--scopes", "system/Slot.read")
    assert rc == 1 and b"exists" in err
    rc, out, err = await haoyuan("fhir-client", "add", "b2", "--scopes", "system/Patient.read")
    assert rc == 1 and b"unknown scope" in err
    rc, out, _ = await haoyuan("fhir-client", "list", "--json")
    assert [c["name"] for c in msgspec.json.decode(out)] == ["backend-1"]
    rc, out, _ = await haoyuan("fhir-client", "disable", "backend-1")
    assert rc == 0 and json.loads(out)["disabled"] is True
    rc, out, _ = await haoyuan("fhir-location", "NOSUCH", "--phone", "1")
    assert rc == 1
    async with Engine.connect(redis_url, config()) as eng:
        await import_sessions(eng, db_pool, [make_spec("PC1", dept="PCD", date=_day(1))])
    rc, out, _ = await haoyuan("fhir-location", "H1", "--phone", "010-1", "--city", "Beijing")
    assert rc == 0 and json.loads(out)["updated"] is True
    rc, out, err = await haoyuan("publish", "--once")
    assert rc == 0, err
    report = json.loads(out)
    assert report["outcome"] == "published" and report["files"] == 3
