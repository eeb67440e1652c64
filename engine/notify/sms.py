"""An SMS gateway, in the shape most Chinese SMS services share.

``POST {url}/sms/send`` with ``Authorization: Bearer <key>`` and
``{"phone", "template", "params": {...}, "out_id"}``; ``{"code": "OK"}``
is sent, ``{"code": "REJECTED"}`` (a number that refuses or does not
exist) is refused, anything else is retried. ``out_id`` is the dedup key:
the gateway (and our simulator) sends a repeated ``out_id`` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import msgspec

from engine.notify.base import Channel, Message, SendResult

__all__ = ["SmsGateway", "SmsGatewayConfig"]


@dataclass(frozen=True, slots=True)
class SmsGatewayConfig:
    url: str
    key: str = field(repr=False)
    #: Our kind -> the gateway's template code.
    templates: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 5.0


class _Answer(msgspec.Struct):
    code: str = ""
    message: str = ""


class SmsGateway:
    channel: Channel = "sms"

    def __init__(self, config: SmsGatewayConfig) -> None:
        self.config = config
        self._http = httpx.AsyncClient(base_url=config.url, timeout=config.timeout_s,
                                       headers={"Authorization": f"Bearer {config.key}"})

    async def send(self, msg: Message) -> SendResult:
        body = msgspec.json.encode({
            "phone": msg.to, "template": self.config.templates.get(msg.kind, msg.kind),
            "params": msg.data, "out_id": msg.dedup_key})
        r = await self._http.post("/sms/send", content=body,
                                  headers={"Content-Type": "application/json"})
        if r.status_code >= 500 or r.status_code == 429:
            return SendResult("retry", f"HTTP {r.status_code}")
        a = msgspec.json.decode(r.content, type=_Answer) if r.content else _Answer()
        if r.status_code == 200 and a.code == "OK":
            return SendResult("sent")
        if a.code == "REJECTED":
            return SendResult("refused", a.message[:100])
        return SendResult("retry", f"HTTP {r.status_code} {a.code}")

    async def aclose(self) -> None:
        await self._http.aclose()
