"""Who may call: account tokens, staff tokens, payment signatures.

These are Litestar ``before_request`` hooks (a Litestar guard copies its
route handler on every call, which costs more than the whole sold-out
answer): they run before the body is parsed, so an unauthenticated caller
learns nothing about validation, and answer a 401 problem themselves. The
account id lands in the scope for ``account_of(request)``; it only ever comes
from a verified token that Redis does not list as revoked. Staff routes take
``staff_required(*roles)``: a staff member's token (or the shared admin
token where enabled, as the bootstrap identity with every role), a 403
``role-required`` for another role, and a limit on failed attempts per client
address (429 ``too-many-attempts``, checked before the credentials).
"""

from __future__ import annotations

from typing import Any, cast

from litestar import Request, Response

from api.auth import Bearer, check_admin, verified_bearer, verify_payment
from api.context import api_of
from api.problems import problem, retry_after
from engine.store import staff
from engine.store.staff import Actor

__all__ = ["account_of", "account_required", "admin_required", "bearer_of", "header",
           "payment_signed", "staff_of", "staff_required", "too_many_attempts"]

_KEY = "haoyuan.account"
_BEARER_KEY = "haoyuan.bearer"
_STAFF_KEY = "haoyuan.staff"
_BEARER = {"WWW-Authenticate": 'Bearer realm="haoyuan"'}
AnyRequest = Request[Any, Any, Any]


def header(request: AnyRequest, name: bytes) -> str | None:
    """One request header (``name`` in lower case), read straight from the scope."""
    for k, v in request.scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def _unauthorized(request: AnyRequest, detail: str) -> Response[Any]:
    return problem("unauthorized", detail, instance=request.scope["path"], headers=_BEARER)


async def account_required(request: AnyRequest) -> Response[Any] | None:
    value = header(request, b"authorization")
    who = None
    api = api_of(request)
    if value is not None and value[:7].lower() == "bearer ":
        who = verified_bearer(api.tokens, value[7:].strip())
    if who is None:
        return _unauthorized(request, "a valid account token is required")
    if await api.token_revoked(who):
        return _unauthorized(request, "the token was revoked")
    state = cast(dict[str, Any], request.scope).setdefault("state", {})
    state[_KEY] = who.account
    state[_BEARER_KEY] = who
    return None


def account_of(request: AnyRequest) -> str:
    account: str = cast(dict[str, Any], request.scope)["state"][_KEY]
    return account


def bearer_of(request: AnyRequest) -> Bearer:
    who: Bearer = cast(dict[str, Any], request.scope)["state"][_BEARER_KEY]
    return who


def too_many_attempts(path: str, wait_ms: int) -> Response[Any]:
    ms, headers = retry_after(float(wait_ms), 1.0, 1.2)
    return problem("too-many-attempts", "retry after the given time", instance=path,
                   headers=headers, retry_after_ms=ms)


def staff_required(*roles: str) -> Any:
    """A ``before_request`` hook: a staff member with one of ``roles`` (any role if none)."""
    wanted = frozenset(roles)

    async def hook(request: AnyRequest) -> Response[Any] | None:
        api = api_of(request)
        path: str = request.scope["path"]
        wait = await api.limit("admin-failure", request.scope, take=False)
        if wait:
            return too_many_attempts(path, wait)
        value = header(request, b"authorization")
        token = value[7:].strip() if value and value[:7].lower() == "bearer " else ""
        actor: Actor | None = None
        if staff.looks_like_staff_token(token):
            actor = await staff.authenticate(api.pool, token)
        elif token and api.settings.shared_admin_enabled and check_admin(
                request.headers, api.settings.admin_token):
            actor = staff.BOOTSTRAP
        if actor is None:
            await api.limit("admin-failure", request.scope, take=True)
            return _unauthorized(request, "a staff token is required")
        if wanted and not actor.roles & wanted:
            return problem("role-required", "this needs the role " + " or ".join(sorted(wanted)),
                           instance=path)
        cast(dict[str, Any], request.scope).setdefault("state", {})[_STAFF_KEY] = actor
        return None

    return hook


#: Any staff member.
admin_required = staff_required()


def staff_of(request: AnyRequest) -> Actor:
    actor: Actor = cast(dict[str, Any], request.scope)["state"][_STAFF_KEY]
    return actor


async def payment_signed(request: AnyRequest) -> Response[Any] | None:
    """The payment side signs the timestamp, method, path (the hold id) and raw
    body (``api.auth.sign_payment``); a patient token is no use here."""
    api = api_of(request)
    ok = verify_payment(
        api.settings.payment_secret,
        header(request, b"x-payment-timestamp"),
        header(request, b"x-payment-signature"),
        await request.body(),
        method=request.scope["method"],
        path=request.scope["path"],
        max_skew_s=api.settings.payment_max_skew_s,
    )
    if not ok:
        return problem("bad-signature", instance=request.scope["path"])
    return None
