"""The refund worker: refund orders -> the payment provider, at least once, never twice.

The work queue is the ``refund_orders`` table (``engine.store.payments``):
one order per payment, its ``out_refund_no`` derived from the payment, so a
refund sent again is the same refund to the provider. States:

- ``due``: nothing was sent yet;
- ``requested``: a request may have gone out (it is marked so, and committed,
  *before* the request is sent): the provider is asked (``query_refund``)
  before anything is sent again; a refund the provider never heard of
  (``not_found``) is sent again with the same number;
- ``succeeded``: the provider refunded it (or finance paid it out by hand);
- ``failed``: the provider refused it or closed it; retried with backoff
  (the same number, as WeChat Pay asks) up to ``max_attempts``, then left
  for finance (``next_attempt_at`` NULL, ``haoyuan refunds retry`` re-arms it).

Each step claims due orders of its provider with ``FOR UPDATE SKIP LOCKED``
and pushes ``next_attempt_at`` forward by a lease, so several workers can run
and a killed one's orders come back when the lease runs out: they are then
``requested`` at worst, and looked up first.

Orders of providers without a refund API here (``callback``, ``manual``) are
finance's: ``POST /v1/admin/refunds/{booking_id}/paid``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from engine.his.forwarder_policy import Backoff
from engine.payments.base import (
    REASON_NOT_FOUND,
    PaymentProvider,
    PaymentUnavailable,
    RefundNotice,
    RefundResult,
)
from engine.store.payments import REFUND_COLS, RefundOrder, refund_order

__all__ = ["RefundConfig", "RefundLag", "RefundWorker", "refund_lag", "refund_notified",
           "retry_refund"]

log = logging.getLogger("haoyuan.refunds")


@dataclass(slots=True)
class RefundConfig:
    batch_size: int = 50
    concurrency: int = 8
    #: A claimed order is left alone by other workers this long (longer than
    #: a refund request and its lookup can take).
    lease_s: float = 60.0
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 600.0
    #: A refund still PROCESSING is asked again after this.
    processing_recheck_s: float = 30.0
    #: Failed refunds are retried this often, then left for finance.
    max_attempts: int = 12
    idle_s: float = 1.0
    #: Test hook: called after an order is marked requested and before the
    #: provider is called (a kill -9 lands here).
    before_send: Callable[[str], Awaitable[None]] | None = None


class RefundLag(msgspec.Struct, frozen=True):
    due: int
    requested: int
    failed: int
    #: Failed past their attempts: finance must act.
    stuck: int
    succeeded: int
    oldest_open_age_s: float


async def refund_lag(db: Any) -> RefundLag:
    r = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'due') AS due,"
        " count(*) FILTER (WHERE state = 'requested') AS requested,"
        " count(*) FILTER (WHERE state = 'failed') AS failed,"
        " count(*) FILTER (WHERE state = 'failed' AND next_attempt_at IS NULL) AS stuck,"
        " count(*) FILTER (WHERE state = 'succeeded') AS succeeded,"
        " coalesce(extract(epoch FROM now() - min(created_at) FILTER"
        "   (WHERE state <> 'succeeded')), 0)::float8 AS age FROM refund_orders")
    return RefundLag(int(r["due"]), int(r["requested"]), int(r["failed"]), int(r["stuck"]),
                     int(r["succeeded"]), float(r["age"]))


async def refund_notified(db: Any, n: RefundNotice) -> bool:
    """A verified refund notification: SUCCESS ends the order; CLOSED or
    ABNORMAL fails it (the worker retries it after a backoff). Idempotent;
    True if it changed an order."""
    if n.status == "SUCCESS":
        tag = await db.execute(
            "UPDATE refund_orders SET state = 'succeeded', provider_status = $2,"
            " provider_refund_id = coalesce(nullif($3, ''), provider_refund_id),"
            " finished_at = now(), next_attempt_at = NULL"
            " WHERE out_refund_no = $1 AND state <> 'succeeded'",
            n.out_refund_no, n.status, n.refund_id)
    elif n.status in ("CLOSED", "ABNORMAL"):
        tag = await db.execute(
            "UPDATE refund_orders SET state = 'failed', provider_status = $2,"
            " last_error = $2, next_attempt_at = now() + interval '60 seconds'"
            " WHERE out_refund_no = $1 AND state IN ('due', 'requested')",
            n.out_refund_no, n.status)
    else:
        return False
    return bool(tag != "UPDATE 0")


_CLAIM = f"""
WITH todo AS (
    SELECT out_refund_no FROM refund_orders
    WHERE provider = $1 AND state IN ('due', 'requested', 'failed')
      AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE refund_orders r SET next_attempt_at = now() + make_interval(secs => $3)
FROM todo WHERE r.out_refund_no = todo.out_refund_no
RETURNING {", ".join(f"r.{c.strip()}" for c in REFUND_COLS.split(","))}
"""


class RefundWorker:
    def __init__(self, pool: asyncpg.Pool, provider: PaymentProvider,
                 config: RefundConfig | None = None, *, backoff: Backoff | None = None) -> None:
        self.pool = pool
        self.provider = provider
        self.config = config or RefundConfig()
        c = self.config
        self.backoff = backoff or Backoff(c.backoff_base_s, max(c.backoff_cap_s, c.backoff_base_s))
        self._sem = asyncio.Semaphore(max(1, c.concurrency))
        #: Counters (tests, the command's summary).
        self.sent = 0
        self.looked_up = 0
        self.succeeded = 0
        self.failed = 0
        self.unknown = 0

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Refund until ``stop`` is set (or, with ``burst``, until no order of
        this provider can move without waiting for the provider)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                n = await self.step()
                backoff = 0.1
                if n:
                    continue
                if burst and await self._open() == 0:
                    return
                await _sleep(stop, await self._idle())
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    ConnectionError, TimeoutError) as exc:
                log.warning("refunds: store unavailable (%s); retrying", type(exc).__name__)
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("refunds: step failed")
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 5.0)

    async def _open(self) -> int:
        n: int = await self.pool.fetchval(
            "SELECT count(*) FROM refund_orders WHERE provider = $1 AND state IN"
            " ('due', 'requested', 'failed') AND next_attempt_at IS NOT NULL",
            self.provider.name)
        return n

    async def _idle(self) -> float:
        wait: float | None = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8 FROM refund_orders"
            " WHERE provider = $1 AND state IN ('due', 'requested', 'failed')"
            " AND next_attempt_at IS NOT NULL", self.provider.name)
        return self.config.idle_s if wait is None else min(self.config.idle_s, max(wait, 0.01))

    async def step(self) -> int:
        rows = await self.pool.fetch(_CLAIM, self.provider.name, self.config.batch_size,
                                     self.config.lease_s)
        orders = [refund_order(r) for r in rows]
        if orders:
            await asyncio.gather(*(self._guarded(o) for o in orders))
        return len(orders)

    async def _guarded(self, o: RefundOrder) -> None:
        async with self._sem:
            try:
                await self._work(o)
            except PaymentUnavailable as exc:
                await self._later(o, f"unavailable:{exc.status_code or 'io'}")
            except Exception as exc:
                # After a request went out anything unexpected is an unknown
                # outcome: the order stays requested and is looked up next time.
                log.exception("refunds: order %s failed", o.out_refund_no)
                await self._later(o, f"error:{type(exc).__name__}")

    async def _work(self, o: RefundOrder) -> None:
        if o.state in ("requested", "failed"):
            found = await self.provider.query_refund(o.out_refund_no)
            self.looked_up += 1
            if found.outcome == "accepted":
                await self._succeeded(o, found)
                return
            if found.outcome == "unknown":
                await self._processing(o, found)
                return
            if found.reason != REASON_NOT_FOUND and o.state == "requested":
                await self._failed(o, found)
                return
            if found.reason != REASON_NOT_FOUND and o.attempts >= self.config.max_attempts:
                await self._failed(o, found)
                return
            # The provider never heard of it (or a failed one is retried): send it.
        if not await self._mark_requested(o):
            return
        if self.config.before_send is not None:
            await self.config.before_send(o.out_refund_no)
        result = await self.provider.refund(
            o.out_refund_no, transaction_id=o.transaction_id, refund=o.amount, total=o.total,
            reason=_patient_reason(o.cause))
        self.sent += 1
        if result.outcome == "accepted":
            await self._succeeded(o, result)
        elif result.outcome == "rejected":
            await self._failed(o, result)
        else:
            await self._processing(o, result)

    # -- writing results -----------------------------------------------------------
    async def _mark_requested(self, o: RefundOrder) -> bool:
        """Committed before the request goes out: a crash after sending finds it
        requested and asks the provider before sending again."""
        tag = await self.pool.execute(
            "UPDATE refund_orders SET state = 'requested', attempts = attempts + 1,"
            " requested_at = coalesce(requested_at, now())"
            " WHERE out_refund_no = $1 AND next_attempt_at = $2 AND state = $3",
            o.out_refund_no, o.next_attempt_at, o.state)
        if tag == "UPDATE 0":
            log.info("refunds: order %s changed while claimed; left alone", o.out_refund_no)
            return False
        return True

    async def _succeeded(self, o: RefundOrder, r: RefundResult) -> None:
        await self.pool.execute(
            "UPDATE refund_orders SET state = 'succeeded', provider_status = $2,"
            " provider_refund_id = coalesce($3, provider_refund_id), finished_at = now(),"
            " next_attempt_at = NULL, last_error = NULL WHERE out_refund_no = $1"
            " AND state <> 'succeeded'", o.out_refund_no, r.reason, r.refund_id)
        self.succeeded += 1
        log.info("refunds: %s succeeded (%s, %d fen)", o.out_refund_no, o.cause, o.amount)

    async def _failed(self, o: RefundOrder, r: RefundResult) -> None:
        attempts = max(o.attempts, 1)
        give_up = attempts >= self.config.max_attempts
        delay = None if give_up else self.backoff.delay(attempts)
        await self.pool.execute(
            "UPDATE refund_orders SET state = 'failed', provider_status = $2, last_error = $2,"
            " provider_refund_id = coalesce($3, provider_refund_id),"
            " next_attempt_at = CASE WHEN $4::float8 IS NULL THEN NULL"
            "   ELSE now() + make_interval(secs => $4::float8) END"
            " WHERE out_refund_no = $1 AND state <> 'succeeded'",
            o.out_refund_no, r.reason, r.refund_id, delay)
        self.failed += 1
        (log.error if give_up else log.warning)(
            "refunds: %s failed (%s)%s", o.out_refund_no, r.reason,
            "; left for finance" if give_up else "; will retry")

    async def _processing(self, o: RefundOrder, r: RefundResult) -> None:
        self.unknown += 1
        delay = (self.config.processing_recheck_s if r.reason == "PROCESSING"
                 else self.backoff.delay(max(o.attempts, 1)))
        await self.pool.execute(
            "UPDATE refund_orders SET state = 'requested', provider_status = $2,"
            " provider_refund_id = coalesce($3, provider_refund_id),"
            " next_attempt_at = now() + make_interval(secs => $4::float8)"
            " WHERE out_refund_no = $1 AND state <> 'succeeded'",
            o.out_refund_no, r.reason, r.refund_id, delay)

    async def _later(self, o: RefundOrder, why: str) -> None:
        await self.pool.execute(
            "UPDATE refund_orders SET last_error = $2,"
            " next_attempt_at = now() + make_interval(secs => $3::float8)"
            " WHERE out_refund_no = $1 AND state <> 'succeeded'",
            o.out_refund_no, why[:200], self.backoff.delay(max(o.attempts, 1)))


async def retry_refund(db: Any, out_refund_no: str) -> RefundOrder | None:
    """Re-arm a refund left for finance (failed past its attempts): the worker
    asks the provider about it, then sends it again with the same number."""
    r = await db.fetchrow(
        f"UPDATE refund_orders SET next_attempt_at = now(), attempts = 0"
        f" WHERE out_refund_no = $1 AND state = 'failed' RETURNING {REFUND_COLS}",
        out_refund_no)
    return None if r is None else refund_order(r)


_REASONS = {
    "patient_cancel": "患者取消预约退款",
    "suspended": "医生停诊退款",
    "his_rejected": "医院未能登记预约退款",
    "his_cancelled": "医院窗口取消预约退款",
    "conflict": "号源冲突退款",
    "expired": "支付超时未能挂号退款",
    "duplicate": "同一天已有预约退款",
    "already_paid": "重复支付退款",
    "amount_mismatch": "支付金额有误退款",
    "unknown_hold": "未找到对应订单退款",
}


def _patient_reason(cause: str) -> str:
    """The refund reason the payer sees in WeChat (at most 80 characters)."""
    return _REASONS.get(cause, "挂号费退款")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
