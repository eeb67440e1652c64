"""The notifier's channels from ``HAOYUAN_NOTIFY_*`` (every worker reads its
settings from the environment once).

- WeChat subscribe messages: ``HAOYUAN_NOTIFY_WECHAT_APPID``,
  ``HAOYUAN_NOTIFY_WECHAT_SECRET``, ``HAOYUAN_NOTIFY_WECHAT_TEMPLATES`` (JSON:
  kind -> template id), optionally ``HAOYUAN_NOTIFY_WECHAT_FIELDS`` (JSON: our
  field -> the template's key), ``HAOYUAN_NOTIFY_WECHAT_PAGE`` and
  ``HAOYUAN_NOTIFY_WECHAT_URL`` (default ``https://api.weixin.qq.com``).
- SMS: ``HAOYUAN_NOTIFY_SMS_URL``, ``HAOYUAN_NOTIFY_SMS_KEY``, optionally
  ``HAOYUAN_NOTIFY_SMS_TEMPLATES`` (JSON: kind -> template code).

At least one channel; in production the secrets must be strong and the
URLs https (``engine.secret_strength``), and each problem is named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.config import ConfigError
from engine.notify.base import Notifier
from engine.notify.sms import SmsGateway, SmsGatewayConfig
from engine.notify.wechat import DEFAULT_FIELDS, WechatSubscribe, WechatSubscribeConfig
from engine.secret_strength import secret_problem

__all__ = ["notifiers_from_env"]


def _json(env: Mapping[str, str], var: str, problems: list[str]) -> dict[str, str]:
    raw = env.get(var, "")
    if not raw:
        return {}
    try:
        got: Any = json.loads(raw)
    except ValueError:
        problems.append(f"{var}: not JSON")
        return {}
    if not isinstance(got, dict) or not all(isinstance(v, str) for v in got.values()):
        problems.append(f"{var}: must be a JSON object of strings")
        return {}
    return {str(k): v for k, v in got.items()}


def notifiers_from_env(env: Mapping[str, str], *, development: bool) -> dict[str, Notifier]:
    problems: list[str] = []
    out: dict[str, Notifier] = {}
    appid = env.get("HAOYUAN_NOTIFY_WECHAT_APPID", "")
    if appid:
        secret = env.get("HAOYUAN_NOTIFY_WECHAT_SECRET", "")
        url = env.get("HAOYUAN_NOTIFY_WECHAT_URL", "https://api.weixin.qq.com")
        templates = _json(env, "HAOYUAN_NOTIFY_WECHAT_TEMPLATES", problems)
        if not templates:
            problems.append("HAOYUAN_NOTIFY_WECHAT_TEMPLATES: no template (kind -> id)")
        why = secret_problem(secret) if not development else (None if secret else "not set")
        if why:
            problems.append(f"HAOYUAN_NOTIFY_WECHAT_SECRET: {why}")
        if not development and not url.startswith("https://"):
            problems.append("HAOYUAN_NOTIFY_WECHAT_URL: must be https in production")
        fields = {**DEFAULT_FIELDS, **_json(env, "HAOYUAN_NOTIFY_WECHAT_FIELDS", problems)}
        out["wechat"] = WechatSubscribe(WechatSubscribeConfig(
            base_url=url, appid=appid, secret=secret, templates=templates, fields=fields,
            page=env.get("HAOYUAN_NOTIFY_WECHAT_PAGE", "pages/bookings/index")))
    sms_url = env.get("HAOYUAN_NOTIFY_SMS_URL", "")
    if sms_url:
        key = env.get("HAOYUAN_NOTIFY_SMS_KEY", "")
        why = secret_problem(key) if not development else (None if key else "not set")
        if why:
            problems.append(f"HAOYUAN_NOTIFY_SMS_KEY: {why}")
        if not development and not sms_url.startswith("https://"):
            problems.append("HAOYUAN_NOTIFY_SMS_URL: must be https in production")
        out["sms"] = SmsGateway(SmsGatewayConfig(
            url=sms_url, key=key,
            templates=_json(env, "HAOYUAN_NOTIFY_SMS_TEMPLATES", problems)))
    if not out:
        problems.append("no channel: set HAOYUAN_NOTIFY_WECHAT_APPID (and its secret and"
                        " templates) or HAOYUAN_NOTIFY_SMS_URL (and its key)")
    if problems:
        raise ConfigError("haoyuan notifier refuses to start: " + "; ".join(problems))
    return out
