"""One typed settings object, read from ``HAOYUAN_*`` environment variables.

Secure by default: unless the operator asks for a development instance
(``HAOYUAN_ENV=development``, or its alias ``dev``), every secret must be set
and strong, and the API refuses to start otherwise, naming each missing or
weak one in one error (never its value; see ``engine.secret_strength``).
Only a development instance has development secrets, development data keys
and the development WeChat verifier (``dev-<openid>`` codes); it says so in
its start-up log and in ``/readyz``.

    HAOYUAN_ENV=production|development   production unless set
    HAOYUAN_REDIS_URL=redis://127.0.0.1:6379/0
    HAOYUAN_PG_DSN=postgresql://postgres@127.0.0.1:5432/haoyuan
    HAOYUAN_ADMIN_TOKEN=...            bearer token of /v1/admin/*
    HAOYUAN_PAYMENT_SECRET=...         HMAC key of the payment callback
    HAOYUAN_TOKEN_SECRET=...           HMAC key of account tokens
    HAOYUAN_OPS_TOKEN=...              bearer token of /metrics and the detailed /readyz
    HAOYUAN_WECHAT_MODE=code2session|dev  (+ HAOYUAN_WECHAT_APPID, HAOYUAN_WECHAT_SECRET)
    HAOYUAN_MAX_INFLIGHT=512           engine calls in flight per worker
    HAOYUAN_DATA_KEYS / HAOYUAN_HMAC_KEY  patient data keys (see engine.pii)
    HAOYUAN_REALNAME_MODE=simulator|http  real-name checks of bound patients
    HAOYUAN_REALNAME_URL / HAOYUAN_REALNAME_KEY  the HTTP real-name gateway
    HAOYUAN_SHARED_ADMIN=auto|on|off   the admin token as bootstrap identity
    HAOYUAN_WXPAY_*                    WeChat Pay API v3 (see engine.payments.wechat)
    HAOYUAN_HIS_NOTIFY_TOKEN=...       bearer token of the HIS's notifications

Every field ``x`` is read from ``HAOYUAN_X``; choices are case-insensitive.
The engine's own settings (``HAOYUAN_ACCOUNT_RATE_PER_S``,
``HAOYUAN_DURABILITY``, ``HAOYUAN_REDIS_CLUSTER``, ``HAOYUAN_PATIENT_RULES``,
...) are ``engine.config.EngineConfig``'s, read the same way by every
``haoyuan`` worker.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from engine.config import (
    DEFAULT_BOOKING_LINK,
    DEFAULT_PG_DSN,
    DEFAULT_PUBLIC_URL,
    DEFAULT_REDIS_URL,
    ConfigError,
    EngineConfig,
    env_name,
    parse_env,
)
from engine.payments.wechat import WechatPayConfig
from engine.pii import DEV_WARNING, Crypto, CryptoConfigError
from engine.pii import dev_crypto as _dev_crypto
from engine.secret_strength import DEV_SECRETS, secret_problem

__all__ = ["DEV_WARNING", "Settings", "SettingsError", "dev_crypto"]

#: Secrets a production instance must be given (text; the data keys apart).
_SECRETS = ("admin_token", "payment_secret", "token_secret", "ops_token")
_HOW = ("Generate a secret with: python -c 'import secrets; print(secrets.token_urlsafe(32))';"
        " a key (HAOYUAN_DATA_KEYS=<id>:<key>, HAOYUAN_HMAC_KEY=<key>) with:"
        " python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'."
        " For a development instance (development secrets, dev-<openid> logins) set"
        " HAOYUAN_ENV=development.")


class SettingsError(ConfigError):
    """Settings are missing, weak or malformed (never carries a secret's value).

    ``problems`` lists (variable, reason) pairs: every one found, not only the first."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    @classmethod
    def of(cls, problems: list[tuple[str, str]]) -> SettingsError:
        lines = "\n".join(f"  - {name}: {why}" for name, why in problems)
        return cls(f"haoyuan refuses to start: {len(problems)} setting(s) missing, weak or"
                   f" not allowed in production (HAOYUAN_ENV is production unless set to"
                   f" development):\n{lines}\n{_HOW}", problems)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    #: ``production`` unless the operator asks for ``development`` (alias ``dev``).
    env: Literal["development", "production"] = "production"
    redis_url: str = DEFAULT_REDIS_URL
    pg_dsn: str = DEFAULT_PG_DSN
    pg_pool_min: int = 1
    pg_pool_max: int = 8
    #: Apply pending migrations at startup (under an advisory lock).
    migrate: bool = True

    # -- credentials (empty: the development value in development, refused in production)
    admin_token: str = field(default="", repr=False)
    payment_secret: str = field(default="", repr=False)
    #: A payment callback older (or newer) than this is refused as a replay.
    payment_max_skew_s: int = 300
    token_secret: str = field(default="", repr=False)
    token_ttl_s: int = 2 * 3600
    #: Bearer token of /metrics and the detailed /readyz (development: open when empty).
    ops_token: str = field(default="", repr=False)
    #: ``dev`` (``dev-<openid>`` codes) only in development; the default there.
    wechat_mode: Literal["dev", "code2session"] | None = None
    wechat_url: str = "https://api.weixin.qq.com/sns/jscode2session"
    wechat_appid: str = ""
    wechat_secret: str = field(default="", repr=False)
    wechat_timeout_s: float = 5.0
    #: Patient data keys; None: HAOYUAN_DATA_KEYS, or fixed development keys in dev.
    crypto: Crypto | None = field(default=None, repr=False)
    #: WeChat Pay API v3 (``HAOYUAN_WXPAY_*``, see engine.payments.wechat): the
    #: notification route POST /v1/payments/wechat/notify verifies and decrypts
    #: with it. None: that route answers 404 (the generic callback still works).
    wxpay: WechatPayConfig | None = field(default=None, repr=False)
    #: Bearer token the HIS sends with its Subscription notifications
    #: (``channel.header``) to POST /v1/his/notify; empty: that route is off.
    his_notify_token: str = field(default="", repr=False)

    #: The engine's settings (rate limits, batching, durability, cluster,
    #: patient rules): ``EngineConfig.from_env``, the same object every
    #: ``haoyuan`` worker builds.
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: Patients one account may bind.
    max_patients: int = 5

    # -- hot path
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
    #: A hold older than this (ms since it arrived) is answered at once (a
    #: waiting-room ticket, or 429) instead of being decided late.
    max_request_age_ms: int = 500
    #: The header in which the edge proxy stamps when it received a request
    #: (nginx: ``proxy_set_header X-Request-Start "t=${msec}";``; seconds,
    #: ms or us since the epoch). A hold's arrival is the earlier of that and
    #: this worker's own stamp, so the queue in front of the workers counts
    #: too; a client's own value can only make its request older (never
    #: sooner than the release, never younger), so it gains nothing. Empty:
    #: the worker's stamp only.
    arrival_header: str = "x-request-start"
    #: The waiting room (api.waiting): positions of the line admitted per
    #: second across the deployment (size it from the measured holds/s; 0 =
    #: off, shed holds get a plain 429), how long an admitted ticket is
    #: honoured (s), and how often a worker reads the line (ms).
    waiting_room_rate: float = 2000.0
    waiting_room_window_s: float = 30.0
    waiting_room_refresh_ms: int = 200

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

    # -- the FHIR facade (/fhir/r4) and SMART bulk publishing (api.fhir)
    #: Where clients reach this API (FHIR fullUrls, the bulk manifest's URLs).
    public_url: str = DEFAULT_PUBLIC_URL
    #: A Slot's booking deep link (see engine.config.DEFAULT_BOOKING_LINK).
    booking_link: str = DEFAULT_BOOKING_LINK
    #: How long a worker trusts a FHIR client token it checked (a disabled
    #: client stops within this many seconds).
    fhir_client_cache_s: float = 2.0
    #: How long a worker remembers a patient the real-name authority verified
    #: for a FHIR client (ID, name and phone; keyed hashes only).
    fhir_verify_cache_s: float = 3600.0

    # -- ops
    writer_lag_max_ms: int = 30_000
    ops_cache_s: float = 2.0
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Mount GET /bench/hello (the benchmark's ceiling).
    bench_endpoints: bool = False
    max_body_bytes: int = 4_000_000
    #: A request body must arrive within this (s) of its first byte being awaited.
    body_timeout_s: float = 10.0
    #: Swagger and Scalar pages (they load their scripts from a CDN): on in
    #: development unless set, refused in production. /schema/openapi.json always.
    docs_ui: bool | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for f in fields(cls):
            if f.name in ("crypto", "engine", "wxpay"):
                continue
            var = env_name(f.name)
            raw = env.get(var)
            if raw is not None:
                try:
                    values[f.name] = parse_env(var, hints[f.name], raw)
                except ConfigError as exc:
                    problems.append((var, str(exc).removeprefix(var + " ")))
        if "engine" not in overrides:
            try:
                values["engine"] = EngineConfig.from_env(env)
            except ConfigError as exc:
                var = str(exc).split(" ", 1)[0]
                problems.append((var, str(exc).removeprefix(var + " ")))
        if "wxpay" not in overrides:
            try:
                values["wxpay"] = WechatPayConfig.from_env(env)
            except ValueError as exc:
                var = str(exc).split(" ", 1)[0]
                problems.append((var, str(exc).removeprefix(var + " ")))
        if "crypto" not in overrides and (env.get("HAOYUAN_DATA_KEYS")
                                          or env.get("HAOYUAN_HMAC_KEY")):
            try:
                values["crypto"] = Crypto.from_env(env)
            except CryptoConfigError as exc:
                problems.append((_crypto_variable(str(exc)), str(exc)))
        values.update(overrides)
        if not problems:
            return cls(**values)
        # Name every problem at once: the others too, found with a stand-in.
        values.pop("crypto", None)
        try:
            cls(**values)
        except SettingsError as exc:
            named = {n for n, _ in problems}
            problems += [(n, w) for n, w in exc.problems if n not in named]
        raise SettingsError.of(problems)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def development(self) -> bool:
        return self.env == "development"

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_patients < 1 or self.token_ttl_s < 1:
            raise SettingsError("max_inflight, max_patients and token_ttl_s must be positive")
        if self.body_timeout_s <= 0:
            raise SettingsError("body_timeout_s must be positive")
        if (self.waiting_room_rate < 0 or self.waiting_room_window_s <= 0
                or self.waiting_room_refresh_ms < 1 or self.max_request_age_ms < 1):
            raise SettingsError("waiting_room_rate must be >= 0; waiting_room_window_s,"
                                " waiting_room_refresh_ms and max_request_age_ms positive")
        if self.development:
            for name in _SECRETS:
                if not getattr(self, name) and name != "ops_token":
                    object.__setattr__(self, name, DEV_SECRETS[name])
            if self.wechat_mode is None:
                object.__setattr__(self, "wechat_mode", "dev")
            if self.docs_ui is None:
                object.__setattr__(self, "docs_ui", True)
        problems = [] if self.development else self._production_problems()
        if self.realname_mode == "http":
            if not self.realname_url:
                problems.append(("HAOYUAN_REALNAME_URL", "not set"))
            if not self.realname_key:
                problems.append(("HAOYUAN_REALNAME_KEY", "not set"))
        if self.max_accounts_per_patient < 1:
            problems.append(("HAOYUAN_MAX_ACCOUNTS_PER_PATIENT", "must be positive"))
        if self.wechat_mode == "code2session":
            if not self.wechat_appid:
                problems.append(("HAOYUAN_WECHAT_APPID", "not set"))
            if not self.wechat_secret:
                problems.append(("HAOYUAN_WECHAT_SECRET", "not set"))
        if problems:
            raise SettingsError.of(problems)
        if self.docs_ui is None:
            object.__setattr__(self, "docs_ui", False)

    def _production_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for name in _SECRETS:
            why = secret_problem(getattr(self, name))
            if why is not None:
                problems.append((f"HAOYUAN_{name.upper()}", why))
        if self.crypto is None:
            problems += [("HAOYUAN_DATA_KEYS", "not set"), ("HAOYUAN_HMAC_KEY", "not set")]
        elif self.crypto.dev:
            problems.append(("HAOYUAN_DATA_KEYS", "development keys (Crypto.generate_dev)"))
        else:
            for what, why in self.crypto.weak_keys():
                var = "HAOYUAN_HMAC_KEY" if what == "HMAC key" else "HAOYUAN_DATA_KEYS"
                problems.append((var, f"{what}: {why}"))
        if self.wechat_mode != "code2session":
            problems.append(("HAOYUAN_WECHAT_MODE", "must be code2session (dev-<openid> logins"
                             " exist only in development)"))
        elif self.wechat_secret:
            why = secret_problem(self.wechat_secret)
            if why is not None:
                problems.append(("HAOYUAN_WECHAT_SECRET", why))
        if self.bench_endpoints:
            problems.append(("HAOYUAN_BENCH_ENDPOINTS", "bench endpoints are for benchmarks only"))
        if self.realname_mode != "http":
            problems.append(("HAOYUAN_REALNAME_MODE", "must be http (the real-name simulator"
                             " verifies anyone; it exists only in development)"))
        elif self.realname_key:
            why = secret_problem(self.realname_key)
            if why is not None:
                problems.append(("HAOYUAN_REALNAME_KEY", why))
        if self.wxpay is not None:
            problems += self.wxpay.problems()
        if self.his_notify_token:
            why = secret_problem(self.his_notify_token)
            if why is not None:
                problems.append(("HAOYUAN_HIS_NOTIFY_TOKEN", why))
        if self.docs_ui:
            problems.append(("HAOYUAN_DOCS_UI", "the documentation pages load scripts from a"
                             " CDN; off in production (the schema stays at"
                             " /schema/openapi.json)"))
        return problems

    @property
    def shared_admin_enabled(self) -> bool:
        return self.shared_admin == "on" or (self.shared_admin == "auto" and self.development)

    def resolved_crypto(self) -> Crypto:
        if self.crypto is not None:
            return self.crypto
        if not self.development:  # pragma: no cover - refused in __post_init__
            raise SettingsError("patient data keys are required outside development")
        return dev_crypto()

    def engine_config(self) -> EngineConfig:
        return self.engine


def dev_crypto() -> Crypto:
    """Fixed development keys, the same in every worker process (never for real data)."""
    return _dev_crypto()


def _crypto_variable(message: str) -> str:
    """The variable a CryptoConfigError is about (its message names no key material)."""
    for var in ("HAOYUAN_DATA_KEYS", "HAOYUAN_HMAC_KEY", "HAOYUAN_ACTIVE_KEY"):
        if message.startswith(var):
            return var
    if "HMAC" in message:
        return "HAOYUAN_HMAC_KEY"
    return "HAOYUAN_ACTIVE_KEY" if "active key" in message else "HAOYUAN_DATA_KEYS"
