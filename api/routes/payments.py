"""WeChat Pay API v3 notifications: payments and refunds (微信支付回调).

``POST /v1/payments/wechat/notify`` is the ``notify_url`` of our orders and
of our refunds. The body is verified over its raw bytes (signature by the
WeChat Pay public key, a 5-minute timestamp window) and its resource
decrypted (``engine.payments.wechat``); a notification that fails any check
changes nothing and is answered 401 ``{"code": "FAIL"}`` (WeChat Pay's
probes with a ``WECHATPAY/SIGNTEST/`` signature get that answer too).

A payment (``TRANSACTION.SUCCESS``) goes into the ledger before the engine
confirms it (``engine.payments.intake``): a repeated notification is counted
and answered the same; one for a hold we do not know, of the wrong amount,
or for a hold already paid is refunded. A refund result (``REFUND.*``) ends
or fails its refund order. The answer is 204 once the outcome is committed;
503 ``{"code": "FAIL"}`` when it could not be yet (PostgreSQL or Redis down or
failing over, the worker shedding, a partition recovering) and 500 on a bug:
WeChat Pay notifies again after any non-2xx (15 s ... 24 h).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import structlog
from litestar import Controller, Request, Response, post

from api.context import api_of
from api.docs import errors
from api.errors import is_unavailable
from api.problems import json_response, problem
from engine.payments.base import InvalidNotification, RefundNotice, order_no
from engine.payments.intake import Incoming, take_payment
from engine.refunds import refund_notified

__all__ = ["PaymentController"]

log = structlog.get_logger("haoyuan.api")
_encode = msgspec.json.Encoder().encode


class Fail(msgspec.Struct, frozen=True):
    """WeChat Pay's failure answer (the HTTP status is what counts)."""

    code: str = "FAIL"
    message: str = "失败"


def _fail(status: int, message: str) -> Response[Any]:
    return json_response(_encode(Fail(message=message)), status)


def _instant(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return dt.datetime.now(dt.UTC)
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class PaymentController(Controller):
    path = "/v1/payments"
    tags = ("payments",)

    @post("/wechat/notify", status_code=204, responses=errors(401, 404),
          summary="WeChat Pay notification (payment or refund result)")
    async def wechat_notify(self, request: Request[Any, Any, Any]) -> Response[None]:
        """Signed by WeChat Pay (``Wechatpay-Signature`` over timestamp, nonce and
        the raw body); 204 once recorded, 401 ``FAIL`` if it does not verify,
        503 ``FAIL`` to be notified again later."""
        api = api_of(request)
        path: str = request.scope["path"]
        if api.wxpay is None:
            return problem("not-found", "WeChat Pay is not configured", instance=path)
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            notice = api.wxpay.parse_notification(headers, body)
        except InvalidNotification as exc:
            api.metrics.decision("wxpay_notify", "invalid")
            log.warning("wechat_notification_refused", why=str(exc))
            return _fail(401, "签名验证失败")
        try:
            if isinstance(notice, RefundNotice):
                changed = await refund_notified(api.pool, notice)
                api.metrics.decision("wxpay_notify", f"refund-{notice.status.lower()}")
                log.info("wechat_refund_notification", out_refund_no=notice.out_refund_no,
                         status=notice.status, changed=changed)
                return Response(content=None, status_code=204)
            if notice.trade_state != "SUCCESS":
                api.metrics.decision("wxpay_notify", "not-paid")
                log.info("wechat_payment_not_success", transaction_id=notice.transaction_id,
                         trade_state=notice.trade_state)
                return Response(content=None, status_code=204)
            # The hold travels in attach; the order number is derived from it.
            hold = notice.hold_id if order_no(notice.hold_id) == notice.out_trade_no else ""
            if not api.admission.enter():
                api.metrics.decision("wxpay_notify", "shed")
                return _fail(503, "繁忙，请稍后重试")
            try:
                taken = await take_payment(api.engine, api.pool, Incoming(
                    provider=notice.provider, transaction_id=notice.transaction_id,
                    hold_id=hold, payment_ref=notice.transaction_id, amount=notice.amount,
                    paid_at=_instant(notice.paid_at), currency=notice.currency,
                    out_trade_no=notice.out_trade_no), recovering=api.record_recovering)
            finally:
                api.admission.leave()
        except Exception as exc:
            # WeChat Pay notifies again after any non-2xx: a backing service
            # that is down (a failover) is 503, anything else a bug (500).
            down = is_unavailable(exc)
            api.metrics.decision("wxpay_notify", "unavailable" if down else "error")
            if down:
                log.warning("wechat_notification_deferred", error=type(exc).__name__)
                return _fail(503, "系统繁忙，请稍后重试")
            log.error("wechat_notification_failed", error=type(exc).__name__, exc_info=exc)
            return _fail(500, "系统繁忙，请稍后重试")
        api.metrics.decision("wxpay_notify", taken.reason or taken.kind)
        log.info("wechat_payment", transaction_id=notice.transaction_id, hold_id=hold,
                 outcome=taken.kind, reason=taken.reason, repeated=taken.repeated)
        if taken.kind == "pending":
            return _fail(503, "订单处理中，请稍后重试")
        return Response(content=None, status_code=204)
