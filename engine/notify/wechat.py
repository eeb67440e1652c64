"""The WeChat mini-program subscribe message (订阅消息), as the real one is sent.

``GET /cgi-bin/token?grant_type=client_credential&appid=&secret=`` gives an
access token (kept until shortly before ``expires_in``);
``POST /cgi-bin/message/subscribe/send?access_token=`` with ``touser`` (the
openid), ``template_id``, ``page``, ``data`` (``{field: {"value": ...}}``)
and ``miniprogram_state``. ``errcode`` 0 is sent; 43101 (the user has not
subscribed or withdrew) is refused; 40001/42001 (the token is stale) fetch a
new token and retry once; anything else is retried later. The dedup key
travels in ``X-Haoyuan-Dedup`` (WeChat ignores it; our simulator drops a
repeat by it: WeChat itself has no idempotency key, so a message whose
answer was lost may be shown twice there, which the stored deliveries
record as one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import msgspec

from engine.notify.base import Channel, Message, SendResult

__all__ = ["DEFAULT_FIELDS", "WechatSubscribe", "WechatSubscribeConfig"]

#: Our template fields -> the template's keys (a hospital's templates differ:
#: ``HAOYUAN_NOTIFY_WECHAT_FIELDS`` maps them).
DEFAULT_FIELDS = {"department": "thing1", "doctor": "thing2", "time": "time3",
                  "unit": "number4", "patient": "name5", "deadline": "time6",
                  "reason": "thing7", "amount": "amount8", "state": "phrase9"}


@dataclass(frozen=True, slots=True)
class WechatSubscribeConfig:
    base_url: str
    appid: str
    secret: str = field(repr=False)
    #: Our kind -> the subscribe message template id.
    templates: dict[str, str]
    fields: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    page: str = "pages/bookings/index"
    state: str = "formal"
    timeout_s: float = 5.0


class _Token(msgspec.Struct):
    access_token: str = ""
    expires_in: int = 0
    errcode: int = 0
    errmsg: str = ""


class _Answer(msgspec.Struct):
    errcode: int = 0
    errmsg: str = ""


class WechatSubscribe:
    channel: Channel = "wechat"

    def __init__(self, config: WechatSubscribeConfig) -> None:
        self.config = config
        self._http = httpx.AsyncClient(base_url=config.base_url, timeout=config.timeout_s)
        self._token = ""
        self._until = 0.0

    async def _access_token(self, *, fresh: bool = False) -> str:
        if fresh or not self._token or time.monotonic() >= self._until:
            r = await self._http.get("/cgi-bin/token", params={
                "grant_type": "client_credential", "appid": self.config.appid,
                "secret": self.config.secret})
            t = msgspec.json.decode(r.content, type=_Token)
            if r.status_code != 200 or not t.access_token:
                raise httpx.HTTPError(f"token: HTTP {r.status_code} errcode {t.errcode}")
            self._token = t.access_token
            self._until = time.monotonic() + max(60, t.expires_in - 300)
        return self._token

    async def send(self, msg: Message) -> SendResult:
        template = self.config.templates.get(msg.kind)
        if not template:
            return SendResult("refused", f"no template for {msg.kind}")
        body = msgspec.json.encode({
            "touser": msg.to, "template_id": template, "page": msg.page or self.config.page,
            "miniprogram_state": self.config.state,
            "data": {self.config.fields.get(k, k): {"value": v} for k, v in msg.data.items()}})
        for attempt in range(2):
            token = await self._access_token(fresh=attempt > 0)
            r = await self._http.post(
                "/cgi-bin/message/subscribe/send", params={"access_token": token},
                content=body, headers={"Content-Type": "application/json",
                                       "X-Haoyuan-Dedup": msg.dedup_key})
            if r.status_code >= 500:
                return SendResult("retry", f"HTTP {r.status_code}")
            a = msgspec.json.decode(r.content, type=_Answer)
            if a.errcode == 0:
                return SendResult("sent")
            if a.errcode in (40001, 42001) and attempt == 0:
                continue
            if a.errcode == 43101:
                return SendResult("refused", "the user has not subscribed (43101)")
            return SendResult("retry", f"errcode {a.errcode}")
        return SendResult("retry", "the access token was refused twice")

    async def aclose(self) -> None:
        await self._http.aclose()
