"""The HIS forwarder: PostgreSQL bookings -> the hospital information system.

At least once, idempotent on our booking id (the HIS client sends a FHIR
conditional create). The work queue is the ``bookings`` table itself:

- ``his_status`` says what the HIS must still hear: ``pending`` (book it),
  ``unknown`` (an earlier call timed out: look it up first), ``cancel_pending``
  (cancel it);
- ``his_updated_at`` is "next attempt not before": a row is due when it is
  NULL or in the past.

Each step claims a batch of due rows with ``FOR UPDATE SKIP LOCKED`` and
pushes their ``his_updated_at`` forward by a lease, so several forwarders can
run and a crashed one's rows come back when the lease runs out. Every result
is written only if the row still carries our lease and the ``his_status`` we
claimed (``_finish``): a cancellation the writer recorded meanwhile wins, and
the next step cancels in the HIS what we just booked.

A business rejection (doctor stopped) is compensated: ``his_status`` becomes
``rejected`` first, then the booking is cancelled in the engine (force), so
its unit returns; the writer later marks the row cancelled from the outbox and
keeps ``rejected``. A rejected row still ``booked`` is compensated again after
``compensate_recheck_s`` (a crash between the two).

Nothing is ever dropped: an unavailable HIS, an open breaker or an unexpected
error pushes ``his_updated_at`` back by an exponential backoff with jitter.
Nothing loops for ever either: two answers need a person and end in a
terminal ``his_status`` with ``his_reason`` (counted by ``his_lag``, shown by
``haoyuan audit --his-url``, resolved with ``haoyuan his resolve``):
``lookup_cancelled`` (after an unknown outcome the HIS has our booking
cancelled) and ``cancel_refused`` (the HIS refused our cancel, e.g. the
patient already arrived).

The patient (the forwarder's path only, with the data keys): before the
first Appointment of a patient the forwarder decrypts their binding, finds or
creates the FHIR Patient in the HIS (conditional create on the national ID)
and keeps the HIS's patient id encrypted (``his_patients``) for the next
booking; the Appointment references it. Without keys (an embedder) or
without a binding, the Appointment names the patient by ``patient_ref``.

Logs carry booking ids and reasons, never patient data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from engine.engine import Engine
from engine.his.base import (
    REASON_NOT_FOUND,
    REASON_TIMEOUT,
    HisBooking,
    HisClient,
    HisPatient,
    HisResult,
    HisUnavailable,
)
from engine.his.fhir_resources import GONE_STATUSES
from engine.his.forwarder_policy import Backoff, CircuitBreaker
from engine.pii import Crypto, DecryptionError, InvalidNationalId

__all__ = ["ATTENTION_STATUSES", "ForwarderConfig", "HisForwarder", "HisLag", "his_lag"]

log = logging.getLogger("haoyuan.forwarder")

#: ``his_status`` values that still need a call to the HIS.
TODO_STATUSES = ("pending", "unknown", "cancel_pending")
#: Terminal ``his_status`` values that need an operator (``haoyuan his resolve``).
ATTENTION_STATUSES = ("lookup_cancelled", "cancel_refused")

_CANCEL_REASON = "cancelled"


@dataclass(slots=True)
class ForwarderConfig:
    #: Rows claimed per step.
    batch_size: int = 100
    #: HIS calls in flight per forwarder.
    concurrency: int = 16
    #: A claimed row is left alone by other forwarders this long; longer
    #: than a HIS call (book + lookup) can take.
    lease_s: float = 60.0
    #: Backoff between attempts of one booking (``his_attempts`` is the exponent).
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    #: Circuit breaker over the HIS (consecutive failures, seconds open).
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    #: Sleep when nothing is due (capped by the next due row).
    idle_s: float = 1.0
    #: A rejected booking still ``booked`` in PostgreSQL is compensated again after this.
    compensate_recheck_s: float = 60.0


class HisLag(msgspec.Struct, frozen=True):
    """Bookings the HIS has not heard of yet (for metrics)."""

    #: Rows with his_status pending, unknown or cancel_pending.
    pending: int
    #: Age of the oldest of them (since booked, or cancelled), ms; 0 if none.
    oldest_pending_age_ms: int
    unknown: int = 0
    cancel_pending: int = 0
    #: Terminal, waiting for an operator (alert on these).
    lookup_cancelled: int = 0
    cancel_refused: int = 0


async def his_lag(pool: Any) -> HisLag:
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE his_status = any($1::text[])) AS n,"
        " count(*) FILTER (WHERE his_status = 'unknown') AS unknown,"
        " count(*) FILTER (WHERE his_status = 'cancel_pending') AS cancel_pending,"
        " count(*) FILTER (WHERE his_status = 'lookup_cancelled') AS lookup_cancelled,"
        " count(*) FILTER (WHERE his_status = 'cancel_refused') AS cancel_refused,"
        " coalesce(extract(epoch FROM now() - min(coalesce(cancelled_at, booked_at))"
        "   FILTER (WHERE his_status = any($1::text[]))) * 1000, 0)::bigint AS age"
        " FROM bookings WHERE his_status = any($2::text[])",
        list(TODO_STATUSES), list(TODO_STATUSES + ATTENTION_STATUSES),
    )
    return HisLag(
        pending=int(row["n"]),
        oldest_pending_age_ms=max(0, int(row["age"])),
        unknown=int(row["unknown"]),
        cancel_pending=int(row["cancel_pending"]),
        lookup_cancelled=int(row["lookup_cancelled"]),
        cancel_refused=int(row["cancel_refused"]),
    )


class _Job(msgspec.Struct, frozen=True):
    """One claimed row and what we know of its session."""

    id: str
    session_id: str
    slot_id: str
    unit: int | None
    patient_ref: str
    fee: int
    status: str
    his_status: str
    attempts: int
    lease: dt.datetime
    doctor: str
    dept: str
    date: str
    start: str
    end: str


_CLAIM = f"""
WITH todo AS (
    SELECT b.id, s.doctor_id, s.dept_id, s.date, sl.start_time, sl.end_time
    FROM bookings b
    LEFT JOIN sessions s ON s.id = b.session_id
    LEFT JOIN slots sl ON sl.session_id = b.session_id AND sl.slot_id = b.slot_id
    WHERE (b.his_status IN ({", ".join(f"'{s}'" for s in TODO_STATUSES)})
           OR (b.his_status = 'rejected' AND b.status = 'booked'))
      AND (b.his_updated_at IS NULL OR b.his_updated_at <= now())
    ORDER BY b.his_updated_at NULLS FIRST, b.booked_at
    LIMIT $1
    FOR UPDATE OF b SKIP LOCKED
)
UPDATE bookings b SET his_updated_at = now() + make_interval(secs => $2)
FROM todo WHERE b.id = todo.id
RETURNING b.id, b.session_id, b.slot_id, b.unit, b.patient_ref, b.fee_cents, b.status,
          b.his_status, b.his_attempts, b.his_updated_at,
          todo.doctor_id, todo.dept_id, todo.date, todo.start_time, todo.end_time
"""


def _hhmm(t: dt.time | None) -> str:
    return "" if t is None else t.strftime("%H:%M")


class HisForwarder:
    def __init__(
        self,
        engine: Engine,
        pool: asyncpg.Pool,
        his: HisClient,
        config: ForwarderConfig | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        backoff: Backoff | None = None,
        crypto: Crypto | None = None,
    ) -> None:
        self.engine = engine
        #: The patient data keys: None sends no Patient (the hash names them).
        self.crypto = crypto
        self.pool = pool
        self.his = his
        self.config = config or ForwarderConfig()
        c = self.config
        self.breaker = breaker or CircuitBreaker(c.breaker_failures, c.breaker_reset_s)
        self.backoff = backoff or Backoff(c.backoff_base_s, max(c.backoff_cap_s, c.backoff_base_s))
        self._sem = asyncio.Semaphore(max(1, c.concurrency))
        #: Counters (for tests and metrics).
        self.accepted = 0
        self.rejected = 0
        self.cancelled = 0
        self.deferred = 0
        self.attention = 0
        self.patients_sent = 0

    # -- the loop -----------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Forward until ``stop`` is set (or, with ``burst``, until no booking
        needs HIS work, whether due now or later)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                n = await self.step()
                backoff = 0.1
                if n:
                    continue
                if burst and (await his_lag(self.pool)).pending == 0:
                    return
                await self._idle(stop)
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    ConnectionError, TimeoutError) as exc:
                log.warning("forwarder: store or redis unavailable (%s); retrying",
                            type(exc).__name__)
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("forwarder step failed")
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 5.0)

    async def _idle(self, stop: asyncio.Event) -> None:
        wait: float | None = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(his_updated_at) - now())::float8 FROM bookings"
            " WHERE his_status = any($1::text[])",
            list(TODO_STATUSES),
        )
        delay = self.config.idle_s if wait is None else min(self.config.idle_s, max(wait, 0.01))
        await _sleep(stop, delay)

    async def step(self) -> int:
        """Claim a batch of due bookings and do their HIS work. Returns how many."""
        jobs = await self._claim()
        if jobs:
            await asyncio.gather(*(self._guarded(j) for j in jobs))
        return len(jobs)

    async def _claim(self) -> list[_Job]:
        rows = await self.pool.fetch(_CLAIM, self.config.batch_size, self.config.lease_s)
        jobs = [
            _Job(
                id=r["id"], session_id=r["session_id"], slot_id=r["slot_id"], unit=r["unit"],
                patient_ref=r["patient_ref"], fee=r["fee_cents"], status=r["status"],
                his_status=r["his_status"], attempts=r["his_attempts"],
                lease=r["his_updated_at"], doctor=r["doctor_id"] or "", dept=r["dept_id"] or "",
                date=r["date"].isoformat() if r["date"] is not None else "",
                start=_hhmm(r["start_time"]), end=_hhmm(r["end_time"]),
            )
            for r in rows
        ]
        return await self._fill_from_redis(jobs)

    async def _fill_from_redis(self, jobs: Sequence[_Job]) -> list[_Job]:
        """Session facts PostgreSQL lacks (schedule row late) come from Redis."""
        out: list[_Job] = []
        times: dict[str, dict[str, tuple[str, str]]] = {}
        for j in jobs:
            if j.status != "booked" or j.his_status == "rejected" or (
                j.doctor and j.dept and j.date and j.start and j.end
            ):
                out.append(j)
                continue
            ref = await self.engine.ref(j.session_id)
            doctor, dept, date = j.doctor, j.dept, j.date
            if ref is not None:
                doctor, dept, date = doctor or ref.doctor, dept or ref.dept, date or ref.date
            start, end = j.start, j.end
            if not (start and end) and ref is not None:
                if j.session_id not in times:
                    av = await self.engine.availability(j.session_id)
                    times[j.session_id] = (
                        {} if av is None else {s.slot_id: (s.start, s.end) for s in av.slots}
                    )
                start, end = times[j.session_id].get(j.slot_id, (start, end))
            out.append(msgspec.structs.replace(
                j, doctor=doctor, dept=dept, date=date, start=start, end=end))
        return out

    # -- one booking ----------------------------------------------------------------
    async def _guarded(self, j: _Job) -> None:
        async with self._sem:
            try:
                await self._work(j)
            except HisUnavailable as exc:
                await self._defer(j, f"unavailable:{exc.status_code or 'io'}")
            except Exception as exc:
                log.exception("forwarder: booking %s failed", j.id)
                await self._defer(j, f"error:{type(exc).__name__}")

    async def _work(self, j: _Job) -> None:
        if j.his_status == "rejected":
            await self._compensate(j, "")
            return
        cancel = j.his_status == "cancel_pending" or j.status != "booked"
        if not cancel and not (j.doctor and j.dept and j.date and j.start and j.end
                               and j.unit is not None):
            log.warning("forwarder: booking %s lacks session data; retrying later", j.id)
            await self._defer(j, "no_session_data")
            return
        if not self.breaker.allow():
            await self._defer(j, "circuit_open")
            return
        try:
            if cancel:
                result = await self.his.cancel(j.id, _CANCEL_REASON)
                self._report(result)
                await self._after_cancel(j, result)
                return
            if j.his_status == "unknown":
                found = await self.his.lookup(j.id)
                self._report(found)
                if found.outcome == "accepted":
                    await self._accepted(j, found)
                    return
                if found.outcome == "rejected" and found.reason in GONE_STATUSES:
                    # The HIS has it cancelled: no retry can fix that; a person decides.
                    await self._attention(j, "lookup_cancelled", found.reason or "cancelled",
                                          found.his_id)
                    return
                if not (found.outcome == "rejected" and found.reason == REASON_NOT_FOUND):
                    log.info("forwarder: booking %s still unknown in HIS (%s)", j.id,
                             found.reason)
                    await self._defer(j, f"lookup:{found.reason}")
                    return
            patient = await self._patient(j)
            if isinstance(patient, HisResult):
                self._report(patient)
                if patient.outcome == "rejected":
                    await self._rejected(j, patient.reason or "patient_rejected")
                else:
                    await self._defer(j, f"patient:{patient.reason}")
                return
            result = await self.his.book(self._booking(j, patient))
            self._report(result)
        except HisUnavailable:
            self.breaker.record_failure()
            raise
        if result.outcome == "accepted":
            await self._accepted(j, result)
        elif result.outcome == "rejected":
            await self._rejected(j, result.reason or "rejected")
        else:
            await self._finish(j, "unknown", "his_unknown", result.reason, defer=True)

    def _report(self, r: HisResult) -> None:
        if r.outcome == "unknown" and r.reason == REASON_TIMEOUT:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()

    def _booking(self, j: _Job, patient_his_id: str | None = None) -> HisBooking:
        return HisBooking(
            booking_id=j.id, session_id=j.session_id, slot_id=j.slot_id,
            unit=j.unit if j.unit is not None else 0, patient_ref=j.patient_ref,
            doctor_id=j.doctor, dept_id=j.dept,
            start=f"{j.date}T{j.start}:00", end=f"{j.date}T{j.end}:00", fee=j.fee,
            patient_his_id=patient_his_id,
        )

    # -- the patient -------------------------------------------------------------------
    async def _patient(self, j: _Job) -> str | HisResult | None:
        """The HIS's id of the booking's patient (found or created once, then
        kept encrypted); None to name them by ref; a HisResult if the HIS did
        not accept the patient."""
        crypto = self.crypto
        if crypto is None:
            return None
        row = await self.pool.fetchrow(
            "SELECT his_patient_id_enc FROM his_patients WHERE patient_ref = $1", j.patient_ref)
        if row is not None:
            try:
                return crypto.decrypt(row["his_patient_id_enc"], table="his_patients",
                                      column="his_patient_id_enc", row_id=j.patient_ref)
            except DecryptionError:
                log.warning("forwarder: the HIS patient id of booking %s does not decrypt;"
                            " asking the HIS again", j.id)
        person = await self._person(j, crypto)
        if person is None:
            log.warning("forwarder: booking %s has no bound patient; the HIS gets the ref only",
                        j.id)
            return None
        found = await self.his.ensure_patient(person)
        if found.outcome != "accepted" or not found.his_id:
            return found if found.outcome != "accepted" else HisResult(
                "unknown", None, "no_patient_id")
        self.patients_sent += 1
        blob = crypto.encrypt(found.his_id, table="his_patients", column="his_patient_id_enc",
                              row_id=j.patient_ref)
        await self.pool.execute(
            "INSERT INTO his_patients (patient_ref, his_patient_id_enc, key_id) VALUES"
            " ($1, $2, $3) ON CONFLICT (patient_ref) DO UPDATE SET his_patient_id_enc = $2,"
            " key_id = $3, updated_at = now()",
            j.patient_ref, blob, crypto.active_key_id)
        return found.his_id

    async def _person(self, j: _Job, crypto: Crypto) -> HisPatient | None:
        """The patient as bound (the binding of the booking's account first, then
        the latest verified one), decrypted here and nowhere else."""
        r = await self.pool.fetchrow(
            "SELECT p.id, p.name_enc, p.phone_enc, p.national_id_enc FROM patients p"
            " LEFT JOIN bookings b ON b.id = $2"
            " WHERE p.id_hash = $1 ORDER BY (p.account_id = b.account_id) DESC NULLS LAST,"
            " (p.unbound_at IS NULL) DESC, (p.verification IN ('self', 'data')) DESC,"
            " p.created_at DESC LIMIT 1", j.patient_ref, j.id)
        if r is None:
            return None
        row_id = str(r["id"])

        def dec(column: str) -> str:
            return crypto.decrypt(r[column], table="patients", column=column, row_id=row_id)

        try:
            return HisPatient.of(j.patient_ref, dec("national_id_enc"), dec("name_enc"),
                                 dec("phone_enc"))
        except (DecryptionError, InvalidNationalId) as exc:
            log.error("forwarder: the patient of booking %s cannot be read (%s)", j.id,
                      type(exc).__name__)
            return None

    async def _accepted(self, j: _Job, r: HisResult) -> None:
        if await self._finish(j, "accepted", "his_accepted", None, his_id=r.his_id,
                              visit=(r.start, r.end, r.place)):
            self.accepted += 1

    async def _attention(self, j: _Job, status: str, reason: str, his_id: str | None) -> None:
        """A terminal state for a person: no more retries (see the module docstring)."""
        log.error("forwarder: booking %s needs an operator (%s: %s); see haoyuan his resolve",
                  j.id, status, reason)
        if await self._finish(j, status, f"his_{status}", reason, his_id=his_id,
                              terminal=True):
            self.attention += 1

    async def _rejected(self, j: _Job, reason: str) -> None:
        log.warning("forwarder: HIS rejected booking %s (%s); compensating", j.id, reason)
        # Recorded first, so the writer's cancellation keeps 'rejected'.
        if await self._finish(j, "rejected", "his_rejected", reason,
                              next_in=self.config.compensate_recheck_s):
            self.rejected += 1
            await self._compensate(j, reason)

    async def _compensate(self, j: _Job, reason: str) -> None:
        why = f"his_rejected:{reason}" if reason else "his_rejected"
        res = await self.engine.cancel(j.id, reason=why[:64], force=True)
        if not res.ok:
            log.error("forwarder: compensating booking %s in the engine failed (%s)", j.id,
                      getattr(res, "reason", "?"))
        if j.his_status == "rejected":
            # A recheck: the writer has not recorded the cancellation yet.
            await self._touch(j, self.config.compensate_recheck_s)

    async def _after_cancel(self, j: _Job, r: HisResult) -> None:
        if r.outcome == "accepted":
            if await self._finish(j, "cancelled", "his_cancelled", r.reason, his_id=r.his_id):
                self.cancelled += 1
        elif r.outcome == "rejected":
            await self._attention(j, "cancel_refused", r.reason or "refused", r.his_id)
        else:
            await self._defer(j, f"cancel_unknown:{r.reason}")

    # -- writing results --------------------------------------------------------------
    async def _finish(
        self,
        j: _Job,
        his_status: str,
        event: str,
        reason: str | None,
        *,
        his_id: str | None = None,
        defer: bool = False,
        next_in: float | None = None,
        visit: tuple[str | None, str | None, str | None] | None = None,
        terminal: bool = False,
    ) -> bool:
        """Record a result if the row is still ours (same lease, same his_status).

        ``defer`` counts an attempt and schedules the next one after a backoff;
        otherwise the row is done (or rechecked after ``next_in`` seconds).
        """
        attempts = j.attempts + 1
        if defer:
            next_in = self.backoff.delay(j.attempts)
            self.deferred += 1
        start, end, place = visit or (None, None, None)
        async with self.pool.acquire() as conn, conn.transaction():
            tag = await conn.execute(
                "UPDATE bookings SET his_status = $3, his_id = coalesce($4, his_id),"
                " his_attempts = $5,"
                " his_updated_at = CASE WHEN $6::float8 IS NULL THEN now()"
                "   ELSE now() + make_interval(secs => $6::float8) END,"
                " his_reason = CASE WHEN $8 THEN $9 WHEN $3 <> $7 THEN NULL ELSE his_reason END,"
                " his_visit_start = coalesce($10::timestamptz, his_visit_start),"
                " his_visit_end = coalesce($11::timestamptz, his_visit_end),"
                " his_place = coalesce($12, his_place)"
                " WHERE id = $1 AND his_updated_at = $2 AND his_status = $7",
                j.id, j.lease, his_status, his_id, attempts, next_in, j.his_status,
                terminal or his_status == "rejected", reason, _instant(start), _instant(end),
                place,
            )
            if tag == "UPDATE 0":
                log.info("forwarder: booking %s changed while in flight; left for the next step",
                         j.id)
                return False
            if his_status != j.his_status:
                await conn.execute(
                    "INSERT INTO booking_events (booking_id, event_type, reason)"
                    " VALUES ($1, $2, $3)",
                    j.id, event, reason,
                )
        return True

    async def _defer(self, j: _Job, why: str) -> None:
        log.info("forwarder: booking %s deferred (%s), attempt %d", j.id, why, j.attempts + 1)
        await self._finish(j, j.his_status, "", why, defer=True)

    async def _touch(self, j: _Job, seconds: float) -> None:
        await self.pool.execute(
            "UPDATE bookings SET his_updated_at = now() + make_interval(secs => $3)"
            " WHERE id = $1 AND his_updated_at = $2",
            j.id, j.lease, seconds,
        )


def _instant(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone(dt.timedelta(hours=8)))


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
