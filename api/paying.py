"""Confirming a hold with a payment reference: one home for /v1's payment
callback and the FHIR facade's ``$book``.

The payment goes into the ledger first (``engine.payments.intake``,
provider ``callback``: /v1 and the facade share one namespace of payment
references), then the engine confirms. A payment reference books at most one
hold, ever. A payment that books nothing is recorded and refunded: for an
unknown hold (``not-found``), of the wrong amount (``amount-mismatch``), a
reference reused for another hold (``payment-reused``) or a second one for a
hold already paid (``already-paid``). While the hold's partition recovers the
payment stays pending and the caller is told to retry (``recovering``).
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import structlog

from api.context import Api
from engine.outcomes import MESSAGES, Booked, Reason, Refused
from engine.payments.intake import Incoming, take_payment

__all__ = ["Paid", "PaymentRefused", "confirm_paid"]

log = structlog.get_logger("haoyuan.api")

_REFUNDED = {"not-found": "no such hold; the payment is refunded",
             "amount-mismatch": "the payment is refunded",
             "payment-reused": "refused and recorded for refund",
             "already-paid": "refused and recorded for refund"}


class Paid(NamedTuple):
    """The hold became a booking; ``fee`` is what the hold cost."""

    booked: Booked
    fee: int | None


class PaymentRefused(NamedTuple):
    """A payment that books nothing (a problem slug and its detail)."""

    kind: str
    detail: str
    refund_due: bool = True
    server_ms: int | None = None
    fee: int | None = None


async def confirm_paid(api: Api, hold_id: str, payment_ref: str, amount: int
                       ) -> Paid | Refused | PaymentRefused:
    taken = await take_payment(api.engine, api.pool, Incoming(
        provider="callback", transaction_id=payment_ref, hold_id=hold_id,
        payment_ref=payment_ref, amount=amount, paid_at=dt.datetime.now(dt.UTC)),
        recovering=api.record_recovering)
    if taken.booked is not None:
        return Paid(taken.booked, int(taken.fee) if taken.fee is not None else None)
    if taken.reason == "recovering":
        return Refused(Reason.RECOVERING, api.clock.now_ms(), MESSAGES[Reason.RECOVERING])
    r = taken.refused
    server_ms = (r.server_ms if r else 0) or None
    if taken.reason in _REFUNDED:
        if taken.reason == "payment-reused":
            log.warning("payment_reused", hold_id=hold_id, payment_ref=payment_ref)
        detail = _REFUNDED[taken.reason]
        if taken.reason == "amount-mismatch":
            detail = f"the fee of this hold is {int(taken.fee or 0)}; {detail}"
        return PaymentRefused(taken.reason, detail, server_ms=server_ms,
                              fee=int(taken.fee) if taken.fee is not None else None)
    if r is not None:
        return r
    return PaymentRefused("invalid-state", "the hold cannot take this payment",
                          refund_due=taken.refund_due, server_ms=server_ms)
