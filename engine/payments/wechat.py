"""WeChat Pay API v3 (微信支付), public-key mode: notifications, refunds, the daily bill.

The crypto is written here on ``cryptography`` (about 150 lines) rather than
taken from the ``wechatpayv3`` SDK, which the tests use as an oracle only:
the SDK's client hard-codes the production gateway, blocks (or owns its own
HTTP client), returns ``(code, text)`` tuples and bare exceptions, does not
check a notification's timestamp, cannot tell a forged notification from a
wrong key, and does not check the bill's hash; none of that fits a contract
with outcomes as values (``engine.payments.base``) or loopback-only tests.

What is checked, as WeChat Pay documents it:

- notifications and every 2xx response (bill downloads excepted, they are
  unsigned): ``Wechatpay-Signature`` is SHA256withRSA (PKCS#1 v1.5) by the
  WeChat Pay public key named by ``Wechatpay-Serial`` (``PUB_KEY_ID_...``)
  over ``timestamp\\nnonce\\nbody\\n``; ``Wechatpay-Timestamp`` within
  ``max_skew_s`` (5 minutes, as the official Go SDK) of our clock;
- a notification's ``resource`` is AEAD_AES_256_GCM under the APIv3 key
  (its 32 ASCII bytes), nonce and associated data as given; its ``mchid``
  and ``appid`` must be ours;
- requests carry ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid=...,
  nonce_str=..., signature=..., timestamp=..., serial_no=...``, the signature
  by the merchant API key over ``METHOD\\nurl\\ntimestamp\\nnonce\\nbody\\n``;
- the bill: gzip, SHA1 of the uncompressed file equal to ``hash_value``;
  every field prefixed with a backtick; amounts in yuan (to fen with Decimal).

Configuration (``WechatPayConfig.from_env``): ``HAOYUAN_WXPAY_MCHID``,
``HAOYUAN_WXPAY_APPID``, ``HAOYUAN_WXPAY_APIV3_KEY``,
``HAOYUAN_WXPAY_PRIVATE_KEY`` (the merchant API key, PEM),
``HAOYUAN_WXPAY_SERIAL`` (its certificate serial),
``HAOYUAN_WXPAY_PUBLIC_KEY`` (the WeChat Pay public key, PEM),
``HAOYUAN_WXPAY_PUBLIC_KEY_ID`` (``PUB_KEY_ID_...``), ``HAOYUAN_WXPAY_URL``
(default ``https://api.mch.weixin.qq.com``).
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import hmac
import io
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from urllib.parse import quote, urlsplit

import httpx
import msgspec
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.payments.base import (
    REASON_NOT_FOUND,
    REASON_TIMEOUT,
    InvalidNotification,
    PaymentNotice,
    PaymentProtocolError,
    PaymentUnavailable,
    RefundNotice,
    RefundResult,
    Statement,
    StatementNotReady,
    StatementRefund,
    StatementTrade,
)

__all__ = [
    "SIGNATURE_TYPE",
    "WechatPay",
    "WechatPayConfig",
    "aes_gcm_decrypt",
    "aes_gcm_encrypt",
    "authorization",
    "load_private_key",
    "load_public_key",
    "parse_bill",
    "rsa_sign",
    "rsa_verify",
    "signed_message",
    "verify_signed",
]

SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
GATEWAY = "https://api.mch.weixin.qq.com"
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


# -- crypto ------------------------------------------------------------------------


def _pem(text: str, kind: str) -> bytes:
    """PEM as given, or a bare base64 body wrapped as ``kind``."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        return text.encode()
    body = "".join(text.split())
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN " + kind + "-----\n" + "\n".join(lines)
            + "\n-----END " + kind + "-----\n").encode()


def load_private_key(text: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(_pem(text, "PRIVATE KEY"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the merchant API key must be an RSA key")
    return key


def load_public_key(text: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(_pem(text, "PUBLIC KEY"))
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the WeChat Pay public key must be an RSA key")
    return key


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, _PKCS1, _SHA256)).decode()


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), message, _PKCS1, _SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True


def signed_message(*lines: str | bytes) -> bytes:
    """Lines each ending in ``\\n`` (the last one too), as every v3 signature wants."""
    return b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)


def aes_gcm_decrypt(apiv3_key: str, nonce: str, ciphertext: str, associated_data: str) -> bytes:
    try:
        return AESGCM(apiv3_key.encode()).decrypt(
            nonce.encode(), base64.b64decode(ciphertext, validate=True),
            associated_data.encode() if associated_data else None)
    except (InvalidTag, ValueError) as exc:
        raise InvalidNotification("the resource does not decrypt") from exc


def aes_gcm_encrypt(apiv3_key: str, nonce: str, plaintext: bytes, associated_data: str) -> str:
    """The provider's side of ``aes_gcm_decrypt`` (the simulator)."""
    return base64.b64encode(AESGCM(apiv3_key.encode()).encrypt(
        nonce.encode(), plaintext, associated_data.encode() if associated_data else None)).decode()


def authorization(*, mchid: str, serial: str, key: rsa.RSAPrivateKey, method: str, url: str,
                  body: bytes, timestamp: int | None = None, nonce: str | None = None) -> str:
    """The ``Authorization`` header of one request (``url``: path and query, no host)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16).upper()
    sig = rsa_sign(key, signed_message(method.upper(), url, ts, nonce, body))
    return (f'{SIGNATURE_TYPE} mchid="{mchid}",nonce_str="{nonce}",signature="{sig}",'
            f'timestamp="{ts}",serial_no="{serial}"')


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def verify_signed(headers: Mapping[str, str], body: bytes, keys: Mapping[str, rsa.RSAPublicKey],
                  *, max_skew_s: int, now: float | None = None) -> None:
    """Raise InvalidNotification unless the ``Wechatpay-*`` headers sign ``body``."""
    kind = _header(headers, "Wechatpay-Signature-Type")
    if kind is not None and kind != SIGNATURE_TYPE:
        raise InvalidNotification("unsupported signature type")
    serial = _header(headers, "Wechatpay-Serial") or ""
    ts = _header(headers, "Wechatpay-Timestamp") or ""
    nonce = _header(headers, "Wechatpay-Nonce") or ""
    sig = _header(headers, "Wechatpay-Signature") or ""
    key = keys.get(serial)
    if key is None:
        raise InvalidNotification("unknown Wechatpay-Serial")
    if not ts.isdigit() or not nonce or not sig:
        raise InvalidNotification("missing signature headers")
    t = time.time() if now is None else now
    if abs(t - int(ts)) > max_skew_s:
        raise InvalidNotification("stale timestamp")
    if not rsa_verify(key, signed_message(ts, nonce, body), sig):
        raise InvalidNotification("bad signature")


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WechatPayConfig:
    mchid: str
    appid: str
    apiv3_key: str = field(repr=False)
    #: The merchant API private key (PEM).
    private_key: str = field(repr=False)
    #: The merchant API certificate's serial (``serial_no`` in Authorization).
    serial: str
    #: The WeChat Pay public key (PEM) and its id (``PUB_KEY_ID_...``).
    public_key: str
    public_key_id: str
    base_url: str = GATEWAY
    timeout_s: float = 5.0
    max_skew_s: int = 300

    _VARS = ("MCHID", "APPID", "APIV3_KEY", "PRIVATE_KEY", "SERIAL", "PUBLIC_KEY",
             "PUBLIC_KEY_ID")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WechatPayConfig | None:
        """From ``HAOYUAN_WXPAY_*``; None when ``HAOYUAN_WXPAY_MCHID`` is unset.
        Raises ValueError naming the first variable missing."""
        env = os.environ if environ is None else environ
        if not env.get("HAOYUAN_WXPAY_MCHID"):
            return None
        got: dict[str, str] = {}
        for v in cls._VARS:
            value = env.get(f"HAOYUAN_WXPAY_{v}", "")
            if not value:
                raise ValueError(f"HAOYUAN_WXPAY_{v} is not set")
            got[v.lower()] = value
        return cls(mchid=got["mchid"], appid=got["appid"], apiv3_key=got["apiv3_key"],
                   private_key=got["private_key"], serial=got["serial"],
                   public_key=got["public_key"], public_key_id=got["public_key_id"],
                   base_url=env.get("HAOYUAN_WXPAY_URL") or GATEWAY,
                   timeout_s=float(env.get("HAOYUAN_WXPAY_TIMEOUT_S") or 5.0))

    def problems(self) -> list[tuple[str, str]]:
        """What a production instance refuses (variable, reason; never a value)."""
        from engine.secret_strength import secret_problem

        out: list[tuple[str, str]] = []
        if len(self.apiv3_key.encode()) != 32:
            out.append(("HAOYUAN_WXPAY_APIV3_KEY", "must be 32 ASCII characters"))
        else:
            why = secret_problem(self.apiv3_key)
            if why is not None:
                out.append(("HAOYUAN_WXPAY_APIV3_KEY", why))
        try:
            if load_private_key(self.private_key).key_size < 2048:
                out.append(("HAOYUAN_WXPAY_PRIVATE_KEY", "an RSA key of at least 2048 bits"))
        except ValueError:
            out.append(("HAOYUAN_WXPAY_PRIVATE_KEY", "not an RSA private key (PEM)"))
        try:
            load_public_key(self.public_key)
        except ValueError:
            out.append(("HAOYUAN_WXPAY_PUBLIC_KEY", "not an RSA public key (PEM)"))
        if urlsplit(self.base_url).scheme != "https":
            out.append(("HAOYUAN_WXPAY_URL", "must be https"))
        return out


# -- decoding ---------------------------------------------------------------------------


class _Resource(msgspec.Struct):
    algorithm: str
    ciphertext: str
    nonce: str
    associated_data: str = ""
    original_type: str = ""


class _Envelope(msgspec.Struct):
    id: str
    event_type: str
    resource: _Resource
    resource_type: str = "encrypt-resource"
    create_time: str = ""
    summary: str = ""


class _Amount(msgspec.Struct):
    total: int | None = None
    refund: int | None = None
    currency: str = "CNY"


class _Transaction(msgspec.Struct):
    mchid: str
    out_trade_no: str
    transaction_id: str
    trade_state: str
    amount: _Amount
    appid: str = ""
    attach: str = ""
    success_time: str = ""


class _Refund(msgspec.Struct):
    out_refund_no: str
    refund_id: str = ""
    transaction_id: str = ""
    status: str = ""
    refund_status: str = ""
    mchid: str = ""
    amount: _Amount | None = None


class _Error(msgspec.Struct):
    code: str = ""
    message: str = ""


class _BillRef(msgspec.Struct):
    download_url: str
    hash_value: str
    hash_type: str = "SHA1"


_envelope = msgspec.json.Decoder(_Envelope)
_transaction = msgspec.json.Decoder(_Transaction)
_refund = msgspec.json.Decoder(_Refund)
_error = msgspec.json.Decoder(_Error)
_bill_ref = msgspec.json.Decoder(_BillRef)


def _error_code(body: bytes) -> str:
    try:
        return _error.decode(body).code or ""
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


def _refund_result(r: _Refund) -> RefundResult:
    status = r.status or r.refund_status
    amount = r.amount.refund if r.amount is not None else None
    if status == "SUCCESS":
        return RefundResult("accepted", r.refund_id or None, status, amount)
    if status in ("CLOSED", "ABNORMAL"):
        return RefundResult("rejected", r.refund_id or None, status, amount)
    return RefundResult("unknown", r.refund_id or None, status or "no_status", amount)


# -- the bill ------------------------------------------------------------------------------


def _fen(yuan: str) -> int:
    try:
        return int((Decimal(yuan or "0") * 100).to_integral_value())
    except InvalidOperation:
        raise PaymentProtocolError("a bill amount is not a number") from None


def parse_bill(text: str, bill_date: str) -> Statement:
    """The ALL trade bill: detail header, detail rows, summary header, summary row."""
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise PaymentProtocolError("the bill is empty")
    head = [c.strip() for c in rows[0]]
    col = {name: i for i, name in enumerate(head)}
    need = ("交易时间", "微信订单号", "商户订单号", "交易状态", "应结订单金额", "商户数据包",
            "微信退款单号", "商户退款单号", "退款金额", "退款状态")
    missing = [n for n in need if n not in col]
    if missing:
        raise PaymentProtocolError(f"the bill lacks columns {missing}")
    trades: list[StatementTrade] = []
    refunds: list[StatementRefund] = []
    summary: list[str] | None = None
    it = iter(rows[1:])
    for raw in it:
        if raw and raw[0].strip().startswith("总交易单数"):
            summary = next(it, None)
            break
        f = [c.strip().removeprefix("`") for c in raw]
        if len(f) < len(head):
            raise PaymentProtocolError("a bill line is short")
        state = f[col["交易状态"]]
        if state == "REFUND":
            refunds.append(StatementRefund(
                trade_time=f[col["交易时间"]], transaction_id=f[col["微信订单号"]],
                out_trade_no=f[col["商户订单号"]], refund_id=f[col["微信退款单号"]],
                out_refund_no=f[col["商户退款单号"]], refund=_fen(f[col["退款金额"]]),
                status=f[col["退款状态"]]))
        else:
            trades.append(StatementTrade(
                trade_time=f[col["交易时间"]], transaction_id=f[col["微信订单号"]],
                out_trade_no=f[col["商户订单号"]], amount=_fen(f[col["应结订单金额"]]),
                attach=f[col["商户数据包"]]))
    if summary is None:
        raise PaymentProtocolError("the bill has no summary line")
    s = [c.strip().removeprefix("`") for c in summary]
    try:
        count = int(s[0])
    except (ValueError, IndexError):
        raise PaymentProtocolError("the bill's summary is malformed") from None
    return Statement(bill_date=bill_date, trades=trades, refunds=refunds, total_count=count,
                     total_amount=_fen(s[1]) if len(s) > 1 else 0,
                     total_refund=_fen(s[2]) if len(s) > 2 else 0)


# -- the client ---------------------------------------------------------------------------


class _MaybeSent(Exception):
    pass


class WechatPay:
    """``PaymentProvider`` for WeChat Pay API v3 (merchant, public-key mode)."""

    name = "wechat"

    def __init__(self, config: WechatPayConfig, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._key = load_private_key(config.private_key)
        self._keys = {config.public_key_id: load_public_key(config.public_key)}
        base = config.base_url.rstrip("/")
        self._base = urlsplit(base)
        self._http = httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(config.timeout_s),
                                       transport=transport,
                                       headers={"Accept": "application/json",
                                                "User-Agent": "haoyuan"})

    async def __aenter__(self) -> WechatPay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- notifications -----------------------------------------------------------------
    def parse_notification(self, headers: Mapping[str, str], body: bytes
                           ) -> PaymentNotice | RefundNotice:
        c = self.config
        verify_signed(headers, body, self._keys, max_skew_s=c.max_skew_s)
        try:
            env = _envelope.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise InvalidNotification("not a notification envelope") from None
        if env.resource_type != "encrypt-resource" or env.resource.algorithm != \
                "AEAD_AES_256_GCM":
            raise InvalidNotification("unsupported resource encryption")
        r = env.resource
        plain = aes_gcm_decrypt(c.apiv3_key, r.nonce, r.ciphertext, r.associated_data)
        try:
            if env.event_type.startswith("REFUND."):
                rf = _refund.decode(plain)
                if rf.mchid and rf.mchid != c.mchid:
                    raise InvalidNotification("another merchant")
                return RefundNotice(
                    provider=self.name, out_refund_no=rf.out_refund_no, refund_id=rf.refund_id,
                    transaction_id=rf.transaction_id, status=rf.refund_status or rf.status,
                    amount=rf.amount.refund if rf.amount is not None else None)
            tx = _transaction.decode(plain)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise InvalidNotification("the resource is not a transaction or refund") from None
        if tx.mchid != c.mchid or (tx.appid and tx.appid != c.appid):
            raise InvalidNotification("another merchant or app")
        if tx.amount.total is None:
            raise InvalidNotification("no amount")
        return PaymentNotice(
            provider=self.name, transaction_id=tx.transaction_id, out_trade_no=tx.out_trade_no,
            hold_id=tx.attach, trade_state=tx.trade_state, amount=tx.amount.total,
            currency=tx.amount.currency or "CNY", paid_at=tx.success_time or env.create_time,
            notification_id=env.id)

    # -- refunds ---------------------------------------------------------------------------
    async def refund(self, out_refund_no: str, *, transaction_id: str, refund: int, total: int,
                     reason: str) -> RefundResult:
        body = msgspec.json.encode({
            "transaction_id": transaction_id, "out_refund_no": out_refund_no,
            "reason": reason[:80],
            "amount": {"refund": refund, "total": total, "currency": "CNY"}})
        try:
            resp = await self._send("POST", "/v3/refund/domestic/refunds", body)
        except _MaybeSent:
            return RefundResult("unknown", None, REASON_TIMEOUT)
        return self._refund_answer(resp)

    async def query_refund(self, out_refund_no: str) -> RefundResult:
        try:
            resp = await self._send(
                "GET", f"/v3/refund/domestic/refunds/{quote(out_refund_no, safe='')}", b"")
        except _MaybeSent:
            return RefundResult("unknown", None, REASON_TIMEOUT)
        if resp.status_code == 404:
            return RefundResult("rejected", None, REASON_NOT_FOUND)
        return self._refund_answer(resp)

    def _refund_answer(self, resp: httpx.Response) -> RefundResult:
        code = resp.status_code
        if code == 200:
            try:
                return _refund_result(_refund.decode(resp.content))
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise PaymentProtocolError("a refund answer is malformed") from None
        err = _error_code(resp.content) or f"http_{code}"
        if code == 429 or err == "FREQUENCY_LIMITED":
            raise PaymentUnavailable(f"refund: {err}", status_code=code)
        if code >= 500:
            # SYSTEM_ERROR does not prove nothing happened: look it up first.
            return RefundResult("unknown", None, err)
        return RefundResult("rejected", None, err)

    # -- the bill ----------------------------------------------------------------------------
    async def statement(self, bill_date: str) -> Statement:
        url = f"/v3/bill/tradebill?bill_date={bill_date}&bill_type=ALL&tar_type=GZIP"
        try:
            resp = await self._send("GET", url, b"")
        except _MaybeSent:
            raise PaymentUnavailable("the bill request timed out") from None
        if resp.status_code != 200:
            err = _error_code(resp.content) or f"http_{resp.status_code}"
            if err in ("NO_STATEMENT_EXIST", "STATEMENT_CREATING"):
                raise StatementNotReady(f"bill of {bill_date}: {err}")
            raise PaymentUnavailable(f"bill: {err}", status_code=resp.status_code)
        try:
            ref = _bill_ref.decode(resp.content)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise PaymentProtocolError("the bill answer is malformed") from None
        target = urlsplit(ref.download_url)
        if (target.scheme, target.netloc) != (self._base.scheme, self._base.netloc):
            raise PaymentProtocolError("the bill download leaves the gateway")
        path = target.path + (f"?{target.query}" if target.query else "")
        try:
            raw = await self._send("GET", path, b"", verify=False)  # downloads are unsigned
        except _MaybeSent:
            raise PaymentUnavailable("the bill download timed out") from None
        if raw.status_code != 200:
            raise PaymentUnavailable(f"bill download: HTTP {raw.status_code}",
                                     status_code=raw.status_code)
        data = raw.content
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if not hmac.compare_digest(hashlib.sha1(data).hexdigest(), ref.hash_value.lower()):
            raise PaymentProtocolError("the bill's SHA1 differs from hash_value")
        return parse_bill(data.decode("utf-8"), bill_date)

    # -- plumbing -------------------------------------------------------------------------------
    async def _send(self, method: str, url: str, body: bytes, *, verify: bool = True
                    ) -> httpx.Response:
        c = self.config
        prefix = self._base.path.rstrip("/")
        headers = {"Authorization": authorization(
            mchid=c.mchid, serial=c.serial, key=self._key, method=method, url=prefix + url,
            body=body), "Wechatpay-Serial": c.public_key_id}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            resp = await self._http.request(method, url, content=body or None, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise PaymentUnavailable(f"{method} {url}: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise _MaybeSent(f"{method} {url}: {type(exc).__name__}") from exc
        if verify and 200 <= resp.status_code < 300:
            try:
                verify_signed(resp.headers, resp.content, self._keys, max_skew_s=c.max_skew_s)
            except InvalidNotification as exc:
                raise PaymentProtocolError(f"an answer failed verification: {exc}") from None
        return resp
