"""Slot search and ``Appointment/$find``: free/busy from the engine's live availability.

``GET /fhir/r4/Slot`` (scope ``system/Slot.read``) searches the catalogue
(PostgreSQL) and answers each slot's state from the engine (the same
micro-cached reads as /v1's availability):

- ``start``: ``ge``/``gt``/``le``/``lt``/``eq`` and a date (China time) or
  an instant; repeatable (default: the next 7 days; at most 31 days at
  once, else 422 ``too-costly``);
- ``status``: ``free``, ``busy`` (sold out), ``busy-unavailable`` (not open
  yet, closed, suspended), comma-separated;
- ``schedule``: ``Schedule/<id>`` (a session);
- ``practitioner``, ``schedule.actor``: ``Practitioner/<id>`` (a doctor);
  ``location`` (and ``schedule.actor``): ``Location/<id>`` (a hospital);
- ``service-type``, ``specialty``: a department, ``[urn:haoyuan:dept|]<code>``;
- ``_count`` (1..500, default 50), ``_offset``: a page; the Bundle links
  ``next`` and ``previous``.

``Appointment/$find`` (GET with these parameters, or POST a Parameters
resource): ``start`` and ``end`` (required), ``practitioner``,
``specialty``/``visit-type``/``service-type``, ``location-reference``,
``_count`` (default 10, at most 100): proposed Appointments for the free
slots, earliest first, with the free units (``urn:haoyuan:free-units``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from litestar import Controller, Request, Response, get, post

from api.context import Api, api_of
from api.fhir import common
from api.fhir.auth import client_required
from api.fhir.body import Parameters, read_body
from api.fhir.outcomes import OutcomeError
from engine.scheduling import ids
from engine.scheduling import resources as fhir
from engine.scheduling.publish import booking_link
from engine.store.scheduling import SessionInfo

__all__ = ["CapabilityController", "SearchController"]

CST = dt.timezone(dt.timedelta(hours=8))
_PREFIX = re.compile(
    r"(eq|gt|lt|ge|le|sa|eb)?(\d{4}-\d{2}-\d{2}(?:T[0-9:.]+(?:Z|[+-]\d{2}:\d{2}))?)", re.ASCII)
_STATUSES = frozenset({"free", "busy", "busy-unavailable"})
MAX_DAYS = 31
AnyRequest = Request[Any, Any, Any]


class SlotQuery:
    """What a Slot search or $find asks for."""

    def __init__(self) -> None:
        self.lower_ms: int | None = None
        self.upper_ms: int | None = None  # exclusive
        self.sessions: list[str] | None = None
        self.doctors: list[str] | None = None
        self.hospitals: list[str] | None = None
        self.depts: list[str] | None = None
        self.statuses: frozenset[str] | None = None
        self.count = 50
        self.offset = 0

    def bound(self, value: str, default_prefix: str = "eq") -> None:
        m = _PREFIX.fullmatch(value)
        if m is None:
            raise OutcomeError.of("invalid-input", "start/end: a date (YYYY-MM-DD) or an"
                                  " instant with its offset, after an optional prefix")
        prefix, when = m.group(1) or default_prefix, m.group(2)
        try:
            if "T" in when:
                lo = int(dt.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
                         * 1000)
                hi = lo + 1
            else:
                day = dt.date.fromisoformat(when)
                lo = int(dt.datetime(day.year, day.month, day.day, tzinfo=CST).timestamp()
                         * 1000)
                hi = lo + 86_400_000
        except (ValueError, OverflowError):
            raise OutcomeError.of("invalid-input", "start/end: not a calendar date or instant"
                                  ) from None
        if prefix in ("ge", "sa") or prefix == "gt":
            self._lower(lo if prefix == "ge" else hi)
        elif prefix in ("le", "lt", "eb"):
            self._upper(hi if prefix == "le" else lo)
        else:  # eq
            self._lower(lo)
            self._upper(hi)

    def _lower(self, ms: int) -> None:
        self.lower_ms = ms if self.lower_ms is None else max(self.lower_ms, ms)

    def _upper(self, ms: int) -> None:
        self.upper_ms = ms if self.upper_ms is None else min(self.upper_ms, ms)

    def window(self, now_ms: int) -> tuple[int, int]:
        if self.lower_ms is None:
            today = dt.datetime.fromtimestamp(now_ms / 1000, CST).date()
            lower = int(dt.datetime(today.year, today.month, today.day, tzinfo=CST).timestamp()
                        * 1000)
            self.lower_ms = lower if self.upper_ms is None else min(
                lower, self.upper_ms - 7 * 86_400_000)
        if self.upper_ms is None:
            self.upper_ms = self.lower_ms + 7 * 86_400_000
        if self.upper_ms - self.lower_ms > MAX_DAYS * 86_400_000:
            raise OutcomeError.of("too-costly", f"search at most {MAX_DAYS} days at once")
        return self.lower_ms, self.upper_ms


def _refs(values: Iterable[str], kind: str, *, bare: bool = True) -> list[str]:
    """Our ids of references ``<kind>/<id>`` (and bare ids where ``bare``);
    references of another kind are left out, malformed ones match nothing."""
    out: list[str] = []
    for v in values:
        for item in v.split(","):
            item = item.strip()
            if "/" in item:
                t, _, item = item.rpartition("/")
                if t.rsplit("/", 1)[-1] != kind:
                    continue
            elif not bare:
                continue
            got = ids.dec(item)
            out.append(got if got is not None else "\x00")
    return out


def _tokens(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for item in v.split(","):
            system, bar, code = item.strip().rpartition("|")
            if bar and system not in ("", "urn:haoyuan:dept"):
                out.append("\x00")
            elif code:
                out.append(code)
    return out


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or not lo <= int(value) <= hi:
        raise OutcomeError.of("invalid-input", f"{name} must be an integer {lo}..{hi}")
    return int(value)


def _query(params: dict[str, list[str]], *, find: bool) -> SlotQuery:
    q = SlotQuery()
    if find:
        starts, ends = params.get("start", []), params.get("end", [])
        if len(starts) != 1 or len(ends) != 1:
            raise OutcomeError.of("invalid-input", "$find needs one start and one end")
        q.bound(starts[0], "ge")
        q.bound(ends[0], "le")
        q.statuses = frozenset({"free"})
        q.count = _int(_first(params.get("_count")), "_count", 10, 1, 100)
        docs = params.get("practitioner", [])
        places = params.get("location-reference", [])
        depts = [*params.get("specialty", []), *params.get("visit-type", []),
                 *params.get("service-type", [])]
    else:
        for v in params.get("start", []):
            q.bound(v)
        st = [s for v in params.get("status", []) for s in v.split(",")]
        if any(s not in _STATUSES for s in st):
            raise OutcomeError.of("invalid-input", "status: free, busy or busy-unavailable")
        q.statuses = frozenset(st) or None
        if params.get("schedule"):
            q.sessions = _refs(params["schedule"], "Schedule")
        actors = params.get("schedule.actor", [])
        docs = params.get("practitioner", [])
        places = params.get("location", [])
        depts = [*params.get("service-type", []), *params.get("specialty", [])]
        # A parameter given matches only what it names (nothing, if it names
        # nothing of its kind); schedule.actor narrows by the kinds it names.
        for kind, own, attr in (("Practitioner", docs, "doctors"),
                                ("Location", places, "hospitals")):
            got = [*_refs(own, kind), *_refs(actors, kind, bare=False)]
            if own or got:
                setattr(q, attr, got)
        docs = places = []
        q.count = _int(_first(params.get("_count")), "_count", 50, 1, 500)
        q.offset = _int(_first(params.get("_offset")), "_offset", 0, 0, 100_000)
    if docs:
        q.doctors = _refs(docs, "Practitioner")
    if places:
        q.hospitals = _refs(places, "Location")
    if depts:
        q.depts = _tokens(depts)
    return q


async def _slots(api: Api, q: SlotQuery) -> list[tuple[int, dict[str, Any], SessionInfo]]:
    """(start ms, Slot, session) of every slot that matches, earliest first."""
    lower, upper = q.window(api.clock.now_ms())
    d0 = dt.datetime.fromtimestamp(lower / 1000, dt.UTC).date() - dt.timedelta(days=1)
    d1 = dt.datetime.fromtimestamp(upper / 1000, dt.UTC).date() + dt.timedelta(days=1)
    infos = await common.sessions(api, d0, d1, hospitals=q.hospitals, depts=q.depts,
                                  doctors=q.doctors, session_ids=q.sessions)
    picked = [(s, sl, common.slot_start_ms(s, sl.start)) for s in infos for sl in s.slots]
    picked = [x for x in picked if lower <= x[2] < upper]
    now_ms, live = await common.live(api, sorted({s.session_id for s, _, _ in picked}))
    out = []
    s = api.settings
    for info, sl, start in picked:
        ls = live.get(info.session_id)
        lslot = next((x for x in ls.slots if x.slot_id == sl.slot_id), None) if ls else None
        r = fhir.slot(info, sl, ls, lslot, now_ms,
                      booking_link=booking_link(s.booking_link, s.public_url, info, sl.slot_id))
        if q.statuses is None or r["status"] in q.statuses:
            out.append((start, r, info))
    out.sort(key=lambda x: (x[0], x[1]["id"]))
    return out


def _params(request: AnyRequest) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in request.query_params.multi_items():
        out.setdefault(k, []).append(v)
    return out


class CapabilityController(Controller):
    path = common.PATH
    tags = ("fhir",)

    @get("/metadata", summary="The facade's CapabilityStatement")
    async def metadata(self, request: AnyRequest) -> Response[Any]:
        """What the facade supports (FHIR R4): Slot search and read;
        Appointment read, update and patch (cancel), ``$find``, ``$hold``,
        ``$book``; SMART system scopes; the ``$bulk-publish`` manifest."""
        api = api_of(request)
        search = [{"name": n, "type": t} for n, t in (
            ("start", "date"), ("status", "token"), ("schedule", "reference"),
            ("service-type", "token"), ("specialty", "token"))]
        op = "http://fhir.org/guides/argonaut-scheduling/OperationDefinition/appointment-"
        body = {
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
            "date": fhir.ms_instant(api.clock.now_ms())[:10], "fhirVersion": "4.0.1",
            "format": ["json"],
            "implementation": {"description": "haoyuan FHIR scheduling facade",
                               "url": common.base_url(api)},
            "rest": [{"mode": "server", "security": {
                "description": "Bearer token of a backend client (haoyuan fhir-client add)"
                               " with SMART system scopes: system/Slot.read,"
                               " system/Appointment.read, system/Appointment.write"},
                "resource": [
                    {"type": "Slot", "interaction": [{"code": "read"}, {"code": "search-type"}],
                     "searchParam": search},
                    {"type": "Appointment", "interaction": [
                        {"code": "read"}, {"code": "update"}, {"code": "patch"}],
                     "operation": [{"name": n, "definition": op + n}
                                   for n in ("find", "hold", "book")]}]}],
        }
        return common.answer(body)


class SearchController(Controller):
    path = common.PATH
    tags = ("fhir",)

    @get("/Slot", before_request=client_required("Slot", "read"),
         summary="Search slots: free / busy from the live availability, paged")
    async def search(self, request: AnyRequest) -> Response[Any]:
        """See the module's table of parameters: a searchset Bundle of Slots
        with ``total`` and ``next``/``previous`` links."""
        api = api_of(request)
        params = _params(request)
        q = _query(params, find=False)
        found = await _slots(api, q)
        page = found[q.offset:q.offset + q.count]
        base = common.base_url(api)

        def link(offset: int) -> str:
            keep = [(k, v) for k, vs in params.items() if k != "_offset" for v in vs]
            return f"{base}/Slot?" + urlencode([*keep, ("_offset", str(offset))])

        links = [("self", link(q.offset))]
        if q.offset + q.count < len(found):
            links.append(("next", link(q.offset + q.count)))
        if q.offset > 0:
            links.append(("previous", link(max(0, q.offset - q.count))))
        return common.answer(fhir.bundle(base, [r for _, r, _ in page], total=len(found),
                                         links=links))

    @get("/Slot/{slot_id:str}", before_request=client_required("Slot", "read"),
         summary="One slot, as it is now")
    async def read(self, request: AnyRequest, slot_id: str) -> Response[Any]:
        api = api_of(request)
        got = ids.parse_slot_id(slot_id)
        info = None if got is None else await common.session_info(api, got[0])
        sl = None if info is None or got is None else next(
            (x for x in info.slots if x.slot_id == got[1]), None)
        if info is None or sl is None:
            raise OutcomeError.of("not-found", "no such Slot")
        now_ms, live = await common.live(api, [info.session_id])
        ls = live.get(info.session_id)
        lslot = next((x for x in ls.slots if x.slot_id == sl.slot_id), None) if ls else None
        s = api.settings
        return common.answer(fhir.slot(info, sl, ls, lslot, now_ms, booking_link=booking_link(
            s.booking_link, s.public_url, info, sl.slot_id)))

    @get("/Appointment/$find", before_request=client_required("Slot", "read"),
         summary="Argonaut $find: proposed appointments for free slots")
    async def find(self, request: AnyRequest) -> Response[Any]:
        """``start`` and ``end`` (required), ``practitioner``, ``specialty``,
        ``location-reference``, ``_count``: a searchset Bundle of proposed
        Appointments (empty: nothing free)."""
        return await _find(api_of(request), _params(request))

    @post("/Appointment/$find", status_code=200, before_request=client_required("Slot", "read"),
          summary="Argonaut $find with a Parameters body")
    async def find_post(self, request: AnyRequest) -> Response[Any]:
        body: Parameters = await read_body(request, Parameters)
        params: dict[str, list[str]] = {}
        for p in body.parameter:
            v = str(p.value_integer) if p.value_integer is not None else p.text
            if v is None:
                raise OutcomeError.of("invalid-input", f"parameter {p.name[:40]}: a uri,"
                                      " string, dateTime, code or integer value")
            params.setdefault(p.name, []).append(v)
        return await _find(api_of(request), params)


async def _find(api: Api, params: dict[str, list[str]]) -> Response[Any]:
    q = _query(params, find=True)
    found = await _slots(api, q)
    out = []
    for _, r, info in found[:q.count]:
        sid, slot = ids.parse_slot_id(r["id"]) or ("", "")
        free = next(e["valueInteger"] for e in r["extension"] if e["url"] == fhir.EXT_FREE_UNITS)
        out.append(fhir.appointment(ids.proposed_id(sid, slot), "proposed", info, slot,
                                    fee=info.fee, free=free))
    return common.answer(fhir.bundle(common.base_url(api), out, total=len(out)))
