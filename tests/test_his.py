"""The HIS side: FHIR client against the simulator over a real loopback socket,
plus the retry primitives.

Self-contained: the fixtures live here, not in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from fhir.resources.R4B.appointment import Appointment
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.schedule import Schedule
from fhir.resources.R4B.slot import Slot

from engine.his import (
    Backoff,
    BreakerState,
    CircuitBreaker,
    FhirHisClient,
    HisBooking,
    HisClient,
    HisProtocolError,
    HisResult,
    HisSchedule,
    HisSlot,
    HisUnavailable,
)
from engine.his.fhir_resources import (
    appointment_resource,
    operation_outcome,
    reason_of,
    schedule_resources,
)
from engine.testing.his_simulator import SimConfig, SimulatorProcess, create_his_app, free_port

PATIENT = "hk1." + "9f" * 30  # an opaque keyed hash, never an ID number


def booking(n: int = 57, *, doctor: str = "DR7", patient: str = PATIENT) -> HisBooking:
    return HisBooking(
        booking_id=f"12.S20261201-D01-AM.{n}",
        session_id="S20261201-D01-AM",
        slot_id="0800",
        unit=n,
        patient_ref=patient,
        doctor_id=doctor,
        dept_id="D01",
        start="2026-12-01T08:00:00",
        end="2026-12-01T08:10:00",
        fee=5000,
    )


# -- fixtures: one simulator process per module, reset before each test -------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(SimConfig(seed=7)) as proc:
        yield proc


class Admin:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=5.0)

    def config(self, **fields: Any) -> None:
        resp = self.http.post("/_sim/config", content=json.dumps(fields))
        assert resp.status_code == 200, resp.text

    def appointments(self) -> dict[str, str]:
        data: dict[str, str] = self.http.get("/_sim/appointments").json()
        return data

    def received(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.http.get("/_sim/received").json()
        return data

    def get(self, path: str) -> dict[str, Any]:
        resp = self.http.get(path)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def load(self, schedules: list[HisSchedule]) -> None:
        resp = self.http.post("/_sim/schedules", content=msgspec.json.encode(schedules))
        assert resp.status_code == 200, resp.text


@pytest.fixture
def admin(sim: SimulatorProcess) -> Iterator[Admin]:
    a = Admin(sim.url)
    assert a.http.post("/_sim/reset").status_code == 200
    yield a
    a.http.close()


@pytest.fixture
async def client(sim: SimulatorProcess, admin: Admin) -> AsyncIterator[FhirHisClient]:
    async with FhirHisClient(sim.url, timeout=3.0, max_concurrency=8) as c:
        yield c


# -- book ----------------------------------------------------------------------


async def test_client_satisfies_the_protocol(client: FhirHisClient) -> None:
    assert isinstance(client, HisClient)


async def test_book_creates_one_appointment(client: FhirHisClient, admin: Admin) -> None:
    result = await client.book(booking())
    assert result.outcome == "accepted"
    assert result.his_id
    assert admin.appointments() == {"12.S20261201-D01-AM.57": "booked"}
    assert admin.received() == [
        {
            "method": "POST",
            "path": "/Appointment",
            "booking_id": "12.S20261201-D01-AM.57",
            "status_code": 201,
        }
    ]


async def test_retries_never_create_two(client: FhirHisClient, admin: Admin) -> None:
    admin.config(latency_ms=20)  # let the concurrent copies overlap
    b = booking()
    results = await asyncio.gather(*(client.book(b) for _ in range(6)))
    results.append(await client.book(b))
    assert {r.outcome for r in results} == {"accepted"}
    assert len({r.his_id for r in results}) == 1
    assert admin.appointments() == {b.booking_id: "booked"}
    codes = sorted(r["status_code"] for r in admin.received())
    assert codes == [200] * 6 + [201]


async def test_what_we_send_is_an_r4b_appointment(client: FhirHisClient, admin: Admin) -> None:
    b = booking(3)
    Appointment.model_validate(appointment_resource(b))
    result = await client.book(b)
    assert result.his_id is not None
    stored = admin.get(f"/Appointment/{result.his_id}")
    appt = Appointment.model_validate(stored)
    assert appt.status == "booked"
    assert appt.identifier[0].system == "urn:haoyuan:booking"
    assert appt.identifier[0].value == b.booking_id
    assert appt.slot[0].reference == "Slot/S20261201-D01-AM-0800"
    refs = {p.actor.reference for p in appt.participant}
    # The HIS adds where to go (a Location) and narrows the window by queue number.
    assert {r for r in refs if not r.startswith("Location/")} == {
        f"Patient/{PATIENT}",
        "Practitioner/DR7",
    }
    assert any(r.startswith("Location/") for r in refs)
    queue = [e.valueInteger for e in appt.extension if e.url == "urn:haoyuan:queue-number"]
    assert queue == [3]
    assert appt.serviceType[0].coding[0].code == "D01"
    # A ten-minute slot (naive read as CST): the window the HIS gives is the slot.
    assert appt_sent_start(b) == "2026-12-01T08:00:00+08:00"
    assert appt.start.isoformat() == "2026-12-01T08:00:00+08:00"
    assert (result.start, result.end) == ("2026-12-01T08:00:00+08:00",
                                          "2026-12-01T08:10:00+08:00")
    assert result.place and "诊室" in result.place
    search = admin.get(f"/Appointment?identifier=urn:haoyuan:booking|{b.booking_id}")
    assert Bundle.model_validate(search).total == 1


def appt_sent_start(b: HisBooking) -> str:
    return str(appointment_resource(b)["start"])


@pytest.mark.parametrize(
    ("setting", "b", "reason"),
    [
        ({"reject_doctors": ["DR9"]}, booking(doctor="DR9"), "doctor_stopped"),
        ({"reject_patients": ["nobody"]}, booking(patient="nobody"), "patient_unknown"),
    ],
)
async def test_business_rejection(
    client: FhirHisClient, admin: Admin, setting: dict[str, Any], b: HisBooking, reason: str
) -> None:
    admin.config(**setting)
    assert await client.book(b) == HisResult("rejected", None, reason)
    assert admin.appointments() == {}
    assert [r["status_code"] for r in admin.received()] == [422]


async def test_a_retry_after_the_doctor_stopped_still_finds_the_booking(
    client: FhirHisClient, admin: Admin
) -> None:
    first = await client.book(booking())
    admin.config(reject_doctors=["DR7"])
    assert await client.book(booking()) == first
    assert (await client.book(booking(58))).reason == "doctor_stopped"


@pytest.mark.parametrize(("setting", "status"), [({"error_rate": 1.0}, 500), ({"down": True}, 503)])
async def test_server_errors_are_unavailable_and_commit_nothing(
    client: FhirHisClient, admin: Admin, setting: dict[str, Any], status: int
) -> None:
    admin.config(**setting)
    with pytest.raises(HisUnavailable) as err:
        await client.book(booking())
    assert err.value.status_code == status
    with pytest.raises(HisUnavailable):
        await client.fetch_schedules("2026-12-01", "2026-12-07")
    assert admin.appointments() == {}


async def test_connection_refused_is_unavailable() -> None:
    async with FhirHisClient(f"http://127.0.0.1:{free_port()}", timeout=1.0) as c:
        with pytest.raises(HisUnavailable):
            await c.book(booking())
        with pytest.raises(HisUnavailable):
            await c.cancel("12.S20261201-D01-AM.57", "x")


async def test_timeout_after_commit_is_unknown_then_reconciled(
    sim: SimulatorProcess, admin: Admin
) -> None:
    admin.config(timeout_rate=1.0, hang_s=2.0)
    async with FhirHisClient(sim.url, timeout=0.3) as c:
        assert await c.book(booking()) == HisResult("unknown", None, "timeout")
        # The HIS committed before hanging: lookup (a read, never hung) finds it.
        found = await c.lookup(booking().booking_id)
        assert found.outcome == "accepted"
        assert found.his_id
        assert admin.appointments() == {booking().booking_id: "booked"}
        # Re-sending is safe: the conditional create answers the same resource.
        admin.config(timeout_rate=0.0)
        assert await c.book(booking()) == found


# -- lookup and cancel -----------------------------------------------------------


async def test_lookup(client: FhirHisClient, admin: Admin) -> None:
    assert await client.lookup("12.S20261201-D01-AM.1") == HisResult("rejected", None, "not_found")
    made = await client.book(booking(1))
    assert await client.lookup("12.S20261201-D01-AM.1") == made


async def test_cancel_is_idempotent(client: FhirHisClient, admin: Admin) -> None:
    b = booking()
    made = await client.book(b)
    done = await client.cancel(b.booking_id, "doctor stopped; patient told")
    assert done == HisResult("accepted", made.his_id)
    again = await client.cancel(b.booking_id, "doctor stopped; patient told")
    assert again == HisResult("accepted", made.his_id, "cancelled")
    assert await client.cancel("12.S20261201-D01-AM.999", "x") == HisResult(
        "accepted", None, "not_found"
    )
    assert await client.lookup(b.booking_id) == HisResult("rejected", made.his_id, "cancelled")
    assert admin.appointments() == {b.booking_id: "cancelled"}
    stored = Appointment.model_validate(admin.get(f"/Appointment/{made.his_id}"))
    assert stored.cancelationReason.text == "doctor stopped; patient told"
    assert stored.meta.versionId == "2"
    puts = [r for r in admin.received() if r["method"] == "PUT"]
    assert len(puts) == 1
    # A stale retry of the booking after its cancellation does not revive it.
    assert await client.book(b) == HisResult("rejected", made.his_id, "cancelled")


async def test_cancel_timeout_after_commit_is_unknown(sim: SimulatorProcess, admin: Admin) -> None:
    async with FhirHisClient(sim.url, timeout=0.3) as c:
        await c.book(booking())
        admin.config(timeout_rate=1.0, hang_s=2.0)
        assert (await c.cancel(booking().booking_id, "x")).outcome == "unknown"
        assert admin.appointments() == {booking().booking_id: "cancelled"}


# -- schedules ------------------------------------------------------------------------


def session(sid: str, date: str, period: str = "AM", n_slots: int = 3) -> HisSchedule:
    hour = 8 if period == "AM" else 14
    return HisSchedule(
        session_id=sid,
        hospital_id="H1",
        dept_id="D01",
        doctor_id="DR7",
        date=date,
        period="AM" if period == "AM" else "PM",
        fee=5000,
        slots=tuple(
            HisSlot(
                id=f"{hour:02d}{m * 10:02d}",
                start=f"{date}T{hour:02d}:{m * 10:02d}:00+08:00",
                end=f"{date}T{hour:02d}:{m * 10 + 10:02d}:00+08:00",
                capacity=m + 1,
            )
            for m in range(n_slots)
        ),
    )


async def test_fetch_schedules_round_trips(client: FhirHisClient, admin: Admin) -> None:
    admin.config(page_size=2)  # several pages of Schedules and of Slots
    inside = [
        session("S20261201-D01-AM", "2026-12-01"),
        session("S20261201-D01-PM", "2026-12-01", "PM"),
        session("S20261203_D01_AM", "2026-12-03", n_slots=5),  # '_' is no FHIR id char
        HisSchedule(
            session_id="S20261207-D02-AM",
            hospital_id="H1",
            dept_id="D02",
            doctor_id="DR8",
            date="2026-12-07",
            period="AM",
            fee=0,
            active=False,
        ),
    ]
    outside = [session("S20261130-D01-AM", "2026-11-30"), session("S20261208-D01-AM", "2026-12-08")]
    admin.load(outside + inside)
    got = await client.fetch_schedules("2026-12-01", "2026-12-07")
    assert got == inside
    slot_reads = [r for r in admin.received() if r["path"] == "/Slot"]
    assert len(slot_reads) > 1  # followed the next links


def test_schedule_resources_are_r4b() -> None:
    schedule, slots = schedule_resources(session("S1_X", "2026-12-01"))
    parsed = Schedule.model_validate(schedule)
    assert parsed.id == "S1.uX"
    assert parsed.planningHorizon.start.isoformat() == "2026-12-01T08:00:00+08:00"
    for raw in slots:
        Slot.model_validate(raw)


# -- responses the simulator does not make: a scripted transport ------------------


def scripted(*answers: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handler), seen


def fhir(status: int, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


async def test_conditional_create_header_and_minimal_return() -> None:
    transport, seen = scripted(
        httpx.Response(201, headers={"Location": "http://his/fhir/Appointment/77/_history/1"})
    )
    async with FhirHisClient("http://his/fhir", transport=transport) as c:
        assert await c.book(booking()) == HisResult("accepted", "77")
    assert seen[0].url.path == "/fhir/Appointment"
    assert (
        seen[0].headers["If-None-Exist"] == "identifier=urn:haoyuan:booking|12.S20261201-D01-AM.57"
    )
    assert seen[0].headers["Content-Type"] == "application/fhir+json"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            fhir(409, operation_outcome("slot_taken", "x")),
            HisResult("rejected", None, "slot_taken"),
        ),
        (
            fhir(422, {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "stopped"}]}),
            HisResult("rejected", None, "stopped"),
        ),
        (httpx.Response(400, content=b"<html>"), HisResult("rejected", None, "http_400")),
        (
            fhir(412, operation_outcome("multiple", "x")),
            HisResult("unknown", None, "ambiguous_match"),
        ),
    ],
)
async def test_refusals_and_reasons(answer: httpx.Response, expected: HisResult) -> None:
    transport, _ = scripted(answer)
    async with FhirHisClient("http://his", transport=transport) as c:
        assert await c.book(booking()) == expected


@pytest.mark.parametrize("status", [401, 403, 404, 408, 429, 502, 504])
async def test_non_business_errors_are_unavailable(status: int) -> None:
    transport, _ = scripted(httpx.Response(status))
    async with FhirHisClient("http://his", transport=transport) as c:
        with pytest.raises(HisUnavailable):
            await c.book(booking())


async def test_cancel_rereads_when_the_version_moved() -> None:
    appt = {**appointment_resource(booking()), "id": "a1", "meta": {"versionId": "1"}}
    moved = {**appt, "meta": {"versionId": "2"}, "status": "arrived"}
    transport, seen = scripted(
        fhir(200, bundle(appt)),
        fhir(412, operation_outcome("conflict", "version is 2")),
        fhir(200, bundle(moved)),
        fhir(200, {**moved, "status": "cancelled"}),
    )
    async with FhirHisClient("http://his", transport=transport) as c:
        assert await c.cancel(booking().booking_id, "x") == HisResult("accepted", "a1")
    assert [r.method for r in seen] == ["GET", "PUT", "GET", "PUT"]
    assert seen[1].headers["If-Match"] == 'W/"1"'
    assert seen[3].headers["If-Match"] == 'W/"2"'
    sent = json.loads(seen[3].content)
    assert sent["status"] == "cancelled"
    assert sent["cancelationReason"] == {"text": "x"}


async def test_next_links_must_stay_on_the_his() -> None:
    page = {**bundle(), "link": [{"relation": "next", "url": "http://evil.example/Schedule"}]}
    transport, _ = scripted(fhir(200, page))
    async with FhirHisClient("http://his", transport=transport) as c:
        with pytest.raises(HisProtocolError, match="links away"):
            await c.fetch_schedules("2026-12-01", "2026-12-02")


def test_reason_of_falls_back() -> None:
    assert reason_of(b"", 409) == "http_409"
    assert reason_of(json.dumps(operation_outcome("a", "b")).encode(), 409) == "a"


# -- the simulator app in-process (no socket): admin validation -------------------


async def test_sim_config_rejects_bad_values() -> None:
    app = create_his_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as http:
        assert (await http.post("/_sim/config", content=b'{"error_rate": 2}')).status_code == 400
        assert (await http.post("/_sim/config", content=b'{"nonsense": 1}')).status_code == 400
        ok = await http.post("/_sim/config", content=b'{"error_rate": 0.5}')
        assert ok.json()["error_rate"] == 0.5


# -- circuit breaker and backoff ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_half_opens_after_timeout() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock)
    for _ in range(2):
        assert br.allow()
        br.record_failure()
    br.record_success()  # consecutive failures only
    for _ in range(3):
        assert br.allow()
        br.record_failure()
    assert br.state is BreakerState.OPEN
    assert not br.allow()
    clock.now += 4.9
    assert not br.allow()
    clock.now += 0.1
    assert br.state is BreakerState.HALF_OPEN
    assert br.allow()  # one trial
    assert not br.allow()  # and only one
    br.record_failure()  # the trial failed: open again, for a full timeout
    assert br.state is BreakerState.OPEN
    clock.now += 4.0
    assert not br.allow()
    clock.now += 1.0
    assert br.allow()
    br.record_success()
    assert br.state is BreakerState.CLOSED
    assert br.allow() and br.allow()


def test_breaker_frees_a_trial_that_never_reported() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    br.record_failure()
    clock.now += 1.0
    assert br.allow()
    assert not br.allow()
    clock.now += 1.0
    assert br.allow()


def test_late_failures_do_not_extend_an_open_breaker() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    br.record_failure()
    clock.now += 0.9
    br.record_failure()
    clock.now += 0.1
    assert br.allow()


async def test_client_breaker_stops_calling_a_down_his(sim: SimulatorProcess, admin: Admin) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock)
    admin.config(down=True)
    async with FhirHisClient(sim.url, breaker=breaker) as c:
        for _ in range(5):
            with pytest.raises(HisUnavailable):
                await c.book(booking())
        assert len(admin.received()) == 3  # the last two never left
        admin.config(down=False)
        clock.now += 5.0
        assert (await c.book(booking())).outcome == "accepted"  # the half-open trial
        assert breaker.state is BreakerState.CLOSED
        admin.config(reject_doctors=["DR9"])
        for n in range(5):  # rejections are answers, not failures
            assert (await c.book(booking(100 + n, doctor="DR9"))).outcome == "rejected"
        assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("base", "cap", "factor"), [(0.1, 10.0, 2.0), (0.05, 1.0, 3.0), (1.0, 1.0, 1.0)]
)
def test_backoff_full_jitter_bounds(base: float, cap: float, factor: float) -> None:
    bo = Backoff(base=base, cap=cap, factor=factor, rng=random.Random(1))
    for n in range(30):
        ceiling = min(cap, base * factor**n)
        assert bo.ceiling(n) == ceiling
        draws = [bo.delay(n) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # jitter spans the range
    assert bo.ceiling(10_000) == cap  # no overflow
    with pytest.raises(ValueError):
        bo.delay(-1)


def test_backoff_rejects_nonsense() -> None:
    bad: list[Callable[[], Backoff]] = [
        lambda: Backoff(base=0),
        lambda: Backoff(base=2, cap=1),
        lambda: Backoff(factor=0.5),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()
