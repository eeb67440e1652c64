"""OpenAPI helpers: problem responses per route, and the finishing pass.

Routes list the problem statuses they answer (``errors(401, 404, 409)``); the
finishing pass then replaces Litestar's generic 400 with our 422 problem
(validation errors are answered 422 here), and adds the statuses every
operation can answer: 422 where there is input; 408, 413 and 415 where there
is a body (too slow, too large, not JSON); 503 when a backing service is down.
"""

from __future__ import annotations

from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    Reference,
    SecurityScheme,
)

from api.problems import PROBLEM_MEDIA, Problem

__all__ = ["ACCOUNT", "ADMIN", "OPS", "PAYMENT", "components", "errors", "finish_openapi"]

ACCOUNT: list[dict[str, list[str]]] = [{"account": []}]
ADMIN: list[dict[str, list[str]]] = [{"admin": []}]
PAYMENT: list[dict[str, list[str]]] = [{"payment_timestamp": [], "payment_signature": []}]
OPS: list[dict[str, list[str]]] = [{"ops": []}]

_TEXT = {
    401: "Not authenticated (missing, expired or forged token or signature)",
    403: "Forbidden",
    404: "Not found (or not yours)",
    409: "Refused in the current state (sold out, not open, duplicate, expired, ...)",
    408: "The request body did not arrive in time",
    413: "Request body too large",
    415: "The body is not application/json",
    422: "Invalid input",
    429: "Rate limited or shed; see Retry-After",
    502: "An upstream service answered badly",
    503: "A backing service is unavailable",
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        s: ResponseSpec(data_container=Problem, description=_TEXT[s], media_type=PROBLEM_MEDIA,
                        generate_examples=False)
        for s in statuses
    }


def components() -> Components:
    return Components(
        security_schemes={
            "account": SecurityScheme(
                type="http", scheme="bearer",
                description="Account token from POST /v1/auth/wechat"),
            "admin": SecurityScheme(
                type="http", scheme="bearer",
                description="A staff member's token (haoyuan staff add; roles operator, clerk,"
                            " finance), or HAOYUAN_ADMIN_TOKEN where the shared token is enabled"),
            "ops": SecurityScheme(type="http", scheme="bearer",
                                  description="HAOYUAN_OPS_TOKEN (/metrics, the detailed /readyz)"),
            "payment_timestamp": SecurityScheme(
                type="apiKey", name="X-Payment-Timestamp", security_scheme_in="header",
                description="Unix seconds; within 5 minutes of the server clock"),
            "payment_signature": SecurityScheme(
                type="apiKey", name="X-Payment-Signature", security_scheme_in="header",
                description='hex HMAC-SHA256(payment secret, "v2\\n{timestamp}\\n{METHOD}'
                            '\\n{path}\\n" + raw body): binds the hold id in the path'),
        }
    )


def _operations(openapi: OpenAPI) -> list[Any]:
    ops = []
    for item in (openapi.paths or {}).values():
        for method in ("get", "put", "post", "delete", "patch"):
            op = getattr(item, method, None)
            if op is not None and op.responses is not None:
                ops.append(op)
    return ops


def _problem_ref(ops: list[Any]) -> Any:
    for op in ops:
        for resp in op.responses.values():
            if isinstance(resp, OpenAPIResponse) and resp.content:
                media = resp.content.get(PROBLEM_MEDIA)
                if media is not None and isinstance(media.schema, Reference):
                    return media.schema
    return None


def finish_openapi(openapi: OpenAPI) -> OpenAPI:
    ops = _operations(openapi)
    ref = _problem_ref(ops)
    for op in ops:
        responses = op.responses
        had_input = "400" in responses or bool(op.parameters) or op.request_body is not None
        responses.pop("400", None)
        wanted = {"503"}
        if had_input:
            wanted.add("422")
        if op.request_body is not None:
            wanted |= {"408", "413", "415"}
        for code in sorted(wanted):
            if code not in responses:
                responses[code] = _problem_response(int(code), ref)
    return openapi


def _problem_response(status: int, ref: Any) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=_TEXT[status],
        content={PROBLEM_MEDIA: OpenAPIMediaType(schema=ref)} if ref is not None else None,
    )
