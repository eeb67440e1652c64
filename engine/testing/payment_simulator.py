"""An in-memory WeChat Pay API v3 (public-key mode) for tests and the demo, with faults.

It holds its own keys (``GET /_sim/keys`` hands out everything a
:class:`~engine.payments.wechat.WechatPayConfig` needs, the merchant's
private key included: it is a simulator), signs every answer and every
notification as WeChat Pay does, and encrypts notification resources with
the APIv3 key (AEAD_AES_256_GCM), so the real client code is what is tested.

API: ``POST /v3/refund/domestic/refunds`` (checks ``Authorization``;
idempotent on ``out_refund_no``: a number refunds once, however often it is
sent; refuses a refund above what is left of the payment),
``GET /v3/refund/domestic/refunds/{no}`` (404 ``RESOURCE_NOT_EXISTS`` for a
number never seen), ``GET /v3/bill/tradebill`` and
``GET /v3/billdownload/file?token=`` (the ALL bill of a China-time day:
gzip, backtick-prefixed fields, yuan, a summary, SHA1 in ``hash_value``;
downloads unsigned).

Admin under ``/_sim/``: ``POST pay`` (a patient pays: ``{"hold_id",
"amount", "notify_url"?, "deliver"?, "tamper"?}``; the order number is
``order_no(hold_id)``, the hold travels in ``attach``; the notification is
POSTed to ``notify_url`` unless ``deliver`` is false, and returned either
way; ``tamper``: ``signature``, ``stale``, ``mchid``), ``POST notify``
(``{"transaction_id"}``: deliver its notification again),
``POST refund-notify`` (``{"out_refund_no"}``: a REFUND.* notification),
``GET transactions``, ``GET refunds`` (each with ``requests`` and
``effects``: how often it was asked for, how often money moved),
``POST bill/tamper`` (for reconciliation tests: ``hide_trade``, ``amount``,
``hide_refund``, ``extra_refund``), ``GET|POST config``, ``POST reset``.

Faults (:class:`PaySimConfig`) on the refund endpoints: ``down`` (503),
``latency_ms``, ``failure_rate`` (500 ``SYSTEM_ERROR``, nothing done),
``timeout_rate`` (the refund is made, *then* the answer hangs ``hang_s``),
``processing_s`` (a refund reads PROCESSING this long, then SUCCESS),
``close_refunds`` (these numbers end CLOSED).

Run it: ``python -m engine.testing.payment_simulator --port 8091`` or
:class:`PaymentSimulatorProcess` from tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import hashlib
import os
import random
import secrets
import time
from typing import Annotated, Any

import httpx
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar import Litestar, Request, Response, get, post
from litestar.di import Provide

from engine.payments.base import order_no
from engine.payments.wechat import (
    SIGNATURE_TYPE,
    WechatPayConfig,
    aes_gcm_encrypt,
    load_public_key,
    rsa_sign,
    rsa_verify,
    signed_message,
)
from engine.testing.his_simulator import SimulatorProcess

__all__ = ["PaySimConfig", "PaymentSimulatorProcess", "create_payment_app", "sim_wechat_config",
           "wxpay_env"]

Json = dict[str, Any]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
CST = dt.timezone(dt.timedelta(hours=8))


class PaySimConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    latency_ms: NonNegative = 0.0
    failure_rate: Rate = 0.0
    timeout_rate: Rate = 0.0
    hang_s: NonNegative = 5.0
    processing_s: NonNegative = 0.0
    close_refunds: frozenset[str] = frozenset()
    down: bool = False
    #: Check the merchant's Authorization header on API calls.
    verify_auth: bool = True
    #: Where payment notifications go unless a pay names its own.
    notify_url: str = ""
    mchid: str = "1900000109"
    appid: str = "wxsimulated0000001"
    seed: int | None = None


class _Keys:
    def __init__(self) -> None:
        self.platform = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = "PUB_KEY_ID_SIM" + secrets.token_hex(8).upper()
        self.serial = secrets.token_hex(20).upper()
        self.apiv3 = secrets.token_hex(16)  # 32 ASCII characters

    def public_pem(self) -> str:
        return self.platform.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def merchant_pem(self) -> str:
        return self.merchant.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()


class PaySim:
    def __init__(self, config: PaySimConfig) -> None:
        self.initial = config
        self.keys = _Keys()
        self.merchant_public = load_public_key(
            self.keys.merchant.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode())
        self.reset()

    def reset(self) -> None:
        self.config = self.initial
        self.rng = random.Random(self.initial.seed)
        self.transactions: dict[str, Json] = {}
        self.refunds: dict[str, Json] = {}
        self.bills: dict[str, bytes] = {}
        self.tamper: list[dict[str, Any]] = []
        self.delivered: list[int] = []
        self.pending = 0
        self._seq = 0
        self._http: httpx.AsyncClient | None = getattr(self, "_http", None)
        self._tasks: set[asyncio.Task[None]] = getattr(self, "_tasks", set())

    def http(self) -> httpx.AsyncClient:
        """One client for every delivery (a new one per call costs a TLS context)."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10.0, verify=False)
        return self._http

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def next_no(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{int(time.time())}{self._seq:08d}"

    # -- signing ------------------------------------------------------------------------
    def signed_headers(self, body: bytes, *, ts: int | None = None) -> dict[str, str]:
        t = str(int(time.time()) if ts is None else ts)
        nonce = secrets.token_hex(16)
        return {"Wechatpay-Timestamp": t, "Wechatpay-Nonce": nonce,
                "Wechatpay-Signature": rsa_sign(self.keys.platform, signed_message(t, nonce,
                                                                                     body)),
                "Wechatpay-Serial": self.keys.key_id,
                "Wechatpay-Signature-Type": SIGNATURE_TYPE,
                "Request-ID": secrets.token_hex(12)}

    def notification(self, event_type: str, original: str, resource: Json, *,
                     tamper: str = "") -> tuple[dict[str, str], bytes]:
        nonce = secrets.token_hex(6)  # 12 characters
        plain = msgspec.json.encode(resource)
        body = msgspec.json.encode({
            "id": secrets.token_hex(18), "create_time": _now_cst(),
            "resource_type": "encrypt-resource", "event_type": event_type,
            "summary": "支付成功" if original == "transaction" else "退款状态变化",
            "resource": {"original_type": original, "algorithm": "AEAD_AES_256_GCM",
                         "ciphertext": aes_gcm_encrypt(self.keys.apiv3, nonce, plain, original),
                         "associated_data": original, "nonce": nonce}})
        headers = self.signed_headers(body, ts=int(time.time()) - 3600 if tamper == "stale"
                                      else None)
        if tamper == "signature":
            headers["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + headers[
                "Wechatpay-Signature"][19:]
        return headers, body

    def answer(self, status: int, payload: Json | None) -> Response[bytes]:
        body = b"" if payload is None else msgspec.json.encode(payload)
        return Response(content=body, status_code=status, media_type="application/json",
                        headers=self.signed_headers(body))

    def error(self, status: int, code: str, message: str) -> Response[bytes]:
        return self.answer(status, {"code": code, "message": message})

    def refund_view(self, r: Json) -> Json:
        status = r["status"]
        if status == "PROCESSING" and time.time() >= r["done_at"]:
            r["status"] = status = "SUCCESS"
            r["success_time"] = _now_cst()
        out = {"refund_id": r["refund_id"], "out_refund_no": r["out_refund_no"],
               "transaction_id": r["transaction_id"], "out_trade_no": r["out_trade_no"],
               "channel": "ORIGINAL", "user_received_account": "支付用户零钱",
               "create_time": r["create_time"], "status": status,
               "amount": {"total": r["total"], "refund": r["refund"], "payer_total": r["total"],
                          "payer_refund": r["refund"], "currency": "CNY"}}
        if status == "SUCCESS":
            out["success_time"] = r.get("success_time") or r["create_time"]
        return out


def _now_cst() -> str:
    return dt.datetime.now(CST).replace(microsecond=0).isoformat()


def _auth_ok(sim: PaySim, request: Request[Any, Any, Any], body: bytes) -> bool:
    if not sim.config.verify_auth:
        return True
    value = request.headers.get("authorization", "")
    if not value.startswith(SIGNATURE_TYPE + " "):
        return False
    pairs = dict(p.split("=", 1) for p in value[len(SIGNATURE_TYPE) + 1:].split(",") if "=" in p)
    f = {k.strip(): v.strip().strip('"') for k, v in pairs.items()}
    if f.get("mchid") != sim.config.mchid or f.get("serial_no") != sim.keys.serial:
        return False
    ts = f.get("timestamp", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
        return False
    url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return rsa_verify(sim.merchant_public, signed_message(
        request.method, url, ts, f.get("nonce_str", ""), body), f.get("signature", ""))


async def _gate(sim: PaySim, request: Request[Any, Any, Any], body: bytes
                ) -> Response[bytes] | None:
    if sim.config.down:
        return sim.error(503, "SYSTEM_ERROR", "down")
    if sim.config.latency_ms > 0:
        await asyncio.sleep(sim.config.latency_ms * sim.rng.uniform(0.5, 1.5) / 1000)
    if not _auth_ok(sim, request, body):
        return sim.error(401, "SIGN_ERROR", "signature check failed")
    return None


# -- the API ------------------------------------------------------------------------


class _RefundAmount(msgspec.Struct):
    refund: int
    total: int
    currency: str = "CNY"


class _RefundIn(msgspec.Struct):
    out_refund_no: str
    amount: _RefundAmount
    transaction_id: str = ""
    out_trade_no: str = ""
    reason: str = ""
    notify_url: str = ""


@post("/v3/refund/domestic/refunds", status_code=200)
async def create_refund(request: Request[Any, Any, Any], sim: PaySim) -> Response[bytes]:
    body = await request.body()
    if (fault := await _gate(sim, request, body)) is not None:
        return fault
    try:
        req = msgspec.json.decode(body, type=_RefundIn)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return sim.error(400, "PARAM_ERROR", "bad body")
    old = sim.refunds.get(req.out_refund_no)
    if old is not None:
        old["requests"] += 1
    if sim.roll(sim.config.failure_rate):
        return sim.error(500, "SYSTEM_ERROR", "simulated failure, nothing done")
    if old is None:
        tx = sim.transactions.get(req.transaction_id) or next(
            (t for t in sim.transactions.values() if t["out_trade_no"] == req.out_trade_no), None)
        if tx is None:
            return sim.error(404, "RESOURCE_NOT_EXISTS", "no such order")
        left = tx["amount"] - sum(r["refund"] for r in sim.refunds.values()
                                  if r["transaction_id"] == tx["transaction_id"])
        if req.amount.refund > left or req.amount.total != tx["amount"]:
            return sim.error(400, "INVALID_REQUEST", "refund exceeds what is left")
        status = "PROCESSING" if sim.config.processing_s > 0 else "SUCCESS"
        if req.out_refund_no in sim.config.close_refunds:
            status = "CLOSED"
        old = sim.refunds[req.out_refund_no] = {
            "refund_id": sim.next_no("50"), "out_refund_no": req.out_refund_no,
            "transaction_id": tx["transaction_id"], "out_trade_no": tx["out_trade_no"],
            "refund": req.amount.refund, "total": tx["amount"], "status": status,
            "create_time": _now_cst(), "done_at": time.time() + sim.config.processing_s,
            "requests": 1, "effects": 1 if status != "CLOSED" else 0, "reason": req.reason}
    view = sim.refund_view(old)
    if sim.roll(sim.config.timeout_rate):
        await asyncio.sleep(sim.config.hang_s)  # done, then the answer is late
    return sim.answer(200, view)


@get("/v3/refund/domestic/refunds/{no:str}")
async def query_refund(no: str, request: Request[Any, Any, Any], sim: PaySim
                       ) -> Response[bytes]:
    if (fault := await _gate(sim, request, b"")) is not None:
        return fault
    r = sim.refunds.get(no)
    if r is None:
        return sim.error(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
    return sim.answer(200, sim.refund_view(r))


def _yuan(fen: int) -> str:
    return f"{fen / 100:.2f}"


def _bill(sim: PaySim, bill_date: str) -> bytes:
    head = ("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,"
            "交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,"
            "充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,"
            "费率备注")
    c = sim.config
    hidden = {t["transaction_id"] for t in sim.tamper if t["action"] == "hide_trade"}
    hidden_refunds = {t["out_refund_no"] for t in sim.tamper if t["action"] == "hide_refund"}
    amounts: dict[str, int] = {t["transaction_id"]: int(t["amount"]) for t in sim.tamper
                               if t["action"] == "amount"}
    lines = [head]
    count = total = refunded = 0

    def row(fields: list[str]) -> str:
        return ",".join("`" + f for f in fields)

    for tx in sim.transactions.values():
        if tx["success_time"][:10] != bill_date or tx["transaction_id"] in hidden:
            continue
        amount: int = amounts.get(tx["transaction_id"]) or tx["amount"]
        count += 1
        total += amount
        lines.append(row([tx["success_time"].replace("T", " ")[:19], c.appid, c.mchid, "0", "",
                          tx["transaction_id"], tx["out_trade_no"], "oSIMULATEDOPENID", "JSAPI",
                          "SUCCESS", "OTHERS", "CNY", _yuan(amount), "0.00", "0", "0", "0.00",
                          "0.00", "", "", "挂号费", tx["attach"], "0.00000", "0.60%",
                          _yuan(amount), "0.00", ""]))
    refunds = list(sim.refunds.values()) + [
        {"refund_id": "50" + secrets.token_hex(6), "out_refund_no": "RFX" + secrets.token_hex(6),
         "transaction_id": t["transaction_id"],
         "out_trade_no": sim.transactions.get(t["transaction_id"], {}).get("out_trade_no", ""),
         "refund": t["amount"], "status": "SUCCESS", "create_time": _now_cst()}
        for t in sim.tamper if t["action"] == "extra_refund"]
    for r in refunds:
        if r["create_time"][:10] != bill_date or r["out_refund_no"] in hidden_refunds:
            continue
        if r["status"] == "CLOSED":
            continue
        count += 1
        refunded += r["refund"]
        lines.append(row([r["create_time"].replace("T", " ")[:19], c.appid, c.mchid, "0", "",
                          r["transaction_id"], r["out_trade_no"], "oSIMULATEDOPENID", "JSAPI",
                          "REFUND", "OTHERS", "CNY", "0.00", "0.00", r["refund_id"],
                          r["out_refund_no"], _yuan(r["refund"]), "0.00", "ORIGINAL",
                          r["status"], "挂号费", "", "0.00000", "0.60%", "0.00",
                          _yuan(r["refund"]), ""]))
    lines.append("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额")
    lines.append(row([str(count), _yuan(total), _yuan(refunded), "0.00", "0.00000",
                      _yuan(total), _yuan(refunded)]))
    return ("\r\n".join(lines) + "\r\n").encode()


@get("/v3/bill/tradebill")
async def trade_bill(request: Request[Any, Any, Any], sim: PaySim) -> Response[bytes]:
    if (fault := await _gate(sim, request, b"")) is not None:
        return fault
    bill_date = request.query_params.get("bill_date") or ""
    try:
        dt.date.fromisoformat(bill_date)
    except ValueError:
        return sim.error(400, "PARAM_ERROR", "bill_date")
    raw = _bill(sim, bill_date)
    token = secrets.token_urlsafe(16)
    sim.bills[token] = gzip.compress(raw)
    base = str(request.base_url).rstrip("/")
    return sim.answer(200, {"hash_type": "SHA1", "hash_value": hashlib.sha1(raw).hexdigest(),
                            "download_url": f"{base}/v3/billdownload/file?token={token}"})


@get("/v3/billdownload/file")
async def download_bill(request: Request[Any, Any, Any], sim: PaySim) -> Response[bytes]:
    if (fault := await _gate(sim, request, b"")) is not None:
        return fault
    data = sim.bills.get(request.query_params.get("token") or "")
    if data is None:
        return Response(content=b"", status_code=404)
    return Response(content=data, status_code=200, media_type="application/octet-stream")


# -- admin ----------------------------------------------------------------------------


class PayIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    hold_id: str
    amount: int
    notify_url: str = ""
    deliver: bool = True
    #: "", "signature" (a forged one), "stale" (an hour old), "mchid" (another merchant).
    tamper: str = ""
    transaction_id: str = ""


#: WeChat Pay notifies again until answered 2xx (15 s ... 6 h over 24 h; scaled down here).
RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


async def _deliver(sim: PaySim, url: str, headers: dict[str, str], body: bytes) -> int:
    """Deliver (the caller gets the first answer) and, like WeChat Pay, deliver
    again in the background until some answer is 2xx, even if the caller left."""
    if not url:
        return 0
    first: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def attempts() -> None:
        sim.pending += 1
        try:
            for wait in (0.0, *RETRY_S):
                await asyncio.sleep(wait)
                try:
                    resp = await sim.http().post(
                        url, content=body, headers={**headers, "Content-Type": "application/json"})
                    code = resp.status_code
                except httpx.HTTPError:
                    code = 0
                sim.delivered.append(code)
                if not first.done():
                    first.set_result(code)
                if 200 <= code < 300:
                    return
        finally:
            sim.pending -= 1
            if not first.done():
                first.set_result(0)

    task = asyncio.create_task(attempts())
    sim._tasks.add(task)
    task.add_done_callback(sim._tasks.discard)
    return await asyncio.shield(first)


def _resource(sim: PaySim, tx: Json, *, mchid: str | None = None) -> Json:
    c = sim.config
    return {"appid": c.appid, "mchid": mchid or c.mchid, "out_trade_no": tx["out_trade_no"],
            "transaction_id": tx["transaction_id"], "trade_type": "JSAPI",
            "trade_state": "SUCCESS", "trade_state_desc": "支付成功", "bank_type": "OTHERS",
            "attach": tx["attach"], "success_time": tx["success_time"],
            "payer": {"openid": "oSIMULATEDOPENID"},
            "amount": {"total": tx["amount"], "payer_total": tx["amount"], "currency": "CNY",
                       "payer_currency": "CNY"}}


@post("/_sim/pay", status_code=200)
async def pay(data: PayIn, sim: PaySim) -> Json:
    tx: Json = {"transaction_id": data.transaction_id or sim.next_no("42"),
          "out_trade_no": order_no(data.hold_id), "attach": data.hold_id, "amount": data.amount,
          "success_time": _now_cst()}
    if data.tamper != "mchid":
        sim.transactions[tx["transaction_id"]] = tx
    headers, body = sim.notification(
        "TRANSACTION.SUCCESS", "transaction",
        _resource(sim, tx, mchid="1999999999" if data.tamper == "mchid" else None),
        tamper=data.tamper)
    tx["headers"], tx["body"] = headers, body.decode()
    status = await _deliver(sim, data.notify_url or sim.config.notify_url, headers, body) \
        if data.deliver else 0
    return {"transaction_id": tx["transaction_id"], "out_trade_no": tx["out_trade_no"],
            "status_code": status, "headers": headers, "body": body.decode()}


class Again(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    transaction_id: str = ""
    out_refund_no: str = ""
    notify_url: str = ""


@post("/_sim/notify", status_code=200)
async def notify_again(data: Again, sim: PaySim) -> Json:
    tx = sim.transactions.get(data.transaction_id)
    if tx is None:
        return {"status_code": 404}
    headers, body = sim.notification("TRANSACTION.SUCCESS", "transaction", _resource(sim, tx))
    return {"status_code": await _deliver(sim, data.notify_url or sim.config.notify_url,
                                          headers, body)}


@post("/_sim/refund-notify", status_code=200)
async def refund_notify(data: Again, sim: PaySim) -> Json:
    r = sim.refunds.get(data.out_refund_no)
    if r is None:
        return {"status_code": 404}
    view = sim.refund_view(r)
    resource = {"mchid": sim.config.mchid, "out_trade_no": r["out_trade_no"],
                "transaction_id": r["transaction_id"], "out_refund_no": r["out_refund_no"],
                "refund_id": r["refund_id"], "refund_status": view["status"],
                "user_received_account": "支付用户零钱",
                "amount": {"total": r["total"], "refund": r["refund"],
                           "payer_total": r["total"], "payer_refund": r["refund"]}}
    headers, body = sim.notification(f"REFUND.{view['status']}", "refund", resource)
    return {"status_code": await _deliver(sim, data.notify_url or sim.config.notify_url,
                                          headers, body),
            "headers": headers, "body": body.decode()}


class Tamper(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    action: str
    transaction_id: str = ""
    out_refund_no: str = ""
    amount: int = 0


@post("/_sim/bill/tamper", status_code=200)
async def tamper_bill(data: Tamper, sim: PaySim) -> dict[str, int]:
    sim.tamper.append(msgspec.to_builtins(data))
    return {"tampered": len(sim.tamper)}


@get("/_sim/transactions")
async def transactions(sim: PaySim) -> list[Json]:
    return [{k: v for k, v in t.items() if k not in ("headers", "body")}
            for t in sim.transactions.values()]


@get("/_sim/refunds")
async def refunds(sim: PaySim) -> list[Json]:
    return [{**{k: v for k, v in r.items() if k != "done_at"}, **sim.refund_view(r)}
            for r in sim.refunds.values()]


@get("/_sim/deliveries")
async def deliveries(sim: PaySim) -> dict[str, int]:
    """Notifications still being delivered (retried until answered 2xx)."""
    return {"pending": sim.pending, "delivered": len(sim.delivered)}


@get("/_sim/keys")
async def keys(sim: PaySim) -> Json:
    c = sim.config
    return {"mchid": c.mchid, "appid": c.appid, "apiv3_key": sim.keys.apiv3,
            "private_key": sim.keys.merchant_pem(), "serial": sim.keys.serial,
            "public_key": sim.keys.public_pem(), "public_key_id": sim.keys.key_id}


@get("/_sim/config")
async def read_config(sim: PaySim) -> PaySimConfig:
    return sim.config


@post("/_sim/config", status_code=200)
async def change_config(request: Request[Any, Any, Any], sim: PaySim) -> Response[bytes]:
    try:
        patch = msgspec.json.decode(await request.body(), type=dict[str, Any])
        merged = msgspec.convert({**msgspec.to_builtins(sim.config), **patch}, PaySimConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return Response(msgspec.json.encode({"error": str(exc)}), status_code=400)
    sim.config = merged
    sim.rng = random.Random(merged.seed)
    return Response(msgspec.json.encode(merged), media_type="application/json")


@post("/_sim/reset", status_code=200)
async def reset(sim: PaySim) -> dict[str, bool]:
    sim.reset()
    return {"reset": True}


def create_payment_app(config: PaySimConfig | None = None) -> Litestar:
    sim = PaySim(config or PaySimConfig())

    def provide() -> PaySim:
        return sim

    app = Litestar(
        route_handlers=[create_refund, query_refund, trade_bill, download_bill, pay,
                        notify_again, refund_notify, tamper_bill, transactions, refunds, keys,
                        deliveries,
                        read_config, change_config, reset],
        dependencies={"sim": Provide(provide, sync_to_thread=False)},
        openapi_config=None,
    )
    app.state.sim = sim
    return app


def sim_wechat_config(url: str, **overrides: Any) -> WechatPayConfig:
    """The client configuration that talks to the simulator at ``url``."""
    k = httpx.get(f"{url}/_sim/keys", timeout=10.0).json()
    return WechatPayConfig(mchid=k["mchid"], appid=k["appid"], apiv3_key=k["apiv3_key"],
                           private_key=k["private_key"], serial=k["serial"],
                           public_key=k["public_key"], public_key_id=k["public_key_id"],
                           base_url=url, **overrides)


def wxpay_env(config: WechatPayConfig) -> dict[str, str]:
    """``HAOYUAN_WXPAY_*`` for a process that should use ``config``."""
    return {"HAOYUAN_WXPAY_MCHID": config.mchid, "HAOYUAN_WXPAY_APPID": config.appid,
            "HAOYUAN_WXPAY_APIV3_KEY": config.apiv3_key,
            "HAOYUAN_WXPAY_PRIVATE_KEY": config.private_key,
            "HAOYUAN_WXPAY_SERIAL": config.serial, "HAOYUAN_WXPAY_PUBLIC_KEY": config.public_key,
            "HAOYUAN_WXPAY_PUBLIC_KEY_ID": config.public_key_id,
            "HAOYUAN_WXPAY_URL": config.base_url,
            "HAOYUAN_WXPAY_TIMEOUT_S": str(config.timeout_s)}


_CONFIG_ENV = "HAOYUAN_PAY_SIM_CONFIG"


def app_from_env() -> Litestar:
    return create_payment_app(msgspec.json.decode(os.environ.get(_CONFIG_ENV, "{}"),
                                                  type=PaySimConfig))


class PaymentSimulatorProcess(SimulatorProcess):
    """The payment simulator as a child process on a free loopback port."""

    module = "engine.testing.payment_simulator"

    def __init__(self, config: PaySimConfig | None = None, **kw: Any) -> None:
        super().__init__(config if config is not None else PaySimConfig(), **kw)

    def wechat_config(self, **overrides: Any) -> WechatPayConfig:
        return sim_wechat_config(self.url, **overrides)


def main(argv: list[str] | None = None) -> None:
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    parser = argparse.ArgumentParser(description="haoyuan WeChat Pay API v3 simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--config", default="{}", help="PaySimConfig as JSON")
    args = parser.parse_args(argv)
    msgspec.json.decode(args.config, type=PaySimConfig)  # fail early on a bad config
    os.environ[_CONFIG_ENV] = args.config
    Granian(target="engine.testing.payment_simulator:app_from_env", factory=True,
            address=args.host, port=args.port, interface=Interfaces.ASGI, workers=1,
            log_level=LogLevels.warning, workers_kill_timeout=2).serve()


if __name__ == "__main__":
    main()
