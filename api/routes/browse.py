"""Browse: hospitals, departments, doctors, sessions, and availability.

The catalogue comes from PostgreSQL (written by the admin import); free
units come from the engine. Both are public (no login needed to look), and
micro-cached per worker with concurrent misses coalesced: a refresh storm
costs one read per key per cache period.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.params import QueryParameter

from api import catalog
from api.context import Api, api_of
from api.docs import errors
from api.problems import ProblemError, json_response, problem, retry_after
from api.schemas import DepartmentOut, DoctorOut, HospitalOut, SessionOut
from engine.outcomes import Availability

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_NAME = re.compile(r"[^\s|\x00-\x1f\x7f\ud800-\udfff]{1,64}")  # as engine.model.Name
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_encode = msgspec.json.Encoder().encode


def _json(body: bytes) -> Response[Any]:
    return json_response(body)


async def _cached(api: Api, key: Any, load: Callable[[], Awaitable[Any]]) -> bytes:
    async def encoded() -> bytes:
        return _encode(await load())

    return await api.catalog_cache.get(key, encoded)


def _not_found(request: Request[Any, Any, Any], what: str) -> ProblemError:
    return ProblemError.of("not-found", f"no such {what}", instance=request.url.path)


class CatalogController(Controller):
    path = "/v1"
    tags = ("browse",)

    @get("/hospitals", summary="Hospitals")
    async def hospitals(self, request: Request[Any, Any, Any]) -> Response[list[HospitalOut]]:
        api = api_of(request)
        return _json(await _cached(api, "h", lambda: catalog.hospitals(api.pool)))

    @get("/hospitals/{hospital_id:str}/departments", responses=errors(404),
         summary="Departments of a hospital")
    async def departments(
        self, request: Request[Any, Any, Any], hospital_id: str
    ) -> Response[list[DepartmentOut]]:
        api = api_of(request)
        if not _NAME.fullmatch(hospital_id):
            raise _not_found(request, "hospital")
        body = await _cached(api, ("dp", hospital_id),
                             lambda: catalog.departments(api.pool, hospital_id))
        if body == b"null":
            raise _not_found(request, "hospital")
        return _json(body)

    @get("/departments/{dept_id:str}/doctors", responses=errors(404),
         summary="Doctors of a department")
    async def doctors(
        self, request: Request[Any, Any, Any], dept_id: str
    ) -> Response[list[DoctorOut]]:
        api = api_of(request)
        if not _NAME.fullmatch(dept_id):
            raise _not_found(request, "department")
        body = await _cached(api, ("dr", dept_id), lambda: catalog.doctors(api.pool, dept_id))
        if body == b"null":
            raise _not_found(request, "department")
        return _json(body)

    @get("/sessions", responses=errors(422), summary="Sessions of a date range")
    async def sessions(
        self,
        request: Request[Any, Any, Any],
        date_from: Annotated[dt.date, QueryParameter(name="from", description="first date")],
        date_to: Annotated[dt.date, QueryParameter(name="to", description="last date (31 days)")],
        hospital: Annotated[str | None, QueryParameter(name="hospital", max_length=64)] = None,
        dept: Annotated[str | None, QueryParameter(name="dept", max_length=64)] = None,
        doctor: Annotated[str | None, QueryParameter(name="doctor", max_length=64)] = None,
    ) -> Response[list[SessionOut]]:
        api = api_of(request)
        if date_to < date_from or (date_to - date_from).days >= catalog.MAX_DAYS:
            raise ProblemError.of("invalid-input",
                                  f"'to' must be on or after 'from', at most {catalog.MAX_DAYS}"
                                  " days in all", instance=request.url.path)
        key = ("s", date_from, date_to, hospital, dept, doctor)
        return _json(await _cached(api, key, lambda: catalog.sessions(
            api.pool, date_from, date_to, hospital=hospital, dept=dept, doctor=doctor)))

    @get("/sessions/{session_id:str}", responses=errors(404), summary="One session")
    async def session(
        self, request: Request[Any, Any, Any], session_id: str
    ) -> Response[SessionOut]:
        api = api_of(request)
        if not _ID.fullmatch(session_id):
            raise _not_found(request, "session")
        body = await _cached(api, ("s1", session_id), lambda: catalog.session(api.pool, session_id))
        if body == b"null":
            raise _not_found(request, "session")
        return _json(body)


async def _availability(
    request: Request[Any, Any, Any], key: str, read: Callable[[], Awaitable[Availability | None]]
) -> Response[Any]:
    api = api_of(request)

    async def load() -> bytes:
        if not api.admission.enter():
            raise _Shed
        try:
            got = await read()
        finally:
            api.admission.leave()
        if got is None:
            return b""
        api.learn(got)
        return _encode(got)

    try:
        body = await api.availability_cache.get(key, load)
    except _Shed:
        api.metrics.decision("availability", "shed")
        ms, headers = retry_after(api.settings.shed_retry_after_s * 1000)
        return problem("overloaded", instance=request.url.path, headers=headers,
                       retry_after_ms=ms)
    if not body:
        raise _not_found(request, "session")
    return _json(body)


class _Shed(Exception):
    pass


class AvailabilityController(Controller):
    path = "/v1"
    tags = ("browse",)

    @get("/sessions/{session_id:str}/availability", responses=errors(404, 429),
         summary="Free units per slot of a session")
    async def session(
        self, request: Request[Any, Any, Any], session_id: str
    ) -> Response[Availability]:
        if not _ID.fullmatch(session_id):
            raise _not_found(request, "session")
        api = api_of(request)

        async def read() -> Availability | None:
            a = await api.engine.availability(session_id)
            return None if a is None else Availability(server_ms=api.clock.now_ms(), sessions=[a])

        return await _availability(request, "s:" + session_id, read)

    @get("/departments/{dept_id:str}/days/{date:str}/availability", responses=errors(404, 429),
         summary="Free units per slot of every session of a department-day")
    async def dept_day(
        self, request: Request[Any, Any, Any], dept_id: str, date: str
    ) -> Response[Availability]:
        if not _NAME.fullmatch(dept_id) or not _DATE.fullmatch(date):
            raise _not_found(request, "department-day")
        api = api_of(request)

        async def read() -> Availability:
            return await api.engine.dept_day_availability(dept_id, date)

        return await _availability(request, f"d:{dept_id}:{date}", read)
