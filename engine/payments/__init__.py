"""The money side: the payment-provider contract, the WeChat Pay API v3 client,
taking a payment in (the ledger before the confirm) and refunds.

``engine.testing.payment_simulator`` (Litestar, granian) is imported on demand only.
"""

from engine.payments.base import (
    InvalidNotification,
    PaymentError,
    PaymentNotice,
    PaymentProtocolError,
    PaymentProvider,
    PaymentUnavailable,
    RefundNotice,
    RefundResult,
    Statement,
    StatementNotReady,
    order_no,
    refund_no,
)

__all__ = [
    "InvalidNotification",
    "PaymentError",
    "PaymentNotice",
    "PaymentProtocolError",
    "PaymentProvider",
    "PaymentUnavailable",
    "RefundNotice",
    "RefundResult",
    "Statement",
    "StatementNotReady",
    "order_no",
    "refund_no",
]
