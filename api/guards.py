"""Who may call: account tokens, the admin token, payment signatures.

These are Litestar ``before_request`` hooks (a Litestar guard copies its
route handler on every call, which costs more than the whole sold-out
answer): they run before the body is parsed, so an unauthenticated caller
learns nothing about validation, and answer a 401 problem themselves. The
account id lands in the scope for ``account_of(request)``; it only ever comes
from a verified token.
"""

from __future__ import annotations

from typing import Any, cast

from litestar import Request, Response

from api.auth import check_admin, verify_payment
from api.context import api_of
from api.problems import problem

__all__ = ["account_of", "account_required", "admin_required", "header", "payment_signed"]

_KEY = "haoyuan.account"
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
    account = None
    if value is not None and value[:7].lower() == "bearer ":
        account = api_of(request).tokens.verify(value[7:].strip())
    if account is None:
        return _unauthorized(request, "a valid account token is required")
    cast(dict[str, Any], request.scope).setdefault("state", {})[_KEY] = account
    return None


def account_of(request: AnyRequest) -> str:
    account: str = cast(dict[str, Any], request.scope)["state"][_KEY]
    return account


async def admin_required(request: AnyRequest) -> Response[Any] | None:
    if not check_admin(request.headers, api_of(request).settings.admin_token):
        return _unauthorized(request, "the admin token is required")
    return None


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
