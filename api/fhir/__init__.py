"""The FHIR R4 scheduling facade under ``/fhir/r4``: other backends book
through the standards (Argonaut ``$find``/``$hold``/``$book``, Slot search,
cancel by status update) with the same engine decisions, rules and limits as
/v1; aggregators read the SMART Scheduling Links bulk publication.

Answers are ``application/fhir+json``; every error is an OperationOutcome
(``api.fhir.outcomes``; /v1 keeps RFC 9457). Backend clients authenticate
with a token from ``haoyuan fhir-client add`` and SMART system scopes
(``api.fhir.auth``); patients are resolved on the server
(``api.fhir.patients``).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router

from api.fhir.appointments import AppointmentController
from api.fhir.bulk import BulkController
from api.fhir.common import PATH
from api.fhir.outcomes import OutcomeError
from api.fhir.search import CapabilityController, SearchController

__all__ = ["fhir_router"]


def _on_outcome(request: Request[Any, Any, Any], exc: OutcomeError) -> Response[Any]:
    return exc.response


def fhir_router() -> Router:
    # Litestar's own errors (404, 405, validation) and ProblemErrors under
    # /fhir are turned into OperationOutcomes by api.errors.
    return Router(path="/", route_handlers=[CapabilityController, SearchController,
                                            AppointmentController, BulkController],
                  exception_handlers={OutcomeError: _on_outcome})


__all__ += ["PATH"]
