"""Backend clients of the FHIR facade (``/fhir/r4``): who they are and what they may do.

A client is a system (another hospital backend, an app's server, a regional
platform) with SMART-style system scopes:

- ``system/Slot.read`` (also ``Schedule``): search slots, ``Appointment/$find``;
- ``system/Appointment.read``: read the appointments it made;
- ``system/Appointment.write``: ``$hold``, ``$book``, cancel;
- wildcards ``system/*.read``, ``system/*.write``, ``system/*.*``,
  ``system/Appointment.*``; SMART v2 letters (``.rs``, ``.cruds``) too.

Its bearer token is ``hyf_<client id>_<secret>``: 256 random bits, shown once
when the client is added; PostgreSQL keeps only its SHA-256 (like staff
tokens). ``identity`` says how the client names patients (``verify``: the
real-name authority checks each one, as a /v1 binding; ``trusted``: the
client vouches for them). ``rate_per_s``/``burst`` is the client's own quota.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Literal

import asyncpg
import msgspec

from engine.store.queries import Queryable

__all__ = [
    "SCOPES",
    "ClientExists",
    "FhirClient",
    "Identity",
    "add_client",
    "authenticate",
    "disable_client",
    "grants",
    "list_clients",
    "looks_like_client_token",
    "parse_scopes",
]

Identity = Literal["verify", "trusted"]
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_TOKEN_RE = re.compile(r"hyf_(fc[0-9a-f]{12})_([A-Za-z0-9_-]{40,64})", re.ASCII)
_SCOPE_RE = re.compile(
    r"system/(\*|Slot|Schedule|Appointment|Location)\.(\*|read|write|[cruds]{1,5})", re.ASCII)
#: The scopes the facade knows (wildcards and SMART v2 letters also parse).
SCOPES = ("system/Slot.read", "system/Schedule.read", "system/Appointment.read",
          "system/Appointment.write")


class ClientExists(ValueError):
    """A client with that name exists."""


class FhirClient(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    scopes: tuple[str, ...]
    identity: Identity = "verify"
    rate_per_s: float = 50.0
    burst: int = 100
    created_at: dt.datetime | None = None
    disabled_at: dt.datetime | None = None

    @property
    def account_prefix(self) -> str:
        """The engine account of this client's requests for one patient is this
        prefix and the patient's ref (``api.fhir``): the per-account and
        per-patient limits of /v1 apply to each patient of the client."""
        return f"fhir-{self.id}-"

    def may(self, resource: str, action: Literal["read", "write"]) -> bool:
        return grants(self.scopes, resource, action)


def grants(scopes: Iterable[str], resource: str, action: Literal["read", "write"]) -> bool:
    """Whether any of ``scopes`` allows ``action`` on ``resource`` (SMART v1 or v2 syntax)."""
    letters = "rs" if action == "read" else "cud"
    for s in scopes:
        m = _SCOPE_RE.fullmatch(s)
        if m is None or m.group(1) not in ("*", resource):
            continue
        what = m.group(2)
        if what in ("*", action) or (what not in ("read", "write")
                                     and any(c in what for c in letters)):
            return True
    return False


def parse_scopes(raw: Iterable[str]) -> tuple[str, ...]:
    """Scopes as given (space or comma separated), each checked; raises ValueError."""
    out: list[str] = []
    for item in raw:
        for s in item.replace(",", " ").split():
            if _SCOPE_RE.fullmatch(s) is None:
                raise ValueError(f"unknown scope {s[:60]!r}: use e.g. {', '.join(SCOPES)}")
            if s not in out:
                out.append(s)
    if not out:
        raise ValueError("give at least one scope")
    return tuple(out)


def _digest(secret: str) -> str:
    return hashlib.sha256(b"haoyuan fhir client token v1\x00" + secret.encode()).hexdigest()


def looks_like_client_token(token: str) -> bool:
    return token.startswith("hyf_")


def _client(r: asyncpg.Record) -> FhirClient:
    return FhirClient(id=r["id"], name=r["name"], scopes=tuple(r["scopes"]),
                      identity=r["identity"], rate_per_s=float(r["rate_per_s"]),
                      burst=int(r["burst"]), created_at=r["created_at"],
                      disabled_at=r["disabled_at"])


_COLS = "id, name, scopes, identity, rate_per_s, burst, created_at, disabled_at"


async def add_client(db: Queryable, name: str, scopes: Iterable[str], created_by: str, *,
                     identity: Identity = "verify", rate_per_s: float = 50.0,
                     burst: int = 100) -> tuple[FhirClient, str]:
    """A new client and its token (shown once, stored hashed)."""
    if not NAME_RE.fullmatch(name):
        raise ValueError("name: 1..64 of a-z 0-9 . _ - (starting with a letter or digit)")
    if identity not in ("verify", "trusted"):
        raise ValueError("identity must be verify or trusted")
    if rate_per_s < 0 or burst < 1:
        raise ValueError("rate_per_s must be >= 0 and burst >= 1")
    checked = parse_scopes(scopes)
    cid = "fc" + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    try:
        r = await db.fetchrow(
            "INSERT INTO fhir_clients (id, name, scopes, identity, rate_per_s, burst,"
            " secret_hash, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            f" RETURNING {_COLS}",
            cid, name, list(checked), identity, rate_per_s, burst, _digest(secret), created_by)
    except asyncpg.UniqueViolationError:
        raise ClientExists(f"FHIR client {name} exists") from None
    return _client(r), f"hyf_{cid}_{secret}"


async def list_clients(db: Queryable) -> list[FhirClient]:
    rows = await db.fetch(f"SELECT {_COLS} FROM fhir_clients ORDER BY created_at, id")
    return [_client(r) for r in rows]


async def disable_client(db: Queryable, who: str, disabled_by: str) -> bool:
    """Disable a client (by name or id). False if unknown or already disabled."""
    cid = await db.fetchval(
        "UPDATE fhir_clients SET disabled_at = now(), disabled_by = $2"
        " WHERE (name = $1 OR id = $1) AND disabled_at IS NULL RETURNING id", who, disabled_by)
    return cid is not None


async def authenticate(db: Queryable, token: str) -> FhirClient | None:
    """The active client a token belongs to, or None (compared in constant time)."""
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        return None
    r = await db.fetchrow(
        f"SELECT {_COLS}, secret_hash FROM fhir_clients WHERE id = $1 AND disabled_at IS NULL",
        m.group(1))
    if r is None or not hmac.compare_digest(_digest(m.group(2)).encode(),
                                            str(r["secret_hash"]).encode()):
        return None
    return _client(r)
