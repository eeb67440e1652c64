"""The FHIR scheduling facade (/fhir/r4) through the real app on the private
Redis and a fresh PostgreSQL: Slot search from the live availability,
$find, $hold, $book, cancel by status update, every outcome an
OperationOutcome with its stable code, scopes, patients resolved on the
server, idempotency, and the same rules as /v1. Every resource is validated
with fhir.resources (R4B)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import keys as K
from engine.engine import Engine
from engine.scheduling import ids
from engine.scheduling import resources as R
from tests import fhirkit as fk
from tests.apikit import api, bind, flushed_app, import_sessions, login, national_id, pay
from tests.enginekit import make_spec, new_database, now_ms

pytestmark = pytest.mark.timeout(120)
Client = AsyncTestClient[Litestar]
_n = itertools.count(700_000)
_s = itertools.count(1)


def nid() -> str:
    return national_id(next(_n))


def sid(prefix: str = "FS") -> str:
    return f"{prefix}{next(_s)}"


@pytest.fixture(scope="module")
async def db(pg_dsn: str) -> AsyncIterator[str]:
    async with new_database(pg_dsn) as dsn:
        yield dsn


@pytest.fixture(scope="module")
async def app(redis_url: str, db: str) -> Litestar:
    # No shedding on a late event loop here (parallel tests share 2 cores);
    # the facade sheds like /v1 (api.fhir.common.live, the decisions).
    return await flushed_app(redis_url, db, patient_rules=True, max_loop_lag_ms=0)


@pytest.fixture(scope="module")
async def client(app: Litestar) -> AsyncIterator[Client]:
    async with AsyncTestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
async def eng(redis_url: str) -> AsyncIterator[Engine]:
    """An engine of the test's own (the app's lives on the test client's loop)."""
    async with Engine.connect(redis_url) as e:
        yield e


@pytest.fixture(scope="module")
async def auth(client: Client, db: str) -> dict[str, str]:
    return await fk.add_client(db, "backend-trusted")


def dept() -> str:
    return f"FD{next(_s)}"


# ------------------------------------------------------------------ search


async def test_capability_statement_is_public_and_valid(client: Client) -> None:
    body = fk.fhir_json(await client.get("/fhir/r4/metadata"), 200)
    ops = {o["name"] for o in body["rest"][0]["resource"][1]["operation"]}
    assert ops == {"find", "hold", "book"}


async def test_slot_search_answers_free_busy_and_not_open_from_the_live_engine(
        client: Client, auth: dict[str, str]) -> None:
    d = dept()
    open_s, later = sid(), sid()
    await import_sessions(client, [
        make_spec(open_s, dept=d, date="2026-12-10", caps=(1, 2)),
        make_spec(later, dept=d, date="2026-12-10", caps=(2,), release_at_ms=now_ms() + 3_600_000),
    ])
    # Sell out slot 0800 of the open session through /v1.
    h = await login(client, "fs-" + open_s)
    pid = await bind(client, h, next(_n))
    held = (await client.post("/v1/holds", headers=h, json={
        "session_id": open_s, "slot_id": "0800", "patient_id": pid})).json()
    assert (await pay(client, held["hold_id"], 5000)).status_code == 200
    q = f"/fhir/r4/Slot?service-type={d}&start=ge2026-12-10&start=lt2026-12-11"
    body = fk.fhir_json(await client.get(q, headers=auth), 200)
    assert body["type"] == "searchset" and body["total"] == 3
    by_id = {e["resource"]["id"]: e["resource"] for e in body["entry"]}
    sold = by_id[ids.slot_id(open_s, "0800")]
    assert sold["status"] == "busy" and fk.ext(sold, R.EXT_AVAILABILITY) == "sold-out"
    free = by_id[ids.slot_id(open_s, "0830")]
    assert free["status"] == "free" and fk.ext(free, R.EXT_FREE_UNITS) == 2
    assert fk.ext(free, R.EXT_SLOT_CAPACITY) == 2
    assert fk.ext(free, R.EXT_BOOKING_LINK).endswith("/fhir/r4/Slot/" + free["id"])
    assert free["start"] == "2026-12-10T08:30:00+08:00"
    assert free["schedule"]["reference"] == f"Schedule/{ids.enc(open_s)}"
    closed = by_id[ids.slot_id(later, "0800")]
    assert closed["status"] == "busy-unavailable"
    assert fk.ext(closed, R.EXT_AVAILABILITY) == "not-open"
    assert fk.ext(closed, R.EXT_RELEASE_AT).endswith("Z")
    # status filter, then paging with _count and the next link
    body = fk.fhir_json(await client.get(q + "&status=free", headers=auth), 200)
    assert [e["resource"]["id"] for e in body["entry"]] == [free["id"]]
    page = fk.fhir_json(await client.get(q + "&_count=2", headers=auth), 200)
    assert len(page["entry"]) == 2 and page["total"] == 3
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    page2 = fk.fhir_json(await client.get(nxt.split("8000", 1)[1], headers=auth), 200)
    assert len(page2["entry"]) == 1
    assert {e["resource"]["id"] for e in page["entry"] + page2["entry"]} == set(by_id)
    # by schedule, practitioner and location; one slot read
    body = fk.fhir_json(await client.get(
        f"/fhir/r4/Slot?schedule=Schedule/{ids.enc(later)}&start=ge2026-12-10"
        f"&practitioner=Practitioner/DR1&location=Location/H1", headers=auth), 200)
    assert body["total"] == 1
    body = fk.fhir_json(await client.get(q + "&schedule.actor=Location/H1", headers=auth), 200)
    assert body["total"] == 3
    body = fk.fhir_json(await client.get(q + "&practitioner=Location/H1", headers=auth), 200)
    assert body["total"] == 0 and "entry" not in body
    one = fk.fhir_json(await client.get(f"/fhir/r4/Slot/{free['id']}", headers=auth), 200)
    assert one["id"] == free["id"] and one["status"] == "free"
    fk.outcome(await client.get("/fhir/r4/Slot/nope.x", headers=auth), 404, "not-found",
               "not-found")
    fk.outcome(await client.get("/fhir/r4/Slot?start=ge2026-01-01&start=lt2026-06-01",
                                headers=auth), 422, "too-costly", "too-costly")
    fk.outcome(await client.get("/fhir/r4/Slot?status=sold", headers=auth), 422,
               "invalid-input", "invalid")


# ------------------------------------------------------------------ the booking flow


async def test_find_hold_book_and_cancel(client: Client, auth: dict[str, str],
                                         eng: Engine) -> None:
    d, s = dept(), sid()
    await import_sessions(client, [make_spec(s, dept=d, date="2026-12-11", caps=(2, 1))])
    found = fk.fhir_json(await client.get(
        f"/fhir/r4/Appointment/$find?start=2026-12-11&end=2026-12-11&specialty={d}",
        headers=auth), 200)
    proposed = [e["resource"] for e in found["entry"]]
    assert [p["status"] for p in proposed] == ["proposed", "proposed"]
    assert fk.ext(proposed[0], R.EXT_FREE_UNITS) == 2
    # POST $find with Parameters says the same
    post = fk.fhir_json(await client.post("/fhir/r4/Appointment/$find", headers=fk.headers(auth),
                                          content=msgspec.json.encode(fk.validate({
        "resourceType": "Parameters", "parameter": [
            {"name": "start", "valueDateTime": "2026-12-11T00:00:00+08:00"},
            {"name": "end", "valueDateTime": "2026-12-11T23:59:00+08:00"},
            {"name": "specialty", "valueString": f"urn:haoyuan:dept|{d}"}]}))), 200)
    assert [e["resource"]["id"] for e in post["entry"]] == [p["id"] for p in proposed]
    # $hold the first proposal for a patient
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "appt-id", "valueUri": f"Appointment/{proposed[0]['id']}"},
        {"name": "patient-resource", "resource": fk.patient(nid())}]}
    r = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth),
                          content=msgspec.json.encode(body))
    held = fk.appointment_of(fk.fhir_json(r, 200))
    assert held["status"] == "pending" and "GMT" in r.headers["expires"]
    assert fk.ext(held, R.EXT_HOLD_EXPIRES) and fk.ext(held, "urn:haoyuan:queue-number") == 1
    assert r.headers["location"].endswith("/Appointment/" + held["id"])
    got = fk.fhir_json(await client.get(f"/fhir/r4/Appointment/{held['id']}", headers=auth), 200)
    assert got["status"] == "pending"
    # $book with the payment reference (and the amount in CNY)
    r = await client.post("/fhir/r4/Appointment/$book", headers=fk.headers(auth),
                          content=msgspec.json.encode(fk.book_body(held["id"], "fp-1", 50.0)))
    booked = fk.appointment_of(fk.fhir_json(r, 201))
    assert booked["status"] == "booked" and booked["id"] == held["id"]
    again = await client.post(f"/fhir/r4/Appointment/{held['id']}/$book",
                              headers=fk.headers(auth),
                              content=msgspec.json.encode(fk.book_body(held["id"], "fp-1")))
    assert fk.fhir_json(again, 200) and again.headers["idempotent-replayed"] == "true"
    # cancel with a JSON Patch of the status
    r = await client.patch(f"/fhir/r4/Appointment/{held['id']}", headers={
        **auth, "Content-Type": "application/json-patch+json"},
        content=b'[{"op": "replace", "path": "/status", "value": "cancelled"}]')
    assert fk.fhir_json(r, 200)["status"] == "cancelled"
    rec = await eng.record(ids.parse_appointment_id(held["id"]) or "")
    assert rec is not None and rec.state.label == "cancelled" and rec.reason == "patient"
    # a hold released by PUT with status cancelled; the unit is free again
    r = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth),
                          content=msgspec.json.encode(fk.hold_body(s, "0830", nid())))
    h2 = fk.appointment_of(fk.fhir_json(r, 200))
    put = {**h2, "status": "cancelled"}
    fk.validate(put)
    r = await client.put(f"/fhir/r4/Appointment/{h2['id']}", headers=fk.headers(auth),
                         content=msgspec.json.encode(put))
    assert fk.fhir_json(r, 200)["status"] == "cancelled"
    avail = await eng.availability(s)
    assert avail is not None and {x.slot_id: x.free for x in avail.slots} == {"0800": 2,
                                                                              "0830": 1}


# ------------------------------------------------------------------ outcomes


async def test_every_refusal_is_an_operation_outcome_with_a_stable_code(
        client: Client, auth: dict[str, str], db: str, eng: Engine) -> None:
    d, s, later = dept(), sid(), sid()
    await import_sessions(client, [
        make_spec(s, dept=d, date="2026-12-12", caps=(1, 1), hold_ttl_ms=1000),
        make_spec(later, dept=dept(), date="2026-12-12", caps=(1,),
                  release_at_ms=now_ms() + 3_600_000)])

    async def hold(session: str, slot: str, who: str, hdrs: dict[str, str] = auth) -> Any:
        return await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(hdrs),
                                 content=msgspec.json.encode(fk.hold_body(session, slot, who)))

    a, b = nid(), nid()
    first = fk.appointment_of(fk.fhir_json(await hold(s, "0800", a), 200))
    fk.outcome(await hold(s, "0800", b), 409, "sold-out", "business-rule")
    # duplicate: the same patient, another slot of the department-day
    fk.outcome(await hold(s, "0830", a), 409, "duplicate", "duplicate")
    # not open: with the release instant as the extension
    body = fk.outcome(await hold(later, "0800", b), 409, "not-open", "business-rule")
    assert body["issue"][0]["extension"][0]["url"] == R.EXT_RELEASE_AT
    # expired: the hold lapsed and another patient took the unit; the payment is refunded
    await asyncio.sleep(1.2)
    fk.fhir_json(await hold(s, "0800", b), 200)
    r = await client.post("/fhir/r4/Appointment/$book", headers=fk.headers(auth),
                          content=msgspec.json.encode(fk.book_body(first["id"], "fx-1")))
    body = fk.outcome(r, 409, "expired", "business-rule")
    assert "refund_due=True" in body["issue"][0]["diagnostics"]
    # rate limited: the client's own quota (Retry-After)
    tight = await fk.add_client(db, "backend-tight", rate_per_s=0.01, burst=1)
    fk.fhir_json(await hold(s, "0830", nid(), tight), 200)
    r = await hold(s, "0830", nid(), tight)
    fk.outcome(r, 429, "rate-limited", "throttled")
    assert int(r.headers["retry-after"]) >= 1
    # recovering: the partition lost its marker (a rebuild will reopen it)
    p = K.partition_of(d, "2026-12-12")
    epoch = await eng.partition_epoch(p)
    await eng.close_partition(p)
    try:
        r = await hold(s, "0830", nid())
        fk.outcome(r, 503, "recovering", "transient")
        assert r.headers["retry-after"]
    finally:
        await eng.open_partition(p, epoch or "e")
    # input errors
    r = await client.post("/fhir/r4/Appointment/$hold", headers={**auth, "Content-Type":
                                                                  "text/plain"}, content=b"{}")
    fk.outcome(r, 415, "unsupported-media-type", "not-supported")
    r = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth),
                          content=b'{"resourceType": "Parameters", "parameter": [}')
    fk.outcome(r, 422, "invalid-input", "invalid")
    r = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth),
                          content=b'{"resourceType": "Parameters", "resourceType": "Parameters"}')
    fk.outcome(r, 422, "invalid-input")
    fk.outcome(await client.get("/fhir/r4/NoSuchThing", headers=auth), 404, "not-found")
    fk.outcome(await client.delete("/fhir/r4/Slot", headers=auth), 405, "method-not-allowed")
    # /v1 keeps RFC 9457
    r = await client.get("/v1/no-such-thing")
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_patients_are_resolved_on_the_server(client: Client, db: str,
                                                   auth: dict[str, str], eng: Engine) -> None:
    s = sid()
    await import_sessions(client, [make_spec(s, dept=dept(), date="2026-12-13", caps=(9,))])
    verify = await fk.add_client(db, "backend-verify", identity="verify")

    async def hold(body: dict[str, Any], hdrs: dict[str, str]) -> Any:
        return await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(hdrs),
                                 content=msgspec.json.encode(body))

    # a client's hash is never trusted
    body = fk.hold_body(s, "0800", nid())
    pat = body["parameter"][0]["resource"]["contained"][0]
    pat["identifier"] = [{"system": R.SYS_PATIENT_REF, "value": "a" * 64}]
    fk.outcome(await hold(body, auth), 422, "patient-unresolved", "value")
    pat["identifier"] = [{"system": R.SYS_NATIONAL_ID, "value": "110101199003071231"}]
    fk.outcome(await hold(body, auth), 422, "invalid-national-id", "value")
    # a trusted client names the patient by identifier alone
    logical = {"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": {
        "resourceType": "Appointment", "status": "proposed",
        "slot": [{"reference": f"Slot/{ids.slot_id(s, '0800')}"}],
        "participant": [{"actor": {"type": "Patient", "identifier": {
            "system": R.SYS_NATIONAL_ID, "value": nid()}}, "status": "accepted"}]}}]}
    fk.fhir_json(await hold(logical, auth), 200)
    # a verifying client needs name and phone, and the authority's verdict
    fk.outcome(await hold(logical, verify), 422, "patient-unresolved")
    person = nid()
    api(client.app).realname.register(person, "李四", "13900000000")  # type: ignore[attr-defined]
    fk.outcome(await hold(fk.hold_body(s, "0800", person, name="王五"), verify), 403,
               "patient-unverified", "forbidden")
    ok = fk.appointment_of(fk.fhir_json(await hold(fk.hold_body(
        s, "0800", person, name="李四", phone="13900000000"), verify), 200))
    assert ok["status"] == "pending"
    # the ref the engine holds is the server's keyed hash of the ID
    rec = await eng.record(ids.parse_appointment_id(ok["id"]) or "")
    assert rec is not None and rec.patient == api(client.app).crypto.id_hash(person)
    # another client cannot see or touch it
    fk.outcome(await client.get(f"/fhir/r4/Appointment/{ok['id']}", headers=auth), 404,
               "not-found")


async def test_scopes_tokens_and_a_disabled_client(client: Client, db: str) -> None:
    r = await client.get("/fhir/r4/Slot")
    fk.outcome(r, 401, "unauthorized", "login")
    assert r.headers["www-authenticate"].startswith("Bearer")
    fk.outcome(await client.get("/fhir/r4/Slot", headers={"Authorization": "Bearer hyf_x"}),
               401, "unauthorized")
    reader = await fk.add_client(db, "backend-reader", ("system/*.read",))
    fk.fhir_json(await client.get("/fhir/r4/Slot", headers=reader), 200)
    r = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(reader),
                          content=msgspec.json.encode(fk.hold_body("X", "0800", nid())))
    fk.outcome(r, 403, "scope-required", "forbidden")
    v2 = await fk.add_client(db, "backend-v2", ("system/Slot.rs", "system/Appointment.cruds"))
    fk.fhir_json(await client.get("/fhir/r4/Slot", headers=v2), 200)
    from engine.store import fhir_clients

    conn_pool = await asyncpg.connect(db)
    assert await fhir_clients.disable_client(conn_pool, "backend-reader", "test")
    await asyncio.sleep(api(client.app).settings.fhir_client_cache_s + 0.1)
    fk.outcome(await client.get("/fhir/r4/Slot", headers=reader), 401, "unauthorized")
    # only hashes are stored
    secret = reader["Authorization"].rsplit("_", 1)[1]
    rows = await conn_pool.fetch("SELECT secret_hash FROM fhir_clients")
    assert all(secret not in r["secret_hash"] for r in rows)
    await conn_pool.close()


async def test_holds_are_idempotent_and_a_payment_reference_books_one_hold_ever(
        client: Client, auth: dict[str, str]) -> None:
    s = sid()
    await import_sessions(client, [make_spec(s, dept=dept(), date="2026-12-14", caps=(5,))])
    key = {"If-None-Exist": "identifier=https://backend.example/req|r-1"}
    a = nid()
    bodies = msgspec.json.encode(fk.hold_body(s, "0800", a))
    r1 = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth, **key),
                           content=bodies)
    r2 = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth, **key),
                           content=bodies)
    h1, h2 = (fk.appointment_of(fk.fhir_json(r, 200)) for r in (r1, r2))
    assert h1["id"] == h2["id"] and r2.headers["idempotent-replayed"] == "true"
    # the Appointment's own identifier is a request identifier too
    body = fk.hold_body(s, "0800", nid())
    body["parameter"][0]["resource"]["identifier"] = [{"system": "urn:x", "value": "q-1"}]
    r3, r4 = [await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth),
                                content=msgspec.json.encode(body)) for _ in range(2)]
    h3, h4 = (fk.appointment_of(fk.fhir_json(r, 200)) for r in (r3, r4))
    assert h3["id"] == h4["id"] != h1["id"]
    # a reference pays for one hold, ever: /v1 and the facade share the claim
    r = await client.post("/fhir/r4/Appointment/$book", headers=fk.headers(auth),
                          content=msgspec.json.encode(fk.book_body(h1["id"], "shared-ref")))
    fk.fhir_json(r, 201)
    r = await client.post("/fhir/r4/Appointment/$book", headers=fk.headers(auth),
                          content=msgspec.json.encode(fk.book_body(h3["id"], "shared-ref")))
    fk.outcome(r, 409, "payment-reused", "duplicate")
    hv = await login(client, "fi-" + s)
    pid = await bind(client, hv, next(_n))
    v1 = (await client.post("/v1/holds", headers=hv, json={
        "session_id": s, "slot_id": "0800", "patient_id": pid})).json()
    r = await pay(client, v1["hold_id"], 5000, ref="shared-ref")
    assert r.status_code == 409 and r.json()["type"] == "/problems/payment-reused"
    fk.outcome(await client.post("/fhir/r4/Appointment/$book", headers=fk.headers(auth),
                                 content=msgspec.json.encode(fk.book_body(h3["id"], "x", 1.0))),
               422, "amount-mismatch", "business-rule")


async def test_the_same_rules_as_v1_apply_to_one_patient_through_both(
        client: Client, auth: dict[str, str]) -> None:
    d, s = dept(), sid()
    await import_sessions(client, [make_spec(s, dept=d, date="2026-12-15", caps=(5, 5))])
    i = next(_n)
    hv = await login(client, "fr-" + s)
    pid = await bind(client, hv, i)
    r = await client.post("/v1/holds", headers=hv, json={
        "session_id": s, "slot_id": "0800", "patient_id": pid})
    assert r.status_code == 201, r.text
    # the same person through the facade, the same department-day: one per patient
    r = await client.post("/fhir/r4/Appointment/$hold", headers=fk.headers(auth),
                          content=msgspec.json.encode(fk.hold_body(s, "0830", national_id(i))))
    fk.outcome(r, 409, "duplicate", "duplicate")
