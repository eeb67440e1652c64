"""WeChat Pay API v3: our crypto against the wechatpayv3 SDK (a test oracle),
the client against the simulator (a real process): notifications, refunds
and their outcomes under faults, the daily bill."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import gzip
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from wechatpayv3 import WeChatPay as SdkWeChatPay
from wechatpayv3 import WeChatPayType
from wechatpayv3 import utils as sdk

from engine.payments.base import (
    InvalidNotification,
    PaymentNotice,
    PaymentProtocolError,
    RefundNotice,
    order_no,
    refund_no,
)
from engine.payments.wechat import (
    WechatPay,
    WechatPayConfig,
    aes_gcm_decrypt,
    aes_gcm_encrypt,
    authorization,
    load_private_key,
    parse_bill,
    rsa_sign,
    signed_message,
)
from engine.testing.payment_simulator import PaymentSimulatorProcess, PaySimConfig

CST = dt.timezone(dt.timedelta(hours=8))


@pytest.fixture(scope="module")
def sim() -> Iterator[PaymentSimulatorProcess]:
    with PaymentSimulatorProcess(PaySimConfig(seed=3)) as proc:
        yield proc


@pytest.fixture(scope="module")
def cfg(sim: PaymentSimulatorProcess) -> WechatPayConfig:
    return sim.wechat_config(timeout_s=1.0)


@pytest.fixture
async def wx(sim: PaymentSimulatorProcess, cfg: WechatPayConfig) -> AsyncIterator[WechatPay]:
    admin(sim, "reset")
    async with WechatPay(cfg) as client:
        yield client


def admin(sim: PaymentSimulatorProcess, path: str, **body: Any) -> Any:
    r = httpx.post(f"{sim.url}/_sim/{path}", content=msgspec.json.encode(body), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def fetch(sim: PaymentSimulatorProcess, path: str) -> Any:
    return httpx.get(f"{sim.url}/_sim/{path}", timeout=30).json()


def today() -> str:
    return dt.datetime.now(CST).date().isoformat()


# -- our crypto against the SDK's ---------------------------------------------------------


def test_request_signature_matches_the_sdk(cfg: WechatPayConfig) -> None:
    key = load_private_key(cfg.private_key)
    body = '{"out_refund_no":"RF1","amount":{"refund":1,"total":1,"currency":"CNY"}}'
    ours = authorization(mchid=cfg.mchid, serial=cfg.serial, key=key, method="POST",
                         url="/v3/refund/domestic/refunds", body=body.encode(),
                         timestamp=int(time.time()), nonce="N0NCE")
    theirs = sdk.build_authorization("/v3/refund/domestic/refunds", "POST", cfg.mchid,
                                     cfg.serial, sdk.load_private_key(cfg.private_key),
                                     data=body, nonce_str="N0NCE")
    # PKCS#1 v1.5 is deterministic: the same message gives the same header
    # (unless the second ticked over between the two).
    if ours.split("timestamp=")[1] == theirs.split("timestamp=")[1]:
        assert ours == theirs
    msg = signed_message("GET", "/v3/bill/tradebill?bill_date=2026-12-01", "1700000000", "n", b"")
    assert rsa_sign(key, msg) == sdk.rsa_sign(sdk.load_private_key(cfg.private_key),
                                              msg.decode())


def test_resource_encryption_matches_the_sdk(cfg: WechatPayConfig) -> None:
    plain = '{"transaction_id":"4200","amount":{"total":5000}}'
    ct = aes_gcm_encrypt(cfg.apiv3_key, "abcdefghijkl", plain.encode(), "transaction")
    assert sdk.aes_decrypt("abcdefghijkl", ct, "transaction", cfg.apiv3_key) == plain
    assert aes_gcm_decrypt(cfg.apiv3_key, "abcdefghijkl", ct, "transaction") == plain.encode()
    with pytest.raises(InvalidNotification):
        aes_gcm_decrypt(cfg.apiv3_key, "abcdefghijkl", ct, "refund")  # other AAD


def test_the_sdk_accepts_the_simulators_notifications(
        sim: PaymentSimulatorProcess, cfg: WechatPayConfig) -> None:
    """The simulator speaks WeChat Pay's protocol, as the official SDK reads it."""
    sdk_client = SdkWeChatPay(
        wechatpay_type=WeChatPayType.MINIPROG, mchid=cfg.mchid, private_key=cfg.private_key,
        cert_serial_no=cfg.serial, appid=cfg.appid, apiv3_key=cfg.apiv3_key,
        public_key=cfg.public_key, public_key_id=cfg.public_key_id)
    got = admin(sim, "pay", hold_id="4.S1.9", amount=5000, deliver=False)
    out = sdk_client.callback(got["headers"], got["body"])
    assert out is not None and out["resource"]["transaction_id"] == got["transaction_id"]
    assert out["resource"]["attach"] == "4.S1.9"
    assert out["resource"]["out_trade_no"] == order_no("4.S1.9")
    forged = admin(sim, "pay", hold_id="4.S1.9", amount=5000, deliver=False, tamper="signature")
    assert sdk_client.callback(forged["headers"], forged["body"]) is None


# -- notifications ------------------------------------------------------------------------


async def test_a_payment_notification_verifies_and_decrypts(
        sim: PaymentSimulatorProcess, wx: WechatPay) -> None:
    got = admin(sim, "pay", hold_id="12.S20261201-D01-AM.1764460800000123", amount=5000,
                deliver=False)
    n = wx.parse_notification(got["headers"], got["body"].encode())
    assert isinstance(n, PaymentNotice)
    assert (n.transaction_id, n.hold_id, n.amount, n.trade_state) == (
        got["transaction_id"], "12.S20261201-D01-AM.1764460800000123", 5000, "SUCCESS")
    assert n.out_trade_no == order_no(n.hold_id) and len(n.out_trade_no) == 32
    # Header names in any case (Litestar lower-cases them).
    lower = {k.lower(): v for k, v in got["headers"].items()}
    assert wx.parse_notification(lower, got["body"].encode()) == n


@pytest.mark.parametrize("tamper", ["signature", "stale", "mchid"])
async def test_bad_notifications_are_refused(sim: PaymentSimulatorProcess, wx: WechatPay,
                                             tamper: str) -> None:
    got = admin(sim, "pay", hold_id="1.S.1", amount=100, deliver=False, tamper=tamper)
    with pytest.raises(InvalidNotification):
        wx.parse_notification(got["headers"], got["body"].encode())


async def test_a_changed_body_or_unknown_key_is_refused(
        sim: PaymentSimulatorProcess, wx: WechatPay) -> None:
    got = admin(sim, "pay", hold_id="1.S.2", amount=100, deliver=False)
    body = got["body"].replace("TRANSACTION.SUCCESS", "TRANSACTION.SUCCES ")
    with pytest.raises(InvalidNotification, match="signature"):
        wx.parse_notification(got["headers"], body.encode())
    with pytest.raises(InvalidNotification, match="Serial"):
        wx.parse_notification({**got["headers"], "Wechatpay-Serial": "PUB_KEY_ID_OTHER"},
                              got["body"].encode())
    with pytest.raises(InvalidNotification):
        wx.parse_notification({}, got["body"].encode())


async def test_refund_notifications(sim: PaymentSimulatorProcess, wx: WechatPay) -> None:
    got = admin(sim, "pay", hold_id="1.S.3", amount=700, deliver=False)
    no = refund_no("wechat", got["transaction_id"])
    await wx.refund(no, transaction_id=got["transaction_id"], refund=700, total=700, reason="r")
    note = admin(sim, "refund-notify", out_refund_no=no)
    n = wx.parse_notification(note["headers"], note["body"].encode())
    assert isinstance(n, RefundNotice)
    assert (n.out_refund_no, n.status, n.amount, n.transaction_id) == (
        no, "SUCCESS", 700, got["transaction_id"])


# -- refunds -------------------------------------------------------------------------------


async def test_a_refund_number_refunds_once(sim: PaymentSimulatorProcess, wx: WechatPay) -> None:
    got = admin(sim, "pay", hold_id="2.S.1", amount=5000, deliver=False)
    txn = got["transaction_id"]
    no = refund_no("wechat", txn)
    assert (await wx.query_refund(no)).reason == "not_found"
    first = await wx.refund(no, transaction_id=txn, refund=5000, total=5000, reason="退款")
    again = await wx.refund(no, transaction_id=txn, refund=5000, total=5000, reason="退款")
    assert first.outcome == again.outcome == "accepted" and first.refund_id == again.refund_id
    assert (await wx.query_refund(no)).outcome == "accepted"
    other = await wx.refund(refund_no("wechat", txn + "x"), transaction_id=txn, refund=1,
                            total=5000, reason="x")
    assert (other.outcome, other.reason) == ("rejected", "INVALID_REQUEST")  # nothing left
    [r] = fetch(sim, "refunds")
    assert (r["requests"], r["effects"]) == (2, 1)


async def test_refund_outcomes_under_faults(sim: PaymentSimulatorProcess, wx: WechatPay) -> None:
    pays = [admin(sim, "pay", hold_id=f"2.S.{i}", amount=100, deliver=False)["transaction_id"]
            for i in range(10, 14)]
    nos = [refund_no("wechat", t) for t in pays]
    admin(sim, "config", failure_rate=1.0)
    r = await wx.refund(nos[0], transaction_id=pays[0], refund=100, total=100, reason="x")
    assert (r.outcome, r.reason) == ("unknown", "SYSTEM_ERROR")
    assert (await wx.query_refund(nos[0])).reason == "not_found"  # nothing happened
    admin(sim, "config", failure_rate=0.0, timeout_rate=1.0, hang_s=2.0)
    r = await wx.refund(nos[1], transaction_id=pays[1], refund=100, total=100, reason="x")
    assert (r.outcome, r.reason) == ("unknown", "timeout")
    admin(sim, "config", timeout_rate=0.0)
    assert (await wx.query_refund(nos[1])).outcome == "accepted"  # it was done
    admin(sim, "config", processing_s=0.5, close_refunds=[nos[3]])
    r = await wx.refund(nos[2], transaction_id=pays[2], refund=100, total=100, reason="x")
    assert (r.outcome, r.reason) == ("unknown", "PROCESSING")
    r = await wx.refund(nos[3], transaction_id=pays[3], refund=100, total=100, reason="x")
    assert (r.outcome, r.reason) == ("rejected", "CLOSED")
    await asyncio.sleep(0.6)
    assert (await wx.query_refund(nos[2])).outcome == "accepted"
    admin(sim, "config", processing_s=0.0, close_refunds=[], down=True)
    from engine.payments.base import PaymentUnavailable

    r = await wx.refund(nos[2], transaction_id=pays[2], refund=100, total=100, reason="x")
    assert r.outcome == "unknown"  # 503 SYSTEM_ERROR: never proof that nothing happened
    admin(sim, "config", down=False)
    dead = WechatPay(dataclasses.replace(wx.config, base_url="http://127.0.0.1:9"))
    with pytest.raises(PaymentUnavailable):
        await dead.refund(nos[2], transaction_id=pays[2], refund=100, total=100, reason="x")
    await dead.aclose()


async def test_an_answer_signed_by_another_key_is_not_believed(
        sim: PaymentSimulatorProcess, cfg: WechatPayConfig) -> None:
    other = PaymentSimulatorProcess(PaySimConfig()).start()
    try:
        foreign = other.wechat_config()
        async with WechatPay(WechatPayConfig(
                mchid=cfg.mchid, appid=cfg.appid, apiv3_key=cfg.apiv3_key,
                private_key=cfg.private_key, serial=cfg.serial,
                public_key=foreign.public_key, public_key_id=cfg.public_key_id,
                base_url=sim.url)) as wx:
            # An error answer carries nothing to believe; a 2xx must verify.
            assert (await wx.query_refund("RF0")).reason == "not_found"
            got = admin(sim, "pay", hold_id="2.S.99", amount=100, deliver=False)
            with pytest.raises(PaymentProtocolError):
                await wx.refund("RFZ", transaction_id=got["transaction_id"], refund=100,
                                total=100, reason="x")
    finally:
        other.stop()


# -- the bill --------------------------------------------------------------------------------


async def test_the_daily_bill(sim: PaymentSimulatorProcess, wx: WechatPay) -> None:
    a = admin(sim, "pay", hold_id="3.S.1", amount=5000, deliver=False)["transaction_id"]
    b = admin(sim, "pay", hold_id="3.S.2", amount=1234, deliver=False)["transaction_id"]
    await wx.refund(refund_no("wechat", b), transaction_id=b, refund=1234, total=1234,
                    reason="x")
    s = await wx.statement(today())
    assert {(t.transaction_id, t.amount, t.attach) for t in s.trades} == {
        (a, 5000, "3.S.1"), (b, 1234, "3.S.2")}
    assert [(r.transaction_id, r.refund, r.out_refund_no) for r in s.refunds] == [
        (b, 1234, refund_no("wechat", b))]
    assert (s.total_count, s.total_amount, s.total_refund) == (3, 6234, 1234)
    empty = await wx.statement("2020-01-01")
    assert empty.trades == [] and empty.total_count == 0


def test_bill_parsing_rejects_a_wrong_hash_and_reads_the_official_sample() -> None:
    sample = (
        "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,"
        "付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
        "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注\n"
        "`2022-03-21 13:51:31,`wxfdc955f7104ad557,`180023671,`176531292,`,"
        "`420000612032130748613220688,`2021WERUN1647840687637,`oZWaCKXip5njeEiloC4oeOV1TTsk,"
        "`JSAPI,`SUCCESS,`OTHERS,`CNY,`0.01,`0.00,`0,`0,`0.00,`0.00,`,`,`微信云托管支付测试,`,"
        "`0.00000,`0.90%,`0.01,`0.00,`\n"
        "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\n"
        "`12,`0.06,`0.06,`0.00,`0.00000,`0.06,`0.06\n")
    s = parse_bill(sample, "2022-03-21")
    assert [(t.transaction_id, t.amount) for t in s.trades] == [
        ("420000612032130748613220688", 1)]
    assert (s.total_count, s.total_amount, s.total_refund) == (12, 6, 6)
    assert hashlib.sha1(gzip.decompress(gzip.compress(sample.encode()))).hexdigest()
    with pytest.raises(PaymentProtocolError):
        parse_bill(sample.replace("总交易单数", "合计"), "2022-03-21")


def test_production_refuses_a_weak_apiv3_key(cfg: WechatPayConfig) -> None:
    weak = dataclasses.replace(cfg, apiv3_key="a" * 32, base_url="http://127.0.0.1:1")
    names = {v for v, _ in weak.problems()}
    assert names == {"HAOYUAN_WXPAY_APIV3_KEY", "HAOYUAN_WXPAY_URL"}
    assert dataclasses.replace(cfg, base_url="https://api.mch.weixin.qq.com").problems() == []


def test_refund_notice_type() -> None:
    assert RefundNotice(provider="wechat", out_refund_no="RF", refund_id="1", transaction_id="2",
                        status="SUCCESS").amount is None
