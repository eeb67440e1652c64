"""What the facade's routes share: the base URL, the catalogue and live
availability (micro-cached per worker like /v1's), FHIR answers, and the
client's own records."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Response

from api.context import Api
from api.fhir.outcomes import OutcomeError, fhir_response
from api.routes.browse import _Shed  # the same cache entries as /v1's availability
from engine.outcomes import Availability, Record, SessionAvailability
from engine.scheduling import ids
from engine.scheduling import resources as fhir
from engine.store import scheduling as store
from engine.store.fhir_clients import FhirClient

__all__ = ["PATH", "account_for", "base_url", "live", "own_record", "session_info",
           "sessions", "slot_start_ms"]

PATH = "/fhir/r4"
_encode = msgspec.json.Encoder().encode
_infos = msgspec.json.Decoder(list[store.SessionInfo]).decode
_avail = msgspec.json.Decoder(Availability).decode


def base_url(api: Api) -> str:
    return api.settings.public_url.rstrip("/") + PATH


def account_for(client: FhirClient, ref: str) -> str:
    """The engine account of a client's requests for one patient: the /v1
    per-account limits apply to each patient a client books for."""
    return client.account_prefix + ref[:24]


async def sessions(api: Api, date_from: dt.date, date_to: dt.date, *,
                   hospitals: Sequence[str] | None = None, depts: Sequence[str] | None = None,
                   doctors: Sequence[str] | None = None,
                   session_ids: Sequence[str] | None = None) -> list[store.SessionInfo]:
    """The catalogue's sessions (PostgreSQL), micro-cached per worker."""
    def key(v: Sequence[str] | None) -> tuple[str, ...] | None:
        return None if v is None else tuple(sorted(v))

    async def load() -> bytes:
        return _encode(await store.sessions(api.pool, date_from, date_to, hospitals=hospitals,
                                            depts=depts, doctors=doctors,
                                            session_ids=session_ids))

    k = ("fhir", date_from, date_to, key(hospitals), key(depts), key(doctors), key(session_ids))
    return _infos(await api.catalog_cache.get(k, load))


async def session_info(api: Api, session_id: str) -> store.SessionInfo | None:
    got = await sessions(api, dt.date(1970, 1, 1), dt.date(9999, 12, 31),
                         session_ids=[session_id])
    return got[0] if got else None


async def live(api: Api, session_ids: Sequence[str]) -> tuple[int, dict[str, SessionAvailability]]:
    """Server time and the engine's live availability of sessions, through
    /v1's per-session micro-cache (a refresh storm costs one read per session
    and cache period)."""
    async def one(sid: str) -> SessionAvailability | None:
        async def load() -> bytes:
            if not api.admission.enter():
                raise _Shed
            try:
                got = await api.engine.availability(sid)
            finally:
                api.admission.leave()
            if got is None:
                return b""
            a = Availability(server_ms=api.clock.now_ms(), sessions=[got])
            api.learn(a)
            return _encode(a)

        try:
            body = await api.availability_cache.get("s:" + sid, load)
        except _Shed:
            raise OutcomeError.of("overloaded", "too many requests in flight; retry shortly",
                                  headers={"Retry-After": "1"}) from None
        return _avail(body).sessions[0] if body else None

    got = await asyncio.gather(*(one(s) for s in dict.fromkeys(session_ids)))
    return api.clock.now_ms(), {a.session_id: a for a in got if a is not None}


def slot_start_ms(s: store.SessionInfo, clock: str) -> int:
    t = dt.datetime.fromisoformat(fhir.local_instant(s.date, clock, s.tz_min))
    return int(t.timestamp() * 1000)


async def own_record(api: Api, client: FhirClient, appt_id: str) -> Record:
    """One of the client's holds or bookings, by its Appointment id (else 404,
    or 503 ``recovering`` where its partition lost its state)."""
    record_id = ids.parse_appointment_id(appt_id)
    rec = None if record_id is None else await api.engine.record(record_id)
    if rec is None:
        if record_id is not None and await api.recovering(int(record_id.split(".")[0])):
            raise OutcomeError.of("recovering", "sales are closed while the engine recovers its"
                                  " state; retry shortly", headers={"Retry-After": "2"})
        raise OutcomeError.of("not-found", "no such Appointment")
    if not rec.account.startswith(client.account_prefix):
        raise OutcomeError.of("not-found", "no such Appointment")
    return rec


def answer(body: dict[str, Any], status: int = 200,
           headers: dict[str, str] | None = None) -> Response[Any]:
    return fhir_response(body, status, headers)
