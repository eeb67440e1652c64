"""The payment-provider contract: what the engine needs from the money side.

Modelled on :mod:`engine.his.base`. A payment reaches us as a notification
from the provider; refunds and the daily statement are calls we make.

Every refund call answers one of three outcomes (:class:`RefundResult`):

- ``accepted``: the provider has refunded it (status ``SUCCESS``);
- ``rejected``: the provider refused it, or it ended without money moving
  (``CLOSED``, ``ABNORMAL``, a business error such as ``NOT_ENOUGH``);
  ``reason`` says which. With reason ``not_found`` (a query only) the
  provider has no record of the refund number, so sending it is safe;
- ``unknown``: the request may or may not have taken effect (a read timeout
  after it went out, a 5xx ``SYSTEM_ERROR``), or the refund is still
  ``PROCESSING``. Look it up with ``query_refund`` before any retry; never
  treat it as a failure and never as a success.

A refund is idempotent on ``out_refund_no``: the provider refunds one number
once, however often it is sent ("同一退款单号多次请求只退一笔"), so a retry
always reuses the number.

When nothing can have happened (connection refused, 429 ``FREQUENCY_LIMITED``)
the client raises :class:`PaymentUnavailable`: safe to retry after a backoff.

``parse_notification`` checks a notification's signature (over the raw
body), its freshness, the merchant, and decrypts its resource; anything
wrong raises :class:`InvalidNotification` and nothing may be applied.

Amounts are integers in fen (分); currency ``CNY``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Literal, Protocol, runtime_checkable

import msgspec

__all__ = [
    "REASON_NOT_FOUND",
    "REASON_TIMEOUT",
    "InvalidNotification",
    "Outcome",
    "PaymentError",
    "PaymentNotice",
    "PaymentProtocolError",
    "PaymentProvider",
    "PaymentUnavailable",
    "RefundNotice",
    "RefundResult",
    "Statement",
    "StatementNotReady",
    "StatementRefund",
    "StatementTrade",
    "order_no",
    "refund_no",
]

Outcome = Literal["accepted", "rejected", "unknown"]

REASON_NOT_FOUND = "not_found"
REASON_TIMEOUT = "timeout"


def order_no(hold_id: str) -> str:
    """Our order number (WeChat ``out_trade_no``, 6..32 of ``[0-9A-Za-z_-|*]``)
    for a hold: a hold id may be longer and carries dots, so it travels in
    ``attach`` and this number is derived from it (one order per hold)."""
    digest = hashlib.sha256(b"haoyuan order\x00" + hold_id.encode()).digest()
    return "HY" + base64.b32encode(digest).decode().rstrip("=")[:30]


def refund_no(provider: str, transaction_id: str) -> str:
    """The out-refund number of the one refund of a payment: derived from the
    payment, so the same payment always gets the same number."""
    digest = hashlib.sha256(f"{provider}:{transaction_id}".encode()).hexdigest()
    return "RF" + digest[:30]


class PaymentNotice(msgspec.Struct, frozen=True, kw_only=True):
    """A verified, decrypted payment notification (``TRANSACTION.SUCCESS``)."""

    provider: str
    transaction_id: str
    out_trade_no: str
    #: The hold id we put in ``attach`` when the order was made.
    hold_id: str
    trade_state: str
    #: Order total, fen.
    amount: int
    currency: str
    #: RFC 3339, the provider's ``success_time``.
    paid_at: str
    #: The notification's own id (logged only; the transaction id is the key).
    notification_id: str = ""


class RefundNotice(msgspec.Struct, frozen=True, kw_only=True):
    """A verified, decrypted refund notification (``REFUND.*``)."""

    provider: str
    out_refund_no: str
    refund_id: str
    transaction_id: str
    #: SUCCESS, CLOSED or ABNORMAL.
    status: str
    amount: int | None = None


class RefundResult(msgspec.Struct, frozen=True):
    outcome: Outcome
    refund_id: str | None = None
    #: The provider's status (SUCCESS, PROCESSING, CLOSED, ABNORMAL) or error code.
    reason: str | None = None
    amount: int | None = None


class StatementTrade(msgspec.Struct, frozen=True, kw_only=True):
    """A payment line of the daily statement (交易状态 SUCCESS or REFUND's original)."""

    trade_time: str
    transaction_id: str
    out_trade_no: str
    amount: int
    attach: str = ""


class StatementRefund(msgspec.Struct, frozen=True, kw_only=True):
    """A refund line (交易状态 REFUND): one per refund initiated that day."""

    trade_time: str
    transaction_id: str
    out_trade_no: str
    refund_id: str
    out_refund_no: str
    refund: int
    #: As frozen at initiation (may read PROCESSING for a refund that later
    #: succeeded: take outcomes from ``query_refund``, not from here).
    status: str


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    """The provider's daily trade statement (交易账单, bill type ALL)."""

    bill_date: str
    trades: list[StatementTrade]
    refunds: list[StatementRefund]
    #: The summary line: 总交易单数, 应结订单总金额 (fen), 退款总金额 (fen).
    total_count: int
    total_amount: int
    total_refund: int


class PaymentError(Exception):
    """Base of the payment client's errors."""


class PaymentUnavailable(PaymentError):
    """Nothing happened on the provider's side (down, 429, circuit open): retry later."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PaymentProtocolError(PaymentError):
    """The provider answered something we cannot interpret (or could not verify)."""


class StatementNotReady(PaymentError):
    """The day's statement is not generated yet (``STATEMENT_CREATING``) or does not exist."""


class InvalidNotification(PaymentError):
    """A notification that must not be applied: bad or stale signature, unknown
    key, undecryptable resource, another merchant or app. The message never
    carries the body."""


@runtime_checkable
class PaymentProvider(Protocol):
    """What the API, the refund worker and the reconciliation need from a provider."""

    #: The ledger's ``provider`` column for this provider's payments.
    name: str

    def parse_notification(
        self, headers: Mapping[str, str], body: bytes
    ) -> PaymentNotice | RefundNotice:
        """Verify and decrypt one notification (raises InvalidNotification)."""
        ...

    async def refund(
        self,
        out_refund_no: str,
        *,
        transaction_id: str,
        refund: int,
        total: int,
        reason: str,
    ) -> RefundResult:
        """Ask for a refund, idempotently on ``out_refund_no``."""
        ...

    async def query_refund(self, out_refund_no: str) -> RefundResult:
        """What the provider knows of a refund number (see the module docstring)."""
        ...

    async def statement(self, bill_date: str) -> Statement:
        """The trade statement of ``bill_date`` (``YYYY-MM-DD``, China time)."""
        ...

    async def aclose(self) -> None: ...
