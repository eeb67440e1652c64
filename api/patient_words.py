"""What a patient reads about a booking that did not end in a visit: why, in
words (Chinese, as the mini-program shows them), and where the money is."""

from __future__ import annotations

__all__ = ["reason_text", "refund_text"]

_REFUND = "挂号费将原路退回。"

#: The HIS's reasons for refusing a booking (OperationOutcome codes).
_HIS = {
    "doctor_stopped": "医生停诊，医院未能接受本次预约。",
    "patient_unknown": "医院未能登记就诊人信息，请核对就诊人姓名、证件号和手机号后重新预约。",
    "patient_ambiguous": "医院系统中该证件号对应多位就诊人，需要人工核实，请联系医院。",
}

#: Why the engine ended a booking (the cancel or refund reason).
_ENDED = {
    "patient": "您已取消本次预约。",
    "his_cancelled": "本次预约已在医院窗口或电话取消。",
    "conflict": "号源冲突，本次预约未能保留。",
    "expired": "支付完成时该号源已被他人预约。",
    "duplicate": "该就诊人当天已有同科室的预约。",
    "suspended": "医生停诊，本次预约已取消。",
    "paused": "支付完成时该号源已暂停放号，本次预约未能完成。",
}

_REFUND_STATES = {
    "due": "退款待处理",
    "requested": "退款处理中",
    "succeeded": "已退款",
    "failed": "退款遇到问题，工作人员正在处理",
}


def reason_text(status: str, status_reason: str | None, his_status: str,
                his_reason: str | None) -> str | None:
    """The sentence for a booking that ended without a visit (None while it stands)."""
    if his_status == "rejected":
        return _HIS.get(his_reason or "", "医院未能接受本次预约。") + _REFUND
    if status == "booked":
        return None
    why = status_reason or ""
    if why.startswith("his_rejected"):
        code = why.partition(":")[2]
        return _HIS.get(code, "医院未能接受本次预约。") + _REFUND
    text = _ENDED.get(why)
    if text is None:
        text = _ENDED["suspended"] if status == "cancelled" else "本次预约未能完成。"
    return text + _REFUND


def refund_text(state: str) -> str:
    return _REFUND_STATES.get(state, state)
