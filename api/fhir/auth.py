"""Who may call the facade: backend clients with SMART system scopes.

``client_required(resource, action)`` is a ``before_request`` hook (like
``api.guards``): a ``Bearer hyf_...`` token of an active client
(``engine.store.fhir_clients``; a worker trusts a token it checked for
``Settings.fhir_client_cache_s``) whose scopes allow ``action`` on
``resource``: else 401 (with ``WWW-Authenticate``) or 403 ``scope-required``,
as OperationOutcomes. Failed tokens count against the client address's
limit of failed attempts (429 ``too-many-attempts``, checked first).

``take_quota`` spends one request of the client's own quota (GCRA per
client, ``fhir_clients.rate_per_s``/``burst``): 429 ``rate-limited`` with
Retry-After past it. The per-account and per-patient limits of every hold
apply on top (the engine's).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, cast

from litestar import Request, Response

from api.context import Api, api_of
from api.fhir.outcomes import OutcomeError, outcome
from api.guards import header
from api.problems import retry_after
from engine.store import fhir_clients
from engine.store.fhir_clients import FhirClient

__all__ = ["client_of", "client_required", "take_quota"]

_KEY = "haoyuan.fhir_client"
_BEARER = {"WWW-Authenticate": 'Bearer realm="haoyuan-fhir"'}
_CACHE: dict[str, tuple[FhirClient | None, float]] = {}
#: Lookups in flight: a spike of one client's requests shares one query.
_PENDING: dict[str, asyncio.Future[FhirClient | None]] = {}
AnyRequest = Request[Any, Any, Any]


async def _client(api: Api, token: str) -> FhirClient | None:
    hit = _CACHE.get(token)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    pending = _PENDING.get(token)
    if pending is not None:
        return await asyncio.shield(pending)
    fut: asyncio.Future[FhirClient | None] = asyncio.get_running_loop().create_future()
    _PENDING[token] = fut
    try:
        client = await fhir_clients.authenticate(api.pool, token)
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # retrieved: the callers that share it re-raise it
        raise
    finally:
        del _PENDING[token]
    fut.set_result(client)
    if client is not None:
        if len(_CACHE) > 10_000:
            _CACHE.clear()
        _CACHE[token] = (client, time.monotonic() + api.settings.fhir_client_cache_s)
    return client


def client_required(resource: str, action: Literal["read", "write"]) -> Any:
    async def hook(request: AnyRequest) -> Response[Any] | None:
        api = api_of(request)
        wait = await api.limit("admin-failure", request.scope, take=False)
        if wait:
            ms, headers = retry_after(float(wait), 1.0, 1.2)
            return outcome("too-many-attempts", "retry after the given time", headers=headers,
                           retry_after_ms=ms)
        value = header(request, b"authorization")
        token = value[7:].strip() if value and value[:7].lower() == "bearer " else ""
        client = (await _client(api, token)
                  if fhir_clients.looks_like_client_token(token) else None)
        if client is None:
            await api.limit("admin-failure", request.scope, take=True)
            return outcome("unauthorized", "a FHIR client token (haoyuan fhir-client add) is"
                           " required", headers=_BEARER)
        if not client.may(resource, action):
            return outcome("scope-required", f"this needs the scope system/{resource}.{action}")
        cast(dict[str, Any], request.scope).setdefault("state", {})[_KEY] = client
        return None

    return hook


def client_of(request: AnyRequest) -> FhirClient:
    client: FhirClient = cast(dict[str, Any], request.scope)["state"][_KEY]
    return client


async def take_quota(api: Api, client: FhirClient) -> None:
    """One request of the client's quota, or an OutcomeError (429 rate-limited)."""
    if client.rate_per_s <= 0:
        return
    wait = await api.engine.limit("fhir", client.id, take=True,
                                  interval_ms=max(1, round(1000 / client.rate_per_s)),
                                  burst=client.burst)
    if wait:
        ms, headers = retry_after(float(wait), 1.0, 1.5)
        raise OutcomeError.of("rate-limited", "this client's quota is spent; retry later",
                              headers=headers, retry_after_ms=ms)
