"""One configuration for the whole stack, read from ``HAOYUAN_*`` once.

``EngineConfig`` is what the engine needs (rate limits, batching,
durability, cluster, patient rules); ``Connections`` says where Redis,
PostgreSQL and the HIS are. The API's ``api.settings.Settings`` composes
both, and every ``haoyuan`` worker builds them with ``from_env`` (flags
override), so the API and the workers cannot disagree on a default.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

__all__ = [
    "DEFAULT_BOOKING_LINK",
    "DEFAULT_HIS_URL",
    "DEFAULT_PG_DSN",
    "DEFAULT_PUBLIC_URL",
    "DEFAULT_REDIS_URL",
    "ConfigError",
    "Connections",
    "Durability",
    "EngineConfig",
    "PublishConfig",
    "env_name",
    "parse_env",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The one default database of the API and every worker.
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/haoyuan"
DEFAULT_HIS_URL = "http://127.0.0.1:8090"
#: Where clients reach the API (FHIR fullUrls, the SMART bulk manifest, deep links).
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
#: The booking deep link of a published Slot (SMART Scheduling Links): the
#: placeholders {public_url}, {slot} (the Slot's FHIR id), {session_id},
#: {slot_id} and {hospital} are filled in, URL-quoted.
DEFAULT_BOOKING_LINK = "{public_url}/fhir/r4/Slot/{slot}"

Durability = Literal["none", "aof-always", "aof-everysec", "wait"]
_ENV_NAMES = {"cluster": "redis_cluster", "socket_timeout_s": "redis_timeout_s",
              "pipelines_in_flight": "engine_pipelines"}
_NOT_FROM_ENV = frozenset({"clock_offset_ms", "channel_pools"})
#: Accepted spellings of choice values (any case).
ALIASES: dict[str, dict[str, str]] = {"HAOYUAN_ENV": {"dev": "development"}}


class ConfigError(ValueError):
    """A setting is missing or malformed (never carries a secret's value)."""


def env_name(field_name: str) -> str:
    return f"HAOYUAN_{field_name.upper()}"


def parse_env(var: str, hint: Any, raw: str) -> Any:
    """One ``HAOYUAN_*`` value as the field's type: booleans as 1/0, true/false,
    yes/no, on/off; choices in any case; numbers; strings as they are."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or typing.get_origin(args[0]) is typing.Union:
            raise ConfigError(f"{var} cannot be set from the environment")
        return parse_env(var, args[0], raw)
    if origin is Literal:
        low = raw.strip().lower()
        low = ALIASES.get(var, {}).get(low, low)
        if low not in typing.get_args(hint):
            raise ConfigError(f"{var} must be one of {typing.get_args(hint)}")
        return low
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
        raise ConfigError(f"{var} is malformed") from None
    return raw


@dataclass(slots=True, kw_only=True)
class EngineConfig:
    """The engine's settings, with defaults that work locally. Every field
    ``x`` but ``clock_offset_ms`` and ``channel_pools`` is read by
    ``from_env`` from ``HAOYUAN_X`` (``cluster``, ``socket_timeout_s`` and
    ``pipelines_in_flight`` from ``HAOYUAN_REDIS_CLUSTER``,
    ``HAOYUAN_REDIS_TIMEOUT_S`` and ``HAOYUAN_ENGINE_PIPELINES``)."""

    #: GCRA per account: sustained requests per second and burst.
    account_rate_per_s: float = 2.0
    account_burst: int = 10
    #: GCRA per patient (across the accounts that bind them).
    patient_rate_per_s: float = 1.0
    patient_burst: int = 5
    idempotency_ttl_ms: int = 24 * 3600 * 1000
    #: Expired holds of a session reclaimed by each hold on the way.
    reclaim_per_hold: int = 3
    #: Coalesce concurrent script calls into pipelines.
    batch: bool = True
    pipelines_in_flight: int = 2
    #: Added to Redis server time in every decision. Tests only.
    clock_offset_ms: int = 0
    socket_timeout_s: float = 5.0
    cluster: bool = False
    #: What must hold before a write is acknowledged (checked at connect):
    #: "aof-always" (Redis must run appendonly yes, appendfsync always),
    #: "aof-everysec", "wait" (``wait_replicas`` replicas within
    #: ``wait_timeout_ms``, via WAIT on the batch's connection), or "none".
    durability: Durability = "none"
    wait_replicas: int = 1
    wait_timeout_ms: int = 100
    #: 号源池: the pools each channel may draw from (0 public, 1 phone,
    #: 2 window, 3 referral), lowest queue number first.
    channel_pools: dict[str, str] = field(default_factory=lambda: {
        "app": "0", "phone": "1,0", "window": "2,0", "referral": "3,0", "admin": "0,1,2,3",
    })
    #: Hospital-wide patient rules on the patient's own partition: bans (the
    #: no-show policy every hospital has by default) and at most N active
    #: holds and bookings (the session's ``max_active_per_patient``, else
    #: this default; 0 = no limit). One more batched script per hold; on by
    #: default, because a rule a hospital configured must be in force.
    patient_rules: bool = True
    max_active_per_patient: int = 0
    #: Lifetime of the patient-wide reservation made before a hold: if the
    #: engine dies before settling it, it lapses by itself.
    patient_reservation_ms: int = 15 * 60_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineConfig:
        """The configuration from ``HAOYUAN_*`` (the API, every CLI worker and
        embedders read it the same way). Raises ``ConfigError`` naming the
        variable of a malformed value."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in _NOT_FROM_ENV:
                continue
            var = env_name(_ENV_NAMES.get(f.name, f.name))
            raw = env.get(var)
            if raw is not None:
                values[f.name] = parse_env(var, hints[f.name], raw)
        if "durability" not in values:
            from engine.pii import is_development

            # Nothing acknowledged may be lost: production insists on AOF
            # always unless the operator names another mode (development:
            # whatever Redis does).
            values["durability"] = "none" if is_development(env) else "aof-always"
        return cls(**values)



@dataclass(frozen=True, slots=True, kw_only=True)
class Connections:
    """Where the stack's services are: ``HAOYUAN_REDIS_URL``,
    ``HAOYUAN_PG_DSN``, ``HAOYUAN_HIS_URL``."""

    redis_url: str = DEFAULT_REDIS_URL
    pg_dsn: str = DEFAULT_PG_DSN
    his_url: str = DEFAULT_HIS_URL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Connections:
        env = os.environ if environ is None else environ
        return cls(redis_url=env.get("HAOYUAN_REDIS_URL") or DEFAULT_REDIS_URL,
                   pg_dsn=env.get("HAOYUAN_PG_DSN") or DEFAULT_PG_DSN,
                   his_url=env.get("HAOYUAN_HIS_URL") or DEFAULT_HIS_URL)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishConfig:
    """SMART Scheduling Links bulk publishing (``haoyuan publish``; the API
    reads ``public_url`` and ``booking_link`` too). Every field ``x`` is read
    from ``HAOYUAN_X``."""

    public_url: str = DEFAULT_PUBLIC_URL
    booking_link: str = DEFAULT_BOOKING_LINK
    #: Days ahead (from today, China Standard Time) whose sessions are published.
    publish_horizon_days: int = 14
    #: At most one publication per this many seconds (SMART clients poll a
    #: manifest at most once a minute).
    publish_min_interval_s: float = 60.0
    #: How often the worker looks for a change (an import, a slot that sold
    #: out or came back, a release).
    publish_check_s: float = 5.0
    #: Republish at least this often even without such a change (the free
    #: counts of free slots move with every hold between publications).
    publish_max_age_s: float = 900.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PublishConfig:
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw:
                values[f.name] = parse_env(env_name(f.name), hints[f.name], raw)
        return cls(**values)
