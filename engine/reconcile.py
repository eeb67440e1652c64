"""Daily reconciliation (对账): the provider's statement against the ledger and bookings.

For one China-time day, the provider's trade statement (WeChat Pay's ALL
bill) is compared with the payments ledger, the bookings and the refund
orders. Each mismatch has a kind:

- ``paid_without_booking``: the provider took money that booked nothing
  here and is not being refunded (never notified, or still undecided);
- ``booked_without_payment``: the ledger holds a payment of that day the
  provider's statement does not show;
- ``amount_mismatch``: the statement, the ledger and the booking's fee
  disagree on an amount;
- ``refund_missing``: money that must go back has no refund order, or a
  refund we count as done is not in the provider's statement;
- ``refund_doubled``: a payment refunded more than once, or more than paid,
  or a refund we never ordered.

Refund lines of a statement carry the day the refund was *initiated*; their
status is frozen then, so outcomes come from the refund orders (which the
worker took from ``query_refund``), not from the bill.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import msgspec

from engine.payments.base import PaymentProvider, Statement

__all__ = ["KINDS", "Mismatch", "ReconcileReport", "reconcile"]

KINDS = ("paid_without_booking", "booked_without_payment", "amount_mismatch", "refund_missing",
         "refund_doubled")
_ENDED = ("cancelled", "refund_due", "conflict")


class Mismatch(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    kind: str
    transaction_id: str
    detail: str
    booking_id: str | None = None
    out_refund_no: str | None = None
    amount: int | None = None


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    payments: int
    amount: int
    refunds: int
    refund_amount: int


class ReconcileReport(msgspec.Struct, kw_only=True):
    date: str
    provider: str
    ok: bool
    counts: dict[str, int]
    examples: dict[str, list[Mismatch]]
    statement: Totals
    ledger: Totals
    checked_at: str


async def reconcile(db: Any, provider: PaymentProvider, date: str, *, examples: int = 5,
                    statement: Statement | None = None) -> ReconcileReport:
    """Compare the statement of ``date`` (``YYYY-MM-DD``, China time) with our books."""
    stmt = statement if statement is not None else await provider.statement(date)
    name = provider.name
    day = dt.date.fromisoformat(date)
    trade_ids = [t.transaction_id for t in stmt.trades]
    ledger = {r["transaction_id"]: r for r in await db.fetch(
        "SELECT transaction_id, hold_id, amount, outcome, verification, paid_at FROM payments"
        " WHERE provider = $1 AND ((paid_at AT TIME ZONE 'Asia/Shanghai')::date = $2"
        " OR transaction_id = any($3::text[]))", name, day, trade_ids)}
    ids = sorted(set(ledger) | set(trade_ids) | {r.transaction_id for r in stmt.refunds})
    bookings: dict[str, list[Any]] = defaultdict(list)
    for r in await db.fetch("SELECT id, status, fee_cents, payment_ref FROM bookings"
                            " WHERE payment_ref = any($1::text[])", ids):
        bookings[r["payment_ref"]].append(r)
    orders = {r["transaction_id"]: r for r in await db.fetch(
        "SELECT out_refund_no, transaction_id, booking_id, amount, state, requested_at"
        " FROM refund_orders WHERE provider = $1 AND (transaction_id = any($2::text[])"
        " OR (requested_at AT TIME ZONE 'Asia/Shanghai')::date = $3)", name, ids, day)}
    our_refunds = {o["out_refund_no"]: o for o in orders.values()}
    found: list[Mismatch] = []

    def add(kind: str, txn: str, detail: str, **kw: Any) -> None:
        found.append(Mismatch(kind=kind, transaction_id=txn, detail=detail, **kw))

    trades = {t.transaction_id: t for t in stmt.trades}
    for t in stmt.trades:
        row = ledger.get(t.transaction_id)
        booked = bookings.get(t.transaction_id, [])
        if row is None:
            add("paid_without_booking", t.transaction_id,
                "paid at the provider, never recorded here", amount=t.amount,
                booking_id=t.attach or None)
            continue
        if t.amount != row["amount"]:
            add("amount_mismatch", t.transaction_id,
                f"statement {t.amount}, ledger {row['amount']}", amount=t.amount)
        has_refund = t.transaction_id in orders
        if row["outcome"] == "pending" and not has_refund:
            add("paid_without_booking", t.transaction_id, "recorded, never decided",
                booking_id=row["hold_id"], amount=t.amount)
        elif row["outcome"] == "booked" and not booked and not has_refund:
            add("paid_without_booking", t.transaction_id, "booked in the engine, no booking row",
                booking_id=row["hold_id"], amount=t.amount)
        for b in booked:
            if b["fee_cents"] != row["amount"] and not has_refund:
                add("amount_mismatch", t.transaction_id,
                    f"fee {b['fee_cents']}, paid {row['amount']}", booking_id=b["id"])
        needs_refund = row["outcome"] == "refund" or row["verification"] != "ok" or any(
            b["status"] in _ENDED for b in booked)
        if needs_refund and not has_refund:
            add("refund_missing", t.transaction_id, "money to return has no refund order",
                booking_id=(booked[0]["id"] if booked else row["hold_id"]), amount=row["amount"])
    for txn, row in ledger.items():
        local_day = row["paid_at"].astimezone(dt.timezone(dt.timedelta(hours=8))).date()
        if txn not in trades and local_day == day:
            add("booked_without_payment", txn, "in the ledger, not in the provider's statement",
                booking_id=row["hold_id"], amount=row["amount"])
    refunded: dict[str, list[Any]] = defaultdict(list)
    for r in stmt.refunds:
        refunded[r.transaction_id].append(r)
        if r.out_refund_no not in our_refunds:
            add("refund_doubled", r.transaction_id, "a refund we never ordered",
                out_refund_no=r.out_refund_no, amount=r.refund)
    for txn, rs in refunded.items():
        paid = trades[txn].amount if txn in trades else (
            ledger[txn]["amount"] if txn in ledger else None)
        total = sum(r.refund for r in rs)
        if len({r.out_refund_no for r in rs}) > 1 or (paid is not None and total > paid):
            add("refund_doubled", txn, f"{len(rs)} refunds, {total} of {paid}", amount=total)
    in_statement = {r.out_refund_no for r in stmt.refunds}
    for o in orders.values():
        req = o["requested_at"]
        if o["state"] == "succeeded" and req is not None and req.astimezone(
                dt.timezone(dt.timedelta(hours=8))).date() == day \
                and o["out_refund_no"] not in in_statement:
            add("refund_missing", o["transaction_id"],
                "refunded here, not in the provider's statement",
                out_refund_no=o["out_refund_no"], booking_id=o["booking_id"], amount=o["amount"])
    counts = {k: 0 for k in KINDS}
    ex: dict[str, list[Mismatch]] = {k: [] for k in KINDS}
    for m in found:
        counts[m.kind] += 1
        if len(ex[m.kind]) < examples:
            ex[m.kind].append(m)
    ledger_day = [r for r in ledger.values() if r["paid_at"].astimezone(
        dt.timezone(dt.timedelta(hours=8))).date() == day]
    report = ReconcileReport(
        date=date, provider=name, ok=not found, counts=counts,
        examples={k: v for k, v in ex.items() if v},
        statement=Totals(payments=len(stmt.trades), amount=sum(t.amount for t in stmt.trades),
                         refunds=len(stmt.refunds),
                         refund_amount=sum(r.refund for r in stmt.refunds)),
        ledger=Totals(payments=len(ledger_day), amount=sum(r["amount"] for r in ledger_day),
                      refunds=sum(1 for o in orders.values() if o["state"] == "succeeded"),
                      refund_amount=sum(o["amount"] for o in orders.values()
                                        if o["state"] == "succeeded")),
        checked_at=dt.datetime.now(dt.UTC).isoformat())
    await db.execute(
        "INSERT INTO reconcile_runs (provider, bill_date, ok, counts, report)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)", name, day, report.ok,
        msgspec.json.encode(counts).decode(), msgspec.json.encode(report).decode())
    return report


def format_report(r: ReconcileReport) -> str:
    lines = [f"reconciliation {r.provider} {r.date}",
             f"  statement: {r.statement.payments} payments ({r.statement.amount} fen),"
             f" {r.statement.refunds} refunds ({r.statement.refund_amount} fen)",
             f"  ledger:    {r.ledger.payments} payments ({r.ledger.amount} fen),"
             f" {r.ledger.refunds} refunds done ({r.ledger.refund_amount} fen)"]
    for k in KINDS:
        lines.append(f"  {k:<24}{r.counts.get(k, 0):>6}")
        for m in r.examples.get(k, []):
            lines.append(f"      {m.transaction_id} {m.booking_id or ''} {m.detail}")
    lines.append("reconcile: OK" if r.ok else f"reconcile: {sum(r.counts.values())} mismatch(es)")
    return "\n".join(lines)
