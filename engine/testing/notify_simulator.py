"""A simulator of what patients receive: WeChat subscribe messages and SMS.

WeChat: ``GET /cgi-bin/token`` (the configured appid and secret) and
``POST /cgi-bin/message/subscribe/send?access_token=`` (the shape of
``engine.notify.wechat``); an openid in ``refuse_openids`` is answered
43101. SMS: ``POST /sms/send`` (bearer ``sms_key``). Every message is
recorded under its dedup key (``X-Haoyuan-Dedup``, or the SMS ``out_id``):
a repeat is answered as sent and counted, never recorded twice.

Faults (``NotifySimConfig``): ``latency_ms`` delays every answer;
``error_rate`` answers 500 without recording; ``timeout_rate`` records and
*then* sleeps ``hang_s`` (the sender sees a timeout after the message went
out, and sends it again with the same key).

Admin: ``GET /_sim/messages`` (each message once, with ``repeats``),
``POST /_sim/config`` (merge fields), ``POST /_sim/reset``.

Run it: ``python -m engine.testing.notify_simulator --port 8093``, or from
tests :class:`NotifySimulatorProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post

from engine.testing.his_simulator import SimulatorProcess

__all__ = ["NotifySimConfig", "NotifySimulatorProcess", "create_notify_app"]


class NotifySimConfig(msgspec.Struct, kw_only=True):
    appid: str = "wxsimulatedappid"
    secret: str = "simulated-wechat-secret-0123456789"
    sms_key: str = "simulated-sms-key-0123456789"
    refuse_openids: list[str] = []
    latency_ms: int = 0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 2.0
    token_ttl_s: int = 7200
    seed: int = 1


@dataclass
class _State:
    config: NotifySimConfig
    rng: random.Random
    tokens: set[str] = field(default_factory=set)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def _state(request: Request[Any, Any, Any]) -> _State:
    st: _State = request.app.state.sim
    return st


async def _faults(st: _State) -> bool:
    """Latency, then an error (True: answer 500 and record nothing)."""
    if st.config.latency_ms:
        await asyncio.sleep(st.config.latency_ms * st.rng.uniform(0.5, 1.5) / 1000)
    return st.rng.random() < st.config.error_rate


def _record(st: _State, key: str, entry: dict[str, Any]) -> bool:
    """Record a message once per key; False for a repeat."""
    if key in st.messages:
        st.messages[key]["repeats"] += 1
        return False
    st.messages[key] = {**entry, "dedup_key": key, "repeats": 0}
    st.order.append(key)
    return True


@get("/cgi-bin/token")
async def token(request: Request[Any, Any, Any], appid: str = "", secret: str = "",
                grant_type: str = "") -> dict[str, Any]:
    st = _state(request)
    if grant_type != "client_credential" or appid != st.config.appid \
            or secret != st.config.secret:
        return {"errcode": 40013, "errmsg": "invalid appid"}
    t = secrets.token_hex(16)
    st.tokens.add(t)
    return {"access_token": t, "expires_in": st.config.token_ttl_s}


@post("/cgi-bin/message/subscribe/send", status_code=200)
async def subscribe_send(request: Request[Any, Any, Any], access_token: str = "") -> Response[Any]:
    st = _state(request)
    if await _faults(st):
        return Response({"errcode": -1, "errmsg": "system busy"}, status_code=500)
    if access_token not in st.tokens:
        return Response({"errcode": 40001, "errmsg": "invalid credential"})
    body = msgspec.json.decode(await request.body())
    if body.get("touser") in st.config.refuse_openids:
        return Response({"errcode": 43101, "errmsg": "user refuse to accept the msg"})
    key = request.headers.get("x-haoyuan-dedup") or secrets.token_hex(8)
    _record(st, key, {"channel": "wechat", "to": body.get("touser"),
                      "template_id": body.get("template_id"), "page": body.get("page"),
                      "data": body.get("data")})
    if st.rng.random() < st.config.timeout_rate:
        await asyncio.sleep(st.config.hang_s)
    return Response({"errcode": 0, "errmsg": "ok"})


@post("/sms/send", status_code=200)
async def sms_send(request: Request[Any, Any, Any]) -> Response[Any]:
    st = _state(request)
    if request.headers.get("authorization") != f"Bearer {st.config.sms_key}":
        return Response({"code": "UNAUTHORIZED"}, status_code=401)
    if await _faults(st):
        return Response({"code": "BUSY"}, status_code=500)
    body = msgspec.json.decode(await request.body())
    phone = str(body.get("phone", ""))
    if not (phone.isdigit() and len(phone) == 11):
        return Response({"code": "REJECTED", "message": "not a mobile number"})
    key = str(body.get("out_id") or secrets.token_hex(8))
    _record(st, key, {"channel": "sms", "to": phone, "template_id": body.get("template"),
                      "data": body.get("params")})
    if st.rng.random() < st.config.timeout_rate:
        await asyncio.sleep(st.config.hang_s)
    return Response({"code": "OK"})


@get("/_sim/messages")
async def messages(request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
    st = _state(request)
    return [st.messages[k] for k in st.order]


@get("/_sim/config")
async def show_config(request: Request[Any, Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(_state(request).config)
    return out


@post("/_sim/config", status_code=200)
async def set_config(request: Request[Any, Any, Any]) -> dict[str, Any]:
    st = _state(request)
    merged = {**msgspec.to_builtins(st.config), **msgspec.json.decode(await request.body())}
    st.config = msgspec.convert(merged, NotifySimConfig)
    out: dict[str, Any] = msgspec.to_builtins(st.config)
    return out


@post("/_sim/reset", status_code=200)
async def reset(request: Request[Any, Any, Any]) -> dict[str, str]:
    st = _state(request)
    st.messages.clear()
    st.order.clear()
    return {"status": "reset"}


def create_notify_app(config: NotifySimConfig | None = None) -> Litestar:
    cfg = config or NotifySimConfig()
    app = Litestar([token, subscribe_send, sms_send, messages, show_config, set_config, reset],
                   debug=False)
    app.state.sim = _State(cfg, random.Random(cfg.seed))
    return app


_CONFIG_ENV = "HAOYUAN_NOTIFY_SIM_CONFIG"


def app_from_env() -> Litestar:
    return create_notify_app(msgspec.json.decode(os.environ.get(_CONFIG_ENV, "{}"),
                                                 type=NotifySimConfig))


class NotifySimulatorProcess(SimulatorProcess):
    """The simulator as a child process on a free loopback port."""

    module = "engine.testing.notify_simulator"

    def __init__(self, config: NotifySimConfig | None = None, **kw: Any) -> None:
        super().__init__(config if config is not None else NotifySimConfig(), **kw)

    def env(self, **templates: str) -> dict[str, str]:
        """The ``HAOYUAN_NOTIFY_*`` settings that point the notifier here."""
        c = self.config
        assert isinstance(c, NotifySimConfig)
        tpl = templates or {k: f"tpl-{k}" for k in (
            "booking_confirmed", "waitlist_offer", "offer_passed_on", "suspension",
            "cancellation", "refund", "visit_reminder")}
        return {"HAOYUAN_NOTIFY_WECHAT_URL": self.url, "HAOYUAN_NOTIFY_WECHAT_APPID": c.appid,
                "HAOYUAN_NOTIFY_WECHAT_SECRET": c.secret,
                "HAOYUAN_NOTIFY_WECHAT_TEMPLATES": msgspec.json.encode(tpl).decode(),
                "HAOYUAN_NOTIFY_SMS_URL": self.url, "HAOYUAN_NOTIFY_SMS_KEY": c.sms_key}


def main(argv: list[str] | None = None) -> None:
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    parser = argparse.ArgumentParser(description="haoyuan notification simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--config", default="{}", help="NotifySimConfig as JSON")
    args = parser.parse_args(argv)
    msgspec.json.decode(args.config, type=NotifySimConfig)
    os.environ[_CONFIG_ENV] = args.config
    Granian(target="engine.testing.notify_simulator:app_from_env", factory=True,
            address=args.host, port=args.port, interface=Interfaces.ASGI, workers=1,
            log_level=LogLevels.warning, workers_kill_timeout=2).serve()


if __name__ == "__main__":
    main()
