"""The Litestar application factory.

    app = create_app()                      # settings from HAOYUAN_* variables
    app = create_app(Settings(redis_url=...))

One ``Api`` per worker process (engine, PostgreSQL pool, caches, metrics) is
opened and closed by the app's lifespan. Every error leaves as an RFC 9457
problem: engine refusals through ``api.problems.REASONS``, Litestar's own
HTTP errors (validation -> 422, routing -> 404/405, body size -> 413), and
backing-service failures -> 503. Anything else is a bug: logged, and a 500
problem without details.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar
from litestar.datastructures import ResponseHeader, State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, ScalarRenderPlugin, SwaggerRenderPlugin

from api.context import Api
from api.docs import components, finish_openapi
from api.errors import on_error, on_http, on_problem
from api.fastpath import hold_fastpath
from api.fhir import fhir_router
from api.fhir.docs import FHIR_TAG, finish_fhir
from api.hardening import harden
from api.logs import configure_logging, request_context
from api.problems import SECURITY_HEADERS, ProblemError
from api.routes.admin import AdminController
from api.routes.auth import AuthController
from api.routes.bookings import BookingController
from api.routes.browse import AvailabilityController, CatalogController
from api.routes.dashboard import DashboardController
from api.routes.his import HisController
from api.routes.holds import HoldController
from api.routes.notifications import NotificationController
from api.routes.ops import OpsController, hello
from api.routes.patients import PatientController
from api.routes.payments import PaymentController
from api.routes.rules import RulesController
from api.routes.staff import StaffController
from api.routes.waitlist import WaitlistController
from api.settings import Settings
from api.strict import StrictRequest

__all__ = ["create_app"]

def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    api = Api(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await api.start()
        try:
            yield
        finally:
            await api.stop()

    handlers: list[Any] = [AuthController, PatientController, CatalogController,
                           AvailabilityController, HoldController, BookingController,
                           WaitlistController, AdminController, RulesController, StaffController,
                           OpsController, PaymentController, HisController, DashboardController,
                           NotificationController, fhir_router()]
    if settings.bench_endpoints:
        handlers.append(hello)
    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        state=State({"api": api}),
        exception_handlers={
            ProblemError: on_problem,
            HTTPException: on_http,
            Exception: on_error,
        },
        openapi_config=OpenAPIConfig(
            title="haoyuan",
            version="1",
            description="号源: hospital appointment booking at slot-release time",
            path="/schema",
            components=components(),
            # The pages load their scripts from a CDN: development only (Settings).
            render_plugins=([ScalarRenderPlugin(), SwaggerRenderPlugin()] if settings.docs_ui
                            else [JsonRenderPlugin()]),
            use_handler_docstrings=True,
            tags=[FHIR_TAG],
        ),
        logging_config=None,
        request_class=StrictRequest,
        response_headers=[ResponseHeader(name=k.decode(), value=v.decode())
                          for k, v in SECURITY_HEADERS],
        request_max_body_size=settings.max_body_bytes,
        debug=False,
    )
    finish_fhir(finish_openapi(app.openapi_schema))
    # Outermost, around Litestar's own exception handling: one wrapper for
    # every request (404s and 405s too), instead of a route middleware that
    # makes Litestar add a second exception-handling layer per route.
    handler = hold_fastpath(api, app.asgi_handler) if settings.fast_path else app.asgi_handler
    # Inside the request context (request id, metrics, access log): refuses
    # NUL and undecodable bytes, bounds the time a request body may take.
    handler = harden(api.body_deadlines)(handler)
    app.asgi_handler = request_context(api.metrics, settings.access_log)(handler)
    return app
