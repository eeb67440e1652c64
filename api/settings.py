"""One typed settings object, read from ``HAOYUAN_*`` environment variables.

Every field has a default that works on a developer machine (local Redis and
PostgreSQL, development secrets, the development WeChat verifier). With
``HAOYUAN_ENV=production`` the development secrets are refused: the token,
admin and payment secrets and the data keys must be set.

    HAOYUAN_REDIS_URL=redis://127.0.0.1:6379/0
    HAOYUAN_PG_DSN=postgresql://postgres@127.0.0.1:5432/haoyuan
    HAOYUAN_ADMIN_TOKEN=...            bearer token of /v1/admin/*
    HAOYUAN_PAYMENT_SECRET=...         HMAC key of the payment callback
    HAOYUAN_TOKEN_SECRET=...           HMAC key of account tokens
    HAOYUAN_WECHAT_MODE=dev|code2session
    HAOYUAN_MAX_INFLIGHT=512           engine calls in flight per worker
    HAOYUAN_DATA_KEYS / HAOYUAN_HMAC_KEY  patient data keys (see engine.pii)
    HAOYUAN_REALNAME_MODE=simulator|http  real-name checks of bound patients
    HAOYUAN_REALNAME_URL / HAOYUAN_REALNAME_KEY  the HTTP real-name gateway
    HAOYUAN_SHARED_ADMIN=auto|on|off   the admin token as bootstrap identity

Every field ``x`` is read from ``HAOYUAN_X``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from engine.engine import EngineConfig
from engine.pii import Crypto

__all__ = ["Settings", "SettingsError", "dev_crypto"]

_DEV_SECRETS = {
    "admin_token": "dev-admin-token",
    "payment_secret": "dev-payment-secret",
    "token_secret": "dev-token-secret",
}


class SettingsError(ValueError):
    """A setting is missing or malformed (never carries a secret's value)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    env: Literal["dev", "production"] = "dev"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    redis_timeout_s: float = 5.0
    pg_dsn: str = "postgresql://postgres@127.0.0.1:5432/haoyuan"
    pg_pool_min: int = 1
    pg_pool_max: int = 8
    #: Apply pending migrations at startup (under an advisory lock).
    migrate: bool = True

    # -- credentials
    admin_token: str = _DEV_SECRETS["admin_token"]
    payment_secret: str = _DEV_SECRETS["payment_secret"]
    #: A payment callback older (or newer) than this is refused as a replay.
    payment_max_skew_s: int = 300
    token_secret: str = _DEV_SECRETS["token_secret"]
    token_ttl_s: int = 2 * 3600
    wechat_mode: Literal["dev", "code2session"] = "dev"
    wechat_url: str = "https://api.weixin.qq.com/sns/jscode2session"
    wechat_appid: str = ""
    wechat_secret: str = ""
    wechat_timeout_s: float = 5.0
    #: Patient data keys; None: HAOYUAN_DATA_KEYS, or fixed development keys in dev.
    crypto: Crypto | None = field(default=None, repr=False)

    # -- rules passed to the engine (the engine enforces them)
    max_patients: int = 5
    account_rate_per_s: float = 2.0
    account_burst: int = 10
    patient_rate_per_s: float = 1.0
    patient_burst: int = 5
    #: Hospital-wide patient rules in the engine: bans (no-shows) and at most
    #: ``max_active_per_patient`` active holds and bookings (0 = no limit).
    patient_rules: bool = False
    max_active_per_patient: int = 0

    # -- hot path
    #: Pipelines of batched engine calls in flight per worker (EngineConfig).
    engine_pipelines: int = 2
    #: Engine calls in flight per worker; above it, 429 with a jittered Retry-After.
    max_inflight: int = 512
    #: Shed new engine work while this worker's event loop runs later than
    #: this (ms): the queue in front of the handlers (0 = off).
    max_loop_lag_ms: float = 250.0
    shed_retry_after_s: float = 1.0
    soldout_ttl_ms: int = 1000
    availability_ttl_ms: int = 200
    catalog_ttl_ms: int = 1000
    #: How long a release instant learnt from Redis answers "not open" locally.
    release_cache_ttl_ms: int = 5000
    #: Closer than this to the release instant, ask Redis.
    not_open_margin_ms: int = 250
    #: Serve well-formed POST /v1/holds in front of Litestar (api.fastpath).
    fast_path: bool = True

    # -- identities: verified patients, staff, revocable tokens, per-client limits
    #: Accounts that may bind one national ID number (verified bindings
    #: displace unverified ones; see engine.store.queries.bind_patient).
    max_accounts_per_patient: int = 3
    #: Real-name checks of bound patients (engine.identity): the in-process
    #: simulator (development, tests, the demo) or an HTTP gateway.
    realname_mode: Literal["simulator", "http"] = "simulator"
    realname_url: str = ""
    realname_key: str = field(default="", repr=False)
    realname_timeout_s: float = 5.0
    #: The shared admin token acts as the bootstrap identity (every staff
    #: role): "auto" in development only, "on" in production too (break-glass,
    #: audited as "bootstrap"), "off" never. Production uses staff tokens
    #: (``haoyuan staff add``).
    shared_admin: Literal["auto", "on", "off"] = "auto"
    #: Per client address, GCRA (burst at once, then one per interval; an
    #: interval of 0 turns the limit off): failed admin attempts, failed
    #: logins, and new accounts.
    admin_failures_burst: int = 10
    admin_failures_interval_s: float = 60.0
    login_failures_burst: int = 20
    login_failures_interval_s: float = 5.0
    new_accounts_burst: int = 20
    new_accounts_interval_s: float = 30.0
    #: Take the client address from this request header (one your reverse
    #: proxy sets, e.g. x-real-ip) instead of the peer address.
    client_ip_header: str = ""

    # -- ops
    writer_lag_max_ms: int = 30_000
    ops_cache_s: float = 2.0
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Mount GET /bench/hello (the benchmark's ceiling).
    bench_endpoints: bool = False
    max_body_bytes: int = 4_000_000

    # ------------------------------------------------------------------ building
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "crypto":
                continue
            raw = env.get(f"HAOYUAN_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, hints[f.name], raw)
        if "crypto" not in overrides and env.get("HAOYUAN_DATA_KEYS"):
            values["crypto"] = Crypto.from_env(env)
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_patients < 1 or self.token_ttl_s < 1:
            raise SettingsError("max_inflight, max_patients and token_ttl_s must be positive")
        if self.env == "production":
            for name, dev in _DEV_SECRETS.items():
                if getattr(self, name) == dev or len(getattr(self, name)) < 16:
                    raise SettingsError(f"HAOYUAN_{name.upper()} must be set (16+ characters)")
            if self.crypto is None:
                raise SettingsError("HAOYUAN_DATA_KEYS and HAOYUAN_HMAC_KEY must be set")
            if self.wechat_mode != "code2session":
                raise SettingsError("HAOYUAN_WECHAT_MODE must be code2session in production")
            if self.bench_endpoints:
                raise SettingsError("bench endpoints are for benchmarks only")
            if self.realname_mode != "http":
                raise SettingsError("HAOYUAN_REALNAME_MODE must be http in production")
        if self.realname_mode == "http" and not (self.realname_url and self.realname_key):
            raise SettingsError("HAOYUAN_REALNAME_URL and HAOYUAN_REALNAME_KEY must be set")
        if self.max_accounts_per_patient < 1:
            raise SettingsError("HAOYUAN_MAX_ACCOUNTS_PER_PATIENT must be positive")
        if self.wechat_mode == "code2session" and not (self.wechat_appid and self.wechat_secret):
            raise SettingsError("HAOYUAN_WECHAT_APPID and HAOYUAN_WECHAT_SECRET must be set")

    @property
    def shared_admin_enabled(self) -> bool:
        return self.shared_admin == "on" or (self.shared_admin == "auto" and self.env == "dev")

    def resolved_crypto(self) -> Crypto:
        return self.crypto if self.crypto is not None else dev_crypto()

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            account_rate_per_s=self.account_rate_per_s,
            account_burst=self.account_burst,
            patient_rate_per_s=self.patient_rate_per_s,
            patient_burst=self.patient_burst,
            socket_timeout_s=self.redis_timeout_s,
            pipelines_in_flight=self.engine_pipelines,
            patient_rules=self.patient_rules,
            max_active_per_patient=self.max_active_per_patient,
            cluster=self.redis_cluster,
        )


def dev_crypto() -> Crypto:
    """Fixed development keys, the same in every worker process (never for real data)."""
    data = hashlib.sha256(b"haoyuan development data key").digest()
    mac = hashlib.sha256(b"haoyuan development hmac key").digest()
    return Crypto({"dev": data}, "dev", mac, dev=True)


def _parse(name: str, hint: Any, raw: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if raw not in typing.get_args(hint):
            raise SettingsError(f"HAOYUAN_{name.upper()} must be one of {typing.get_args(hint)}")
        return raw
    if origin in (typing.Union, types.UnionType):
        raise SettingsError(f"HAOYUAN_{name.upper()} cannot be set from the environment")
    try:
        if hint is bool:
            low = raw.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise SettingsError(f"HAOYUAN_{name.upper()} is malformed") from None
    return raw
