"""Real-name bindings beyond bind and unbind (``engine.store.queries``): a
binding's state for holds, its claim for a new check, the other accounts
bound to the same ID number and their revocation, and token revocations.

Every change to one ID's bindings runs under that ID's advisory lock
(``queries.lock_id``), so the per-ID limit and the revocation rules hold
under concurrency.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

from engine.pii import Crypto, mask_name, mask_phone
from engine.store.queries import (
    Connection,
    IdAccountLimit,
    PatientView,
    Queryable,
    _parse_uuid,
    _view,
    lock_id,
)

__all__ = [
    "BindingState",
    "CoBinding",
    "NotAllowed",
    "Revocation",
    "binding_state",
    "bound_view",
    "claim_of",
    "co_bindings",
    "live_revocations",
    "record_revocation",
    "revoke_binding",
    "set_verification",
]

_VERIFIED = ("self", "data")
_COLS = "id, name_enc, phone_enc, national_id_enc, created_at, id_hash, verification"


class NotAllowed(PermissionError):
    """The caller's binding may not do this (``why``: ``unverified`` or ``weaker``)."""

    def __init__(self, why: Literal["unverified", "weaker"]) -> None:
        super().__init__(why)
        self.why = why


class BindingState(msgspec.Struct, frozen=True):
    ref: str
    verification: str

    @property
    def verified(self) -> bool:
        return self.verification in _VERIFIED


async def binding_state(db: Queryable, account_id: str, patient_id: str) -> BindingState | None:
    """The ref and check state of one of the account's active bindings, or None."""
    pid = _parse_uuid(patient_id)
    if pid is None:
        return None
    r = await db.fetchrow(
        "SELECT id_hash, verification FROM patients"
        " WHERE id = $1 AND account_id = $2 AND unbound_at IS NULL",
        pid,
        account_id,
    )
    return None if r is None else BindingState(r["id_hash"], r["verification"])


async def bound_view(db: Queryable, crypto: Crypto, account_id: str, ref: str
                     ) -> PatientView | None:
    """The account's active binding of the ID with this ref, if any."""
    r = await db.fetchrow(
        f"SELECT {_COLS} FROM patients WHERE account_id = $1 AND id_hash = $2"
        " AND unbound_at IS NULL",
        account_id,
        ref,
    )
    return None if r is None else _view(crypto, r)


async def claim_of(
    db: Queryable, crypto: Crypto, account_id: str, patient_id: str
) -> tuple[PatientView, str, str, str] | None:
    """One of the account's active bindings: its view and its decrypted
    ``(national ID, name, phone)`` for a new real-name check; None if not bound."""
    pid = _parse_uuid(patient_id)
    if pid is None:
        return None
    r = await db.fetchrow(
        f"SELECT {_COLS} FROM patients WHERE id = $1 AND account_id = $2 AND unbound_at IS NULL",
        pid,
        account_id,
    )
    if r is None:
        return None

    def dec(column: str) -> str:
        return crypto.decrypt(r[column], table="patients", column=column, row_id=str(pid))

    return _view(crypto, r), dec("national_id_enc"), dec("name_enc"), dec("phone_enc")


_STRENGTH = {"self": 2, "data": 1}


async def set_verification(
    conn: Connection,
    crypto: Crypto,
    account_id: str,
    patient_id: str,
    verification: str,
    reference: str | None,
    *,
    max_accounts: int,
) -> PatientView | None:
    """Record a new check of one of the account's bindings, if it is stronger
    than the recorded one (a later failure never takes a verification away).
    Becoming verified obeys the per-ID limit (``IdAccountLimit``, as in
    ``bind_patient``). The binding's view; None if it is not bound."""
    pid = _parse_uuid(patient_id)
    if pid is None:
        return None
    async with conn.transaction():
        ref = await conn.fetchval(
            "SELECT id_hash FROM patients WHERE id = $1 AND account_id = $2"
            " AND unbound_at IS NULL",
            pid,
            account_id,
        )
        if ref is None:
            return None
        await lock_id(conn, ref)
        r = await conn.fetchrow(
            f"SELECT {_COLS} FROM patients WHERE id = $1 AND unbound_at IS NULL FOR UPDATE", pid
        )
        if r is None:
            return None
        old = _STRENGTH.get(r["verification"], 0)
        new = _STRENGTH.get(verification, 0)
        if new > old or (new == old == 0 and verification != r["verification"]):
            if new > 0 and old == 0 and verification != "self":
                n = await conn.fetchval(
                    "SELECT count(*) FROM patients WHERE id_hash = $1 AND unbound_at IS NULL"
                    " AND id <> $2 AND verification = any($3::text[])",
                    ref,
                    pid,
                    list(_VERIFIED),
                )
                if n >= max_accounts:
                    raise IdAccountLimit(
                        f"an ID number is bound to at most {max_accounts} accounts")
            r = await conn.fetchrow(
                "UPDATE patients SET verification = $2, verification_ref = $3,"
                " verified_at = CASE WHEN $4 THEN now() ELSE verified_at END"
                f" WHERE id = $1 RETURNING {_COLS}",
                pid,
                verification,
                reference,
                new > 0,
            )
    return _view(crypto, r)


class CoBinding(msgspec.Struct, frozen=True):
    """Another account's binding of the same ID number, as its patient sees it."""

    binding_id: str
    masked_name: str
    masked_phone: str
    verification: str
    created_at: dt.datetime


async def co_bindings(
    db: Queryable, crypto: Crypto, account_id: str, patient_id: str
) -> list[CoBinding] | None:
    """The other accounts' active bindings of the ID behind one of the
    account's bindings, oldest first (masked); None if that is not bound.
    Only a verified binding may see them (``NotAllowed("unverified")``)."""
    mine = await binding_state(db, account_id, patient_id)
    if mine is None:
        return None
    if not mine.verified:
        raise NotAllowed("unverified")
    rows = await db.fetch(
        "SELECT id, name_enc, phone_enc, verification, created_at FROM patients"
        " WHERE id_hash = $1 AND unbound_at IS NULL AND account_id <> $2"
        " ORDER BY created_at, id",
        mine.ref,
        account_id,
    )
    out = []
    for r in rows:
        rid = str(r["id"])

        def dec(column: str, r: Any = r, rid: str = rid) -> str:
            return crypto.decrypt(r[column], table="patients", column=column, row_id=rid)

        out.append(CoBinding(rid, mask_name(dec("name_enc")), mask_phone(dec("phone_enc")),
                             r["verification"], r["created_at"]))
    return out


async def revoke_binding(
    conn: Connection,
    account_id: str,
    patient_id: str,
    target_id: str,
    on_revoke: Callable[[str, str], Awaitable[None]],
) -> bool:
    """Revoke another account's binding of the same ID as one of the
    account's bindings. Who may: a ``self``-verified binding (the person)
    any other; a ``data``-verified one only unverified bindings
    (``NotAllowed``). ``on_revoke(account, binding id)`` runs before the
    commit (the binding mirror's tombstone: should the commit fail, the
    binding has less access, never more). False if either is not bound."""
    pid, tid = _parse_uuid(patient_id), _parse_uuid(target_id)
    if pid is None or tid is None or pid == tid:
        return False
    async with conn.transaction():
        mine = await conn.fetchrow(
            "SELECT id_hash, verification FROM patients WHERE id = $1 AND account_id = $2"
            " AND unbound_at IS NULL",
            pid,
            account_id,
        )
        if mine is None:
            return False
        await lock_id(conn, mine["id_hash"])
        ref = mine["id_hash"]
        # Read again under the lock: a concurrent revocation may have won.
        mine = await conn.fetchrow(
            "SELECT verification FROM patients WHERE id = $1 AND unbound_at IS NULL", pid
        )
        target = await conn.fetchrow(
            "SELECT account_id, verification FROM patients WHERE id = $1 AND id_hash = $2"
            " AND unbound_at IS NULL AND account_id <> $3",
            tid,
            ref,
            account_id,
        )
        if mine is None or target is None:
            return False
        if mine["verification"] not in _VERIFIED:
            raise NotAllowed("unverified")
        if mine["verification"] != "self" and target["verification"] in _VERIFIED:
            raise NotAllowed("weaker")
        await on_revoke(target["account_id"], str(tid))
        await conn.execute(
            "UPDATE patients SET unbound_at = now(), unbound_reason = 'revoked', revoked_by = $2"
            " WHERE id = $1",
            tid,
            pid,
        )
    return True


# --------------------------------------------------------------------------- token revocations


class Revocation(msgspec.Struct, frozen=True):
    account_id: str
    #: None: every token of the account expiring at or before ``until_s``.
    token_id: str | None
    until_s: int


async def record_revocation(db: Queryable, r: Revocation, revoked_by: str) -> None:
    await db.execute(
        "INSERT INTO token_revocations (account_id, token_id, until, revoked_by)"
        " VALUES ($1, $2, to_timestamp($3), $4)",
        r.account_id,
        r.token_id,
        r.until_s,
        revoked_by,
    )


async def live_revocations(db: Queryable) -> list[Revocation]:
    """Revocations of tokens that have not expired yet (for ``rebuild-bindings``)."""
    rows = await db.fetch(
        "SELECT account_id, token_id, extract(epoch FROM until)::bigint AS until_s"
        " FROM token_revocations WHERE until > now() ORDER BY id"
    )
    return [Revocation(r["account_id"], r["token_id"], int(r["until_s"])) for r in rows]
