"""Ops: liveness, readiness, metrics, the problem type documents, and the
benchmark's hello-world ceiling (mounted only with ``bench_endpoints``)."""

from __future__ import annotations

import hmac
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, get

from api.context import OpsStatus, api_of
from api.docs import OPS, errors
from api.guards import header
from api.metrics import CONTENT_TYPE
from api.problems import KINDS, ProblemError, problem
from api.settings import DEV_WARNING


class Live(msgspec.Struct, frozen=True):
    status: Literal["ok"] = "ok"


class Ready(msgspec.Struct, frozen=True, omit_defaults=True):
    """What anyone may learn: ready or not, and whether this is a development instance."""

    status: Literal["ready"]
    mode: str
    warning: str | None = None


def ops_allowed(request: Request[Any, Any, Any]) -> bool:
    """The ops token (``HAOYUAN_OPS_TOKEN``) was presented; a development
    instance without one is open."""
    settings = api_of(request).settings
    if not settings.ops_token:
        return settings.development
    value = header(request, b"authorization") or ""
    if value[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(value[7:].strip().encode("latin-1"),
                               settings.ops_token.encode())


def _ops_unauthorized(request: Request[Any, Any, Any]) -> Response[Any]:
    return problem("unauthorized", "the ops token is required", instance=request.scope["path"],
                   headers={"WWW-Authenticate": 'Bearer realm="haoyuan-ops"'})


class ProblemType(msgspec.Struct, frozen=True):
    type: str
    title: str
    status: int


class OpsController(Controller):
    path = "/"
    tags = ("ops",)
    include_in_schema = True

    @get("/healthz", summary="Liveness: the worker answers")
    async def healthz(self) -> Live:
        return Live()

    @get("/readyz", responses=errors(503), security=[*OPS, {}],
         summary="Readiness: Redis, PostgreSQL, and the outbox writer's lag")
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[Ready | OpsStatus]:
        """With the ops token: every figure (``OpsStatus``). Without: only
        ``status`` and ``mode`` (and a ``warning`` on a development instance)."""
        api = api_of(request)
        st = await api.ops_status()
        lag_ok = st.writer_oldest_pending_age_ms <= api.settings.writer_lag_max_ms
        detailed = ops_allowed(request)
        if st.redis and st.postgres and lag_ok:
            if detailed:
                return Response(st)
            return Response(Ready(status="ready", mode=api.settings.env,
                                  warning=DEV_WARNING if api.settings.development else None))
        failing = [n for n, ok in (("redis", st.redis), ("postgres", st.postgres),
                                   ("writer lag", lag_ok)) if not ok]
        return problem("not-ready", "failing: " + ", ".join(failing) if detailed else None,
                       instance=request.scope["path"])

    @get("/metrics", media_type=CONTENT_TYPE, security=OPS, responses=errors(401),
         summary="Prometheus metrics of the worker that answers (see api.metrics)")
    async def metrics(self, request: Request[Any, Any, Any]) -> Response[str]:
        """Needs the ops token (``HAOYUAN_OPS_TOKEN``)."""
        if not ops_allowed(request):
            return _ops_unauthorized(request)
        api = api_of(request)
        await api.ops_status()
        api.metrics.waiting_line.set(api.waiting.waiting_now())
        return Response(api.metrics.render().decode(), media_type=CONTENT_TYPE)

    @get("/problems/{slug:str}", responses=errors(404), summary="What a problem type means")
    async def problem_type(self, request: Request[Any, Any, Any], slug: str) -> ProblemType:
        k = KINDS.get(slug)
        if k is None:
            raise ProblemError.of("not-found", "no such problem type",
                                  instance=request.scope["path"])
        return ProblemType(k.type, k.title, k.status)


@get("/bench/hello", include_in_schema=False)
async def hello() -> dict[str, str]:
    """The benchmark's ceiling: a bare Litestar hello-world in the same app."""
    return {"hello": "world"}
