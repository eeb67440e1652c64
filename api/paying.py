"""Confirming a hold with a payment reference: one home for /v1's payment
callback and the FHIR facade's ``$book``.

A payment reference books at most one hold, ever: it is claimed for its hold
in PostgreSQL (``engine.store.payments.claim``) before the engine confirms.
The same reference for another hold is refused (``payment-reused``) and a
second reference for a hold already paid too (``already-paid``); both are
recorded for the payment side to refund.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import structlog

from api.context import Api
from engine.outcomes import Booked, Reason, Refused
from engine.store import payments

__all__ = ["PaymentRefused", "confirm_paid"]

log = structlog.get_logger("haoyuan.api")


class PaymentRefused(NamedTuple):
    """A payment that books nothing and is recorded for refund."""

    kind: Literal["payment-reused", "already-paid"]
    server_ms: int | None = None


async def confirm_paid(api: Api, hold_id: str, payment_ref: str, amount: int
                       ) -> Booked | Refused | PaymentRefused:
    owner = await payments.claim(api.pool, payment_ref, hold_id, amount)
    if owner is not None:
        log.warning("payment_reused", hold_id=hold_id, payment_ref=payment_ref)
        await payments.record_refund(api.pool, payment_ref, hold_id, amount, "payment-reused")
        return PaymentRefused("payment-reused")
    out = await api.engine.confirm(hold_id, payment_ref)
    if isinstance(out, Refused) and out.reason is Reason.INVALID_STATE and out.state == "paid":
        # A second payment for a paid hold books nothing: keep it for the refund.
        await payments.record_refund(api.pool, payment_ref, hold_id, amount, "already-paid")
        return PaymentRefused("already-paid", out.server_ms or None)
    return out
