"""SMART Scheduling Links bulk publishing: Location, Schedule and Slot NDJSON
files and their ``$bulk-publish`` manifest, for aggregators that show
availability across hospitals.

``BulkPublisher`` is a background worker (``haoyuan publish``), off the hot
path: every ``publish_check_s`` it reads the schedule from PostgreSQL and the
live availability of the published sessions from the engine (read-only
scripts), and computes a fingerprint of what an aggregator must know at once:
the schedule (an import, a suspension, a hospital's contact) and every
slot's state (free, sold out, not open, closed). When the fingerprint
changed, it publishes, at most once per ``publish_min_interval_s`` (rate
limited: a release morning flips hundreds of slots within seconds), and in
any case after ``publish_max_age_s`` (free counts of free slots move between
publications; SMART allows estimates). A publication replaces the files in
PostgreSQL in one transaction (``bulk_files``); every API worker serves them
(``GET /fhir/r4/$bulk-publish``, ``/fhir/r4/bulk/<name>``).

Files: ``locations.ndjson``, ``schedules.ndjson`` and one Slot file per
hospital (``slots-<hospital>.ndjson``, annotated with the hospital's
``state`` when its contact has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
from typing import Any
from urllib.parse import quote

import msgspec

from engine.config import PublishConfig
from engine.engine import Engine
from engine.scheduling import ids
from engine.scheduling import resources as fhir
from engine.store import scheduling as store
from engine.store.queries import Queryable

__all__ = ["BulkPublisher", "Publication", "PublishReport", "booking_link"]

log = logging.getLogger("haoyuan.publish")
_encode = msgspec.json.Encoder().encode
#: Local dates of the release calendar (the hospitals' own time zone).
CST = dt.timezone(dt.timedelta(hours=8))


class Publication(msgspec.Struct, frozen=True):
    files: list[store.BulkFile]
    fingerprint: str
    resources: int


class PublishReport(msgspec.Struct, frozen=True, kw_only=True):
    #: published, unchanged, rate-limited
    outcome: str
    fingerprint: str
    files: int = 0
    resources: int = 0
    transaction_time: str | None = None


def booking_link(template: str, public_url: str, s: store.SessionInfo, slot_id: str) -> str:
    q = quote
    return template.format(public_url=public_url.rstrip("/"),
                           slot=q(ids.slot_id(s.session_id, slot_id), safe=""),
                           session_id=q(s.session_id, safe=""), slot_id=q(slot_id, safe=""),
                           hospital=q(s.hospital_id, safe=""))


def _ndjson(resources: list[dict[str, Any]]) -> bytes:
    return b"".join(_encode(r) + b"\n" for r in resources)


def _file(name: str, kind: str, resources: list[dict[str, Any]],
          jurisdiction: list[str] | None = None) -> store.BulkFile:
    body = _ndjson(resources)
    return store.BulkFile(name=name, type=kind, body=body,
                          etag=hashlib.sha256(body).hexdigest()[:32], resources=len(resources),
                          jurisdiction=jurisdiction or [])


class BulkPublisher:
    def __init__(self, engine: Engine, pool: Any, config: PublishConfig | None = None) -> None:
        self.engine = engine
        self.pool = pool
        self.config = config or PublishConfig()
        self.published = 0

    async def build(self, today: dt.date | None = None) -> Publication:
        """What would be published now (nothing written)."""
        c = self.config
        today = today or dt.datetime.now(CST).date()
        sessions = await store.sessions(self.pool, today,
                                        today + dt.timedelta(days=c.publish_horizon_days),
                                        limit=100_000)
        hospitals = await store.hospitals(self.pool, sorted({s.hospital_id for s in sessions}))
        now_ms, live = await self.engine.availabilities([s.session_id for s in sessions])
        contact = {h.hospital_id: h.contact for h in hospitals}
        locations = [fhir.location(h) for h in hospitals]
        schedules = [fhir.schedule(s) for s in sessions]
        slots: dict[str, list[dict[str, Any]]] = {h.hospital_id: [] for h in hospitals}
        states = hashlib.sha256()
        for s in sessions:
            ls = live.get(s.session_id)
            by_id = {x.slot_id: x for x in ls.slots} if ls is not None else {}
            phone = contact.get(s.hospital_id, {}).get("phone")
            for sl in s.slots:
                r = fhir.slot(s, sl, ls, by_id.get(sl.slot_id), now_ms,
                              booking_link=booking_link(c.booking_link, c.public_url, s,
                                                        sl.slot_id),
                              booking_phone=str(phone) if phone else None)
                slots[s.hospital_id].append(r)
                state = r["extension"][0]["valueCode"]
                states.update(f"{r['id']}={state};".encode())
        files = [_file("locations.ndjson", "Location", locations),
                 _file("schedules.ndjson", "Schedule", schedules)]
        for h in hospitals:
            st = contact[h.hospital_id].get("state")
            files.append(_file(f"slots-{ids.enc(h.hospital_id)}.ndjson", "Slot",
                               slots[h.hospital_id], [str(st)] if st else None))
        fp = hashlib.sha256(files[0].etag.encode() + files[1].etag.encode()
                            + states.digest()).hexdigest()[:32]
        return Publication(files, fp, sum(f.resources for f in files))

    async def publish_once(self, *, force: bool = False) -> PublishReport:
        """Publish if something an aggregator must know changed (or ``force``),
        no sooner than ``publish_min_interval_s`` after the last publication."""
        c = self.config
        pub = await self.build()
        last = await _last(self.pool)
        now = dt.datetime.now(dt.UTC)
        if last is not None and not force:
            at, fingerprint = last
            age = (now - at).total_seconds()
            if fingerprint == pub.fingerprint and age < c.publish_max_age_s:
                return PublishReport(outcome="unchanged", fingerprint=pub.fingerprint)
            if age < c.publish_min_interval_s:
                return PublishReport(outcome="rate-limited", fingerprint=pub.fingerprint)
        await store.replace_bulk(self.pool, pub.files, transaction_time=now,
                                 fingerprint=pub.fingerprint)
        self.published += 1
        log.info("published %d files, %d resources", len(pub.files), pub.resources)
        return PublishReport(outcome="published", fingerprint=pub.fingerprint,
                             files=len(pub.files), resources=pub.resources,
                             transaction_time=now.isoformat())

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Check every ``publish_check_s`` until ``stop`` (with ``burst``: once,
        publishing whatever the last publication was). A failed pass is
        logged and the next one tries again."""
        while not stop.is_set():
            try:
                await self.publish_once(force=burst)
            except Exception:
                log.exception("publication failed")
            if burst:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.publish_check_s)


async def _last(db: Queryable) -> tuple[dt.datetime, str] | None:
    r = await db.fetchrow("SELECT transaction_time, fingerprint FROM bulk_publication")
    return None if r is None else (r["transaction_time"], r["fingerprint"])
