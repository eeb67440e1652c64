"""A :class:`~engine.his.base.HisClient` speaking a small FHIR R4 subset over HTTP.

The resources and their conventions are in :mod:`engine.his.fhir_resources`.

Searches follow the Bundle's ``next`` links (same origin only).

Outcomes (see :mod:`engine.his.base`): 2xx is ``accepted`` (or the status of
the resource found); 400/409/422 ``rejected``; 412 on a conditional create
(several matches) ``unknown``; a timeout or a connection lost after the
request went out is ``unknown`` (reason ``timeout``); connection refused,
pool or connect timeout, 408, 429, 5xx and other 4xx raise
:class:`~engine.his.base.HisUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal
from urllib.parse import quote

import httpx
import msgspec

from engine.his.base import (
    REASON_NOT_FOUND,
    REASON_TIMEOUT,
    HisBooking,
    HisChange,
    HisPatient,
    HisProtocolError,
    HisResult,
    HisSchedule,
    HisUnavailable,
)
from engine.his.fhir_resources import (
    ACTIVE_STATUSES,
    CST,
    FHIR_JSON,
    GONE_STATUSES,
    REJECT_STATUSES,
    SYS_BOOKING,
    AppointmentView,
    PatientView,
    ScheduleView,
    SlotView,
    appointment_change,
    appointment_resource,
    booking_query,
    bundle_decoder,
    convert,
    json_decoder,
    patient_query,
    patient_resource,
    reason_of,
    schedule_change,
    status_result,
    to_schedule,
)
from engine.his.forwarder_policy import CircuitBreaker

_SLOT_CHUNK = 20
_MAX_PAGES = 1000


# -- the client ----------------------------------------------------------------


class _MaybeSent(Exception):
    """The request may have reached the HIS; its effect is unknown."""


class FhirHisClient:
    """``HisClient`` over FHIR R4 JSON. One instance per HIS; share it.

    ``breaker``, when given, is consulted before every request (an open
    breaker raises :class:`HisUnavailable` without sending) and told of every
    answer: 5xx, 429, other non-business 4xx and transport errors count as
    failures; anything else, rejections included, as success.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        max_concurrency: int = 32,
        tz: tzinfo = CST,
        breaker: CircuitBreaker | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._tz = tz
        self._breaker = breaker
        self._sem = asyncio.Semaphore(max_concurrency)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
            headers={"Accept": FHIR_JSON, **(headers or {})},
            transport=transport,
        )

    async def __aenter__(self) -> FhirHisClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- HisClient ---------------------------------------------------------

    async def book(self, b: HisBooking) -> HisResult:
        body = msgspec.json.encode(appointment_resource(b, self._tz))
        headers = {
            "Content-Type": FHIR_JSON,
            "If-None-Exist": booking_query(b.booking_id),
            "Prefer": "return=representation",
        }
        try:
            resp = await self._send("POST", "Appointment", content=body, headers=headers)
        except _MaybeSent:
            return HisResult("unknown", None, REASON_TIMEOUT)
        if resp.status_code in (200, 201):
            return self._created(resp)
        if resp.status_code == 412:
            # Several resources match our identifier: the HIS will not pick one.
            return HisResult("unknown", None, "ambiguous_match")
        if resp.status_code in REJECT_STATUSES:
            return HisResult("rejected", None, reason_of(resp.content, resp.status_code))
        raise self._unavailable(resp)

    async def lookup(self, booking_id: str) -> HisResult:
        try:
            raw = await self._find(booking_id)
        except _MaybeSent:
            return HisResult("unknown", None, REASON_TIMEOUT)
        if raw is None:
            return HisResult("rejected", None, REASON_NOT_FOUND)
        return status_result(raw)

    async def cancel(self, booking_id: str, reason: str) -> HisResult:
        for _ in range(3):
            try:
                raw = await self._find(booking_id)
            except _MaybeSent:
                return HisResult("unknown", None, REASON_TIMEOUT)
            if raw is None:
                return HisResult("accepted", None, REASON_NOT_FOUND)
            appt = convert(raw, AppointmentView)
            if appt.id is None:
                raise HisProtocolError("Appointment without an id")
            if appt.status in GONE_STATUSES:
                return HisResult("accepted", appt.id, appt.status)
            headers = {"Content-Type": FHIR_JSON}
            if appt.meta is not None and appt.meta.versionId:
                headers["If-Match"] = f'W/"{appt.meta.versionId}"'
            body = {**raw, "status": "cancelled", "cancelationReason": {"text": reason}}
            try:
                resp = await self._send(
                    "PUT",
                    f"Appointment/{quote(appt.id, safe='')}",
                    content=msgspec.json.encode(body),
                    headers=headers,
                )
            except _MaybeSent:
                return HisResult("unknown", appt.id, REASON_TIMEOUT)
            if resp.status_code in (200, 201):
                return HisResult("accepted", appt.id)
            if resp.status_code == 412:
                continue  # changed under us: read it again
            if resp.status_code in REJECT_STATUSES:
                return HisResult("rejected", appt.id, reason_of(resp.content, resp.status_code))
            raise self._unavailable(resp)
        raise HisUnavailable("the appointment keeps changing under us", status_code=412)

    async def ensure_patient(self, p: HisPatient) -> HisResult:
        headers = {"Content-Type": FHIR_JSON, "If-None-Exist": patient_query(p.national_id),
                   "Prefer": "return=representation"}
        try:
            resp = await self._send("POST", "Patient",
                                    content=msgspec.json.encode(patient_resource(p)),
                                    headers=headers)
        except _MaybeSent:
            return HisResult("unknown", None, REASON_TIMEOUT)
        if resp.status_code in (200, 201):
            try:
                raw = json_decoder.decode(resp.content) if resp.content else None
            except msgspec.DecodeError:
                raw = None
            if isinstance(raw, dict) and raw.get("resourceType") == "Patient":
                pid = convert(raw, PatientView).id
                if pid:
                    return HisResult("accepted", pid)
            parts = resp.headers.get("Location", "").split("/")
            if "Patient" in parts and parts.index("Patient") + 1 < len(parts):
                return HisResult("accepted", parts[parts.index("Patient") + 1])
            return HisResult("unknown", None, "no_resource_id")
        if resp.status_code == 412:
            return HisResult("rejected", None, "patient_ambiguous")
        if resp.status_code in REJECT_STATUSES:
            return HisResult("rejected", None, reason_of(resp.content, resp.status_code))
        raise self._unavailable(resp)

    async def changes(self, resource: Literal["Appointment", "Schedule"], since: str
                      ) -> list[HisChange]:
        params = [("_sort", "_lastUpdated"), ("_count", "100")]
        if since:
            params.insert(0, ("_lastUpdated", f"gt{since}"))
        try:
            raws = await self._search(resource, params)
        except _MaybeSent:
            raise HisUnavailable(f"{resource} change search timed out") from None
        read = appointment_change if resource == "Appointment" else schedule_change
        out = [c for c in (read(r) for r in raws if r.get("resourceType") == resource) if c]
        out.sort(key=lambda c: (_when(c.last_updated), c.his_id))
        return out

    async def fetch_schedules(self, start_date: str, end_date: str) -> list[HisSchedule]:
        try:
            raws = await self._search(
                "Schedule", [("date", f"ge{start_date}"), ("date", f"le{end_date}")]
            )
            schedules = [convert(r, ScheduleView) for r in raws]
            slots: dict[str, list[SlotView]] = {s.id: [] for s in schedules}
            ids = list(slots)
            for i in range(0, len(ids), _SLOT_CHUNK):
                refs = ",".join(f"Schedule/{sid}" for sid in ids[i : i + _SLOT_CHUNK])
                for r in await self._search("Slot", [("schedule", refs)]):
                    slot = convert(r, SlotView)
                    owner = (slot.schedule.reference or "").removeprefix("Schedule/")
                    if owner in slots:
                        slots[owner].append(slot)
        except _MaybeSent:
            raise HisUnavailable("schedule search timed out") from None
        out = [to_schedule(s, slots[s.id]) for s in schedules]
        # The HIS may read the date range loosely (planningHorizon): keep ours.
        out = [s for s in out if start_date <= s.date <= end_date]
        out.sort(key=lambda s: (s.date, s.period, s.session_id))
        return out

    # -- plumbing ----------------------------------------------------------

    def _created(self, resp: httpx.Response) -> HisResult:
        try:
            raw = json_decoder.decode(resp.content) if resp.content else None
        except msgspec.DecodeError:
            raw = None
        if isinstance(raw, dict) and raw.get("resourceType") == "Appointment":
            return status_result(raw)
        # return=minimal: the id is in Location (.../Appointment/<id>/_history/<v>).
        parts = resp.headers.get("Location", "").split("/")
        if "Appointment" in parts and parts.index("Appointment") + 1 < len(parts):
            return HisResult("accepted", parts[parts.index("Appointment") + 1])
        # Created, but we cannot tell which resource: reconcile with lookup.
        return HisResult("unknown", None, "no_resource_id")

    async def _find(self, booking_id: str) -> dict[str, Any] | None:
        """The booking's Appointment, preferring an active one when there are several."""
        found = await self._search("Appointment", [("identifier", f"{SYS_BOOKING}|{booking_id}")])
        found = [r for r in found if r.get("resourceType") == "Appointment"]
        active = [r for r in found if r.get("status") in ACTIVE_STATUSES]
        if active or found:
            return (active or found)[0]
        return None

    async def _search(self, resource: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """All matching resources of a search, following ``next`` links."""
        out: list[dict[str, Any]] = []
        url: str | None = resource
        query: list[tuple[str, str]] | None = params
        for _ in range(_MAX_PAGES):
            if url is None:
                return out
            resp = await self._send("GET", url, params=query)
            if resp.status_code != 200:
                raise self._unavailable(resp)
            try:
                bundle = bundle_decoder.decode(resp.content)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise HisProtocolError(f"bad {resource} search Bundle: {exc}") from None
            if bundle.resourceType != "Bundle":
                raise HisProtocolError(f"{resource} search answered a {bundle.resourceType}")
            out.extend(
                e.resource
                for e in bundle.entry
                if e.resource is not None and (e.search is None or e.search.mode in (None, "match"))
            )
            url = next((link.url for link in bundle.link if link.relation == "next"), None)
            query = None
            if url is not None and not self._same_origin(url):
                raise HisProtocolError(f"{resource} search links away from the HIS: {url}")
        raise HisProtocolError(f"{resource} search has more than {_MAX_PAGES} pages")

    def _same_origin(self, url: str) -> bool:
        target = httpx.URL(url)
        if target.is_relative_url:
            return True
        base = self._http.base_url
        return (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> httpx.Response:
        """One request. Raises HisUnavailable when nothing was sent, _MaybeSent
        when the request may have reached the HIS but no answer came back."""
        breaker = self._breaker
        if breaker is not None and not breaker.allow():
            raise HisUnavailable("circuit open")
        try:
            async with self._sem:
                resp = await self._http.request(
                    method,
                    url,
                    content=content,
                    headers=headers,
                    params=None if params is None else tuple(params),
                )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            if breaker is not None:
                breaker.record_failure()
            raise HisUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        except httpx.TransportError as exc:
            # Read/write timeout, connection reset or closed mid-exchange.
            if breaker is not None:
                breaker.record_failure()
            raise _MaybeSent(f"{method} {url}: {type(exc).__name__}") from exc
        if breaker is not None:
            if _is_his_failure(resp.status_code):
                breaker.record_failure()
            else:
                breaker.record_success()
        return resp

    @staticmethod
    def _unavailable(resp: httpx.Response) -> HisUnavailable:
        reason = reason_of(resp.content, resp.status_code)
        return HisUnavailable(
            f"{resp.request.method} {resp.request.url.path}: HTTP {resp.status_code} ({reason})",
            status_code=resp.status_code,
        )


def _when(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _is_his_failure(status_code: int) -> bool:
    return status_code >= 500 or (
        status_code >= 400 and status_code not in REJECT_STATUSES and status_code != 412
    )
