"""07:00, fair and graceful (issue 15): a request that arrived before the
release instant is "not open" however late it is decided; a request that
waited too long is answered at once, never decided late; and the waiting
room orders who may ask when more press than the engine can serve (order,
admission, expiry, forgery, abandoned tickets).

The slow moments are real: a Lua script that busy-waits on the server blocks
this test's Redis, as a spike does, so the API's requests queue behind it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from engine import Engine, Held, Reason, Refused
from tests.apikit import (
    api,
    bind,
    flushed_app,
    granian,
    import_sessions,
    login,
    next_id,
    server_env,
    uid,
)
from tests.enginekit import make_spec, now_ms

Client = AsyncTestClient[Litestar]

#: Blocks the Redis server until the given instant (ms): what a spike's
#: queue in front of Redis does to every request behind it.
_BLOCK = """
local stop_at = tonumber(ARGV[1])
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= stop_at then break end
end
return 1
"""


async def block_redis(redis_url: str, until_ms: int) -> None:
    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.eval(_BLOCK, 0, until_ms)
    finally:
        await r.aclose()


async def redis_ms(redis_url: str) -> int:
    r = aioredis.Redis.from_url(redis_url)
    try:
        s, us = await r.time()
        return int(s) * 1000 + int(us) // 1000
    finally:
        await r.aclose()


async def wait_until(redis_url: str, at_ms: int) -> None:
    await asyncio.sleep(max(0, at_ms - await redis_ms(redis_url)) / 1000)


async def accounts(client: httpx.AsyncClient, n: int) -> list[tuple[dict[str, str], str]]:
    out = []
    for _ in range(n):
        h = await login(client, uid("fair"))
        out.append((h, await bind(client, h, next_id())))
    return out


async def hold(client: httpx.AsyncClient, who: tuple[dict[str, str], str], sid: str,
               ticket: str | None = None) -> httpx.Response:
    h = dict(who[0])
    if ticket is not None:
        h["X-Waiting-Ticket"] = ticket
    return await client.post("/v1/holds", headers=h,
                             json={"session_id": sid, "slot_id": "0800", "patient_id": who[1]})


def kind(r: httpx.Response) -> str:
    if r.status_code == 201:
        return "held"
    body: dict[str, Any] = r.json()
    return str(body["type"]).rsplit("/", 1)[-1]


# ------------------------------------------------------------------ the engine


async def test_an_early_arrival_is_not_open_however_late_it_is_decided(
        engine_on_fresh_redis: Engine) -> None:
    eng = engine_on_fresh_redis
    release = now_ms() + 300
    await eng.load_session(make_spec("S1", caps=(5,), release_at_ms=release))
    await asyncio.sleep(0.45)  # decided after the release instant ...
    early = await eng.hold("S1", "0800", patient="p1", account="a1", arrived_ms=release - 5)
    assert isinstance(early, Refused) and early.reason is Reason.NOT_OPEN  # ... pressed before it
    assert early.release_at_ms == release
    # The same patient, pressing again after the release, gets a unit (the
    # early refusal is never remembered under a key).
    again = await eng.hold("S1", "0800", patient="p1", account="a1", arrived_ms=release + 1)
    assert isinstance(again, Held)
    # An arrival later than the server's now (a worker clock ahead) counts as now.
    later = await eng.hold("S1", "0800", patient="p2", account="a2",
                           arrived_ms=now_ms() + 3_600_000)
    assert isinstance(later, Held)
    # Without an arrival, as before: now decides.
    assert isinstance(await eng.hold("S1", "0800", patient="p3", account="a3"), Held)


async def test_the_arrival_is_checked_before_anything_is_written(
        engine_on_fresh_redis: Engine) -> None:
    eng = engine_on_fresh_redis
    await eng.load_session(make_spec("S1", caps=(1,)))
    from engine.scripts import ScriptError

    with pytest.raises(ScriptError):
        await eng.hold("S1", "0800", patient="p1", account="a1", arrived_ms=-5)
    assert (await eng.availability("S1")) is not None
    assert isinstance(await eng.hold("S1", "0800", patient="p1", account="a1"), Held)


# ------------------------------------------------------------------ over HTTP


@contextlib.asynccontextmanager
async def served(redis_url: str, db: str, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API as it runs (granian, one worker) and a client of it."""
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()
    await r.aclose()
    with granian(server_env(redis_url, db, **env), workers=1) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            yield client


async def behind_a_busy_redis(client: httpx.AsyncClient, redis_url: str, n: int) -> tuple[
        list[tuple[dict[str, str], str]], str, list[httpx.Response], float]:
    """``n`` accounts press at once on a 40-unit session while Redis is
    blocked for 0.8 s: (the accounts, the session, the answers, seconds taken)."""
    crowd = await accounts(client, n)
    sid = uid("S")
    await import_sessions(client, [make_spec(sid, dept=uid("D"), caps=(40,))])
    blocker = asyncio.create_task(block_redis(redis_url, await redis_ms(redis_url) + 800))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    got = await asyncio.gather(*(hold(client, who, sid) for who in crowd))
    took = time.monotonic() - t0
    await blocker
    return crowd, sid, list(got), took


@pytest.mark.slow  # a granian process
@pytest.mark.timeout(120)
async def test_pressing_before_the_release_wins_nothing_even_when_decided_after_it(
        redis_url: str, db: str) -> None:
    """Holds sent 200 ms before the release instant queue behind a busy
    Redis and are decided 300 ms after it: every one is "not open" (before,
    they took the units); holds sent after the release take them."""
    async with served(redis_url, db, HAOYUAN_MAX_REQUEST_AGE_MS="60000",
                      HAOYUAN_WAITING_ROOM_RATE="0") as client:
        crowd = await accounts(client, 12)
        release = await redis_ms(redis_url) + 1500
        sid = uid("S")
        await import_sessions(client, [make_spec(sid, dept=uid("D"), caps=(6,),
                                                 release_at_ms=release)])
        await wait_until(redis_url, release - 250)
        blocker = asyncio.create_task(block_redis(redis_url, release + 300))
        await asyncio.sleep(0.05)
        got = await asyncio.gather(*(hold(client, who, sid) for who in crowd[:6]))
        await blocker
        assert await redis_ms(redis_url) >= release + 300
        assert [kind(r) for r in got] == ["not-open"] * 6, [r.text for r in got]
        late = await asyncio.gather(*(hold(client, who, sid) for who in crowd[6:]))
        assert [kind(r) for r in late] == ["held"] * 6
        # the early ones pressing again after the release find it sold out
        assert {kind(await hold(client, who, sid)) for who in crowd[:6]} == {"sold-out"}


@pytest.mark.slow  # a granian process
@pytest.mark.timeout(120)
async def test_a_request_that_waited_too_long_is_answered_at_once_never_decided_late(
        redis_url: str, db: str) -> None:
    """A slowed worker (its Redis blocked for 0.8 s): the holds that waited
    longer than max_request_age_ms are answered 429 at once when it comes
    back, none is decided late, nothing is taken; within the bound the same
    holds are decided."""
    async with served(redis_url, db, HAOYUAN_MAX_REQUEST_AGE_MS="300",
                      HAOYUAN_WAITING_ROOM_RATE="0") as client:
        crowd, sid, got, took = await behind_a_busy_redis(client, redis_url, 20)
        assert {kind(r) for r in got} == {"overloaded"}, [r.text for r in got]
        assert all(r.headers.get("retry-after") for r in got)
        assert took < 2.0  # answered when the worker came back, not later
        avail = await client.get(f"/v1/sessions/{sid}/availability")
        assert avail.json()["sessions"][0]["slots"][0]["free"] == 40  # nothing taken
        fine = await asyncio.gather(*(hold(client, who, sid) for who in crowd[:5]))
        assert {kind(r) for r in fine} == {"held"}


# ------------------------------------------------------------------ the waiting room


@pytest.mark.slow  # a granian process
@pytest.mark.timeout(120)
async def test_shed_holds_get_tickets_in_order_and_come_back_admitted(
        redis_url: str, db: str) -> None:
    """The same slowed worker with the waiting room on: every hold that
    waited too long gets a ticket (distinct places, in order, a wait that
    grows with the place) instead of a decision; coming back with it when
    told, each is admitted and decided."""
    async with served(redis_url, db, HAOYUAN_MAX_REQUEST_AGE_MS="300",
                      HAOYUAN_WAITING_ROOM_RATE="20", HAOYUAN_WAITING_ROOM_WINDOW_S="5",
                      HAOYUAN_WAITING_ROOM_REFRESH_MS="50") as client:
        crowd, sid, got, _ = await behind_a_busy_redis(client, redis_url, 10)
        assert {kind(r) for r in got} == {"waiting-room"}, [r.text for r in got]
        bodies = [r.json() for r in got]
        assert sorted(b["position"] for b in bodies) == list(range(1, 11))
        by_pos = sorted(bodies, key=lambda b: b["position"])
        waits = [b["retry_after_ms"] for b in by_pos]
        assert waits == sorted(waits) and waits[-1] > waits[0]
        assert all(int(r.headers["retry-after"]) >= 1 for r in got)
        await asyncio.sleep(max(waits) / 1000 + 0.2)
        back = await asyncio.gather(*(hold(client, who, sid, ticket=b["ticket"])
                                      for who, b in zip(crowd, bodies, strict=True)))
        assert {kind(r) for r in back} == {"held"}, [r.text for r in back]


@pytest.fixture
async def room_app(fresh_redis: Any, redis_url: str, db: str) -> Litestar:
    # The line is served 10 positions a second; an admitted ticket is honoured 1 s.
    return await flushed_app(redis_url, db, waiting_room_rate=10, waiting_room_window_s=1.0,
                             waiting_room_refresh_ms=50)


async def form_line(client: Client, app: Litestar) -> None:
    """Someone was shed a moment ago: a line has formed (taken in the app's
    own event loop, as a shed request would)."""
    with client.portal() as portal:
        portal.call(api(app).waiting.take, uid("shed"))


async def test_the_waiting_room_orders_admits_and_expires(room_app: Litestar) -> None:
    async with AsyncTestClient(room_app) as client:
        crowd = await accounts(client, 6)
        sid = uid("S")
        await import_sessions(client, [make_spec(sid, dept=uid("D"), caps=(20,))])
        await form_line(client, room_app)
        first = []
        for who in crowd:  # one after another: behind the line, in order of arrival
            r = await hold(client, who, sid)
            assert kind(r) == "waiting-room", r.text
            first.append(r.json())
        positions = [b["position"] for b in first]
        assert positions == sorted(positions) and len(set(positions)) == 6
        assert all(int(b["retry_after_ms"]) >= 100 for b in first)
        assert [b["ahead"] for b in first] == sorted(b["ahead"] for b in first)
        # Asking again without the ticket: the same place (one per account).
        again = (await hold(client, crowd[5], sid)).json()
        assert again["position"] == positions[5]
        # Coming back too early with the ticket: still waiting, same place.
        early = await hold(client, crowd[5], sid, ticket=first[5]["ticket"])
        assert kind(early) == "waiting-room" and early.json()["position"] == positions[5]
        # Coming back when told: admitted, the hold is decided.
        await asyncio.sleep(first[5]["retry_after_ms"] / 1000 + 0.15)
        for who, b in zip(crowd, first, strict=True):
            r = await hold(client, who, sid, ticket=b["ticket"])
            assert r.status_code == 201, r.text
        # An admitted ticket past its window, while a line has formed again:
        # to the back of that line.
        await asyncio.sleep(2.0)
        await form_line(client, room_app)
        late = await hold(client, crowd[0], sid, ticket=first[0]["ticket"])
        assert kind(late) == "waiting-room" and late.json()["position"] > positions[-1] + 1
        # With no line, holds are decided directly (the room costs nothing).
        await asyncio.sleep(0.6)
        (extra,) = await accounts(client, 1)
        assert (await hold(client, extra, sid)).status_code == 201


async def test_a_forged_or_borrowed_ticket_is_refused(room_app: Litestar) -> None:
    async with AsyncTestClient(room_app) as client:
        (a, b) = await accounts(client, 2)
        sid = uid("S")
        await import_sessions(client, [make_spec(sid, dept=uid("D"), caps=(5,))])
        await form_line(client, room_app)
        ta = (await hold(client, a, sid)).json()
        await form_line(client, room_app)  # the line goes on behind A
        # B comes with A's ticket: not B's; B queues anew, behind.
        borrowed = await hold(client, b, sid, ticket=ta["ticket"])
        assert kind(borrowed) == "waiting-room"
        assert borrowed.json()["position"] > ta["position"]
        # A tampered place (an earlier one) or time does not verify either.
        _, pos, due, sig = ta["ticket"].split(".")
        for forged in (f"wr1.1.{due}.{sig}", f"wr1.{pos}.{int(due) - 5000}.{sig}",
                       f"wr1.{pos}.{due}.{sig[:-2]}AA", "wr1.x.y.z", "nonsense"):
            r = await hold(client, a, sid, ticket=forged)
            assert kind(r) == "waiting-room" and r.json()["ticket"] == ta["ticket"], forged
        assert api(room_app).waiting.refused >= 6
        # A's own ticket admits A when its turn comes.
        await asyncio.sleep(ta["retry_after_ms"] / 1000 + 0.15)
        assert (await hold(client, a, sid, ticket=ta["ticket"])).status_code == 201


async def test_abandoned_tickets_do_not_jam_the_line(room_app: Litestar) -> None:
    async with AsyncTestClient(room_app) as client:
        crowd = await accounts(client, 8)
        sid = uid("S")
        await import_sessions(client, [make_spec(sid, dept=uid("D"), caps=(5,))])
        await form_line(client, room_app)
        for who in crowd[:7]:  # seven take a place and never come back
            assert kind(await hold(client, who, sid)) == "waiting-room"
        await asyncio.sleep(0.9)  # 10 a second: their turns pass
        await form_line(client, room_app)
        t = (await hold(client, crowd[7], sid)).json()
        assert t["ahead"] <= 2, t
        await asyncio.sleep(t["retry_after_ms"] / 1000 + 0.15)
        assert (await hold(client, crowd[7], sid, ticket=t["ticket"])).status_code == 201


def test_edge_arrival_stamps_in_every_format() -> None:
    from api.fastpath import edge_arrival_ms

    assert edge_arrival_ms(b"t=1796688000.123") == pytest.approx(1796688000123.0)
    assert edge_arrival_ms(b"1796688000.5") == pytest.approx(1796688000500.0)
    assert edge_arrival_ms(b"1796688000123") == 1796688000123.0
    assert edge_arrival_ms(b"1796688000123456") == pytest.approx(1796688000123.456)
    assert edge_arrival_ms(b"1796688000") == 1796688000000.0
    for bad in (b"", b"t=", b"soon", b"1.2.3", b"-5", b"1e9", b"9" * 25, "²".encode()):
        assert edge_arrival_ms(bad) is None, bad


async def test_an_edge_stamp_before_the_release_is_not_open_and_a_later_one_is_ignored(
        room_app: Litestar, redis_url: str) -> None:
    """The edge proxy's X-Request-Start says when the request came in: one
    stamped before the release instant is not open though it reaches the
    worker after it; one claiming a later arrival than the worker saw counts
    as the worker's own stamp (a client cannot make its request younger)."""
    async with AsyncTestClient(room_app) as client:
        crowd = await accounts(client, 2)
        release = await redis_ms(redis_url) + 600
        sid = uid("S")
        await import_sessions(client, [make_spec(sid, dept=uid("D"), caps=(3,),
                                                 release_at_ms=release)])
        await wait_until(redis_url, release + 50)
        early = dict(crowd[0][0], **{"X-Request-Start": f"t={(release - 20) / 1000:.3f}"})
        r = await client.post("/v1/holds", headers=early, json={
            "session_id": sid, "slot_id": "0800", "patient_id": crowd[0][1]})
        assert kind(r) == "not-open", r.text
        later = dict(crowd[1][0], **{"X-Request-Start": str(release + 3_600_000)})
        r = await client.post("/v1/holds", headers=later, json={
            "session_id": sid, "slot_id": "0800", "patient_id": crowd[1][1]})
        assert r.status_code == 201, r.text
