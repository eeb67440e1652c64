"""Ops: liveness, readiness, metrics, the problem type documents, and the
benchmark's hello-world ceiling (mounted only with ``bench_endpoints``)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, get

from api.context import OpsStatus, api_of
from api.docs import errors
from api.metrics import CONTENT_TYPE
from api.problems import KINDS, ProblemError, problem


class Live(msgspec.Struct, frozen=True):
    status: Literal["ok"] = "ok"


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

    @get("/readyz", responses=errors(503),
         summary="Readiness: Redis, PostgreSQL, and the outbox writer's lag")
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[OpsStatus]:
        api = api_of(request)
        st = await api.ops_status()
        lag_ok = st.writer_oldest_pending_age_ms <= api.settings.writer_lag_max_ms
        if st.redis and st.postgres and lag_ok:
            return Response(st)
        failing = [n for n, ok in (("redis", st.redis), ("postgres", st.postgres),
                                   ("writer lag", lag_ok)) if not ok]
        return problem("not-ready", "failing: " + ", ".join(failing),
                       instance=request.scope["path"])

    @get("/metrics", media_type=CONTENT_TYPE,
         summary="Prometheus metrics of the worker that answers (see api.metrics)")
    async def metrics(self, request: Request[Any, Any, Any]) -> Response[str]:
        api = api_of(request)
        await api.ops_status()
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
