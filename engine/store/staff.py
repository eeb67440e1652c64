"""Staff identities and the audit trail of what they did.

A staff member is one person with one role:

- ``operator``: the schedule (imports, capacity, suspend/resume), hospital
  rules, audits, ban lifts, token revocations, the audit trail;
- ``clerk`` (window clerk, 窗口): holds for the staff channels (window,
  phone, referral), attendance;
- ``finance``: refunds, audits.

Their bearer token is ``hys_<staff id>_<secret>``: 256 random bits, shown
once when the member is added; PostgreSQL keeps only its SHA-256 (a
random secret of that size needs no slow hash). Disabling a member takes
effect on the next request of every worker (each admin request reads the
member's row). Every change a staff member makes is one row of
``staff_audit`` (append-only: a trigger refuses UPDATE and DELETE).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from typing import Any, Literal

import asyncpg
import msgspec

from engine.store.queries import Queryable

__all__ = [
    "BOOTSTRAP",
    "ROLES",
    "Actor",
    "AuditEntry",
    "Role",
    "StaffExists",
    "StaffMember",
    "add_staff",
    "audit_trail",
    "authenticate",
    "disable_staff",
    "list_staff",
    "looks_like_staff_token",
    "record_action",
]

Role = Literal["operator", "clerk", "finance"]
ROLES: tuple[Role, ...] = ("operator", "clerk", "finance")
USERNAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_TOKEN_RE = re.compile(r"hys_(st[0-9a-f]{12})_([A-Za-z0-9_-]{40,64})", re.ASCII)
_json = msgspec.json.Encoder()


class Actor(msgspec.Struct, frozen=True):
    """Who acts: a staff member, or the shared admin token (``BOOTSTRAP``)."""

    id: str
    username: str
    roles: frozenset[str]

    @property
    def role(self) -> str:
        return ",".join(sorted(self.roles))


#: The shared admin token (development, or an explicit break-glass setting):
#: every role, recorded in the audit trail as ``bootstrap``.
BOOTSTRAP = Actor("bootstrap", "bootstrap", frozenset(ROLES))


class StaffMember(msgspec.Struct, frozen=True):
    id: str
    username: str
    role: str
    created_at: dt.datetime
    created_by: str
    disabled_at: dt.datetime | None = None


class StaffExists(ValueError):
    """A staff member with that username exists."""


class AuditEntry(msgspec.Struct, frozen=True):
    id: int
    at: dt.datetime
    actor: str
    role: str
    action: str
    target: str | None
    detail: dict[str, Any]


def _digest(secret: str) -> str:
    return hashlib.sha256(b"haoyuan staff token v1\x00" + secret.encode()).hexdigest()


def looks_like_staff_token(token: str) -> bool:
    return token.startswith("hys_")


async def add_staff(db: Queryable, username: str, role: str, created_by: str
                    ) -> tuple[StaffMember, str]:
    """A new staff member and their token (shown once, stored hashed)."""
    if not USERNAME_RE.fullmatch(username):
        raise ValueError("username: 1..64 of a-z 0-9 . _ - (starting with a letter or digit)")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    sid = "st" + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    try:
        r = await db.fetchrow(
            "INSERT INTO staff (id, username, role, secret_hash, created_by)"
            " VALUES ($1, $2, $3, $4, $5)"
            " RETURNING id, username, role, created_at, created_by, disabled_at",
            sid, username, role, _digest(secret), created_by)
    except asyncpg.UniqueViolationError:
        raise StaffExists(f"staff member {username} exists") from None
    await record_action(db, Actor(created_by, created_by, frozenset({"cli"})), "staff.add",
                        sid, {"username": username, "role": role})
    return StaffMember(**dict(r)), f"hys_{sid}_{secret}"


async def list_staff(db: Queryable) -> list[StaffMember]:
    rows = await db.fetch(
        "SELECT id, username, role, created_at, created_by, disabled_at FROM staff"
        " ORDER BY created_at, id")
    return [StaffMember(**dict(r)) for r in rows]


async def disable_staff(db: Queryable, who: str, disabled_by: str) -> bool:
    """Disable a member (by username or id): their token stops working. False if unknown
    or already disabled."""
    sid = await db.fetchval(
        "UPDATE staff SET disabled_at = now(), disabled_by = $2"
        " WHERE (username = $1 OR id = $1) AND disabled_at IS NULL RETURNING id",
        who, disabled_by)
    if sid is None:
        return False
    await record_action(db, Actor(disabled_by, disabled_by, frozenset({"cli"})),
                        "staff.disable", sid, {})
    return True


async def authenticate(db: Queryable, token: str) -> Actor | None:
    """The active staff member a token belongs to, or None (checked in constant time)."""
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        return None
    r = await db.fetchrow(
        "SELECT username, role, secret_hash FROM staff WHERE id = $1 AND disabled_at IS NULL",
        m.group(1))
    if r is None or not hmac.compare_digest(_digest(m.group(2)).encode(),
                                            str(r["secret_hash"]).encode()):
        return None
    return Actor(m.group(1), r["username"], frozenset({r["role"]}))


async def record_action(db: Queryable, actor: Actor, action: str, target: str | None,
                        detail: dict[str, Any] | None = None) -> None:
    """One row of the audit trail: ``actor`` did ``action`` to ``target``."""
    await db.execute(
        "INSERT INTO staff_audit (actor, role, action, target, detail)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        actor.id, actor.role, action, target, _json.encode(detail or {}).decode())


async def audit_trail(db: Queryable, *, actor: str | None = None, target: str | None = None,
                      action: str | None = None, limit: int = 100) -> list[AuditEntry]:
    """The newest entries first, optionally of one actor, target or action."""
    rows = await db.fetch(
        "SELECT id, at, actor, role, action, target, detail FROM staff_audit"
        " WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR target = $2)"
        " AND ($3::text IS NULL OR action = $3) ORDER BY id DESC LIMIT $4",
        actor, target, action, limit)
    return [AuditEntry(r["id"], r["at"], r["actor"], r["role"], r["action"], r["target"],
                       msgspec.json.decode(r["detail"]) if isinstance(r["detail"], str)
                       else dict(r["detail"]))
            for r in rows]
