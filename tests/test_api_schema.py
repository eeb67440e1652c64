"""schemathesis against the app's own OpenAPI document, on a real granian
server: valid and invalid inputs on every operation; no 5xx, and every
response (status, content type, body, headers) matches the document.

Account routes get a real account token, admin routes the admin token; the
payment callback is called unsigned (its 401 is checked like any answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.settings import Settings
from tests.apikit import ADMIN, granian, server_env
from tests.enginekit import make_spec, new_database

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def server(redis_url: str, pg_dsn: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A granian server with one session, one account and one bound patient."""
    loop = asyncio.new_event_loop()
    dbs = new_database(pg_dsn)
    try:
        dsn = loop.run_until_complete(dbs.__aenter__())
        with granian(server_env(redis_url, dsn), workers=1) as base:
            with httpx.Client(base_url=base, timeout=30) as c:
                spec = make_spec("SCHEMA1", dept="DSCHEMA", date="2026-12-01")
                r = c.post("/v1/admin/sessions", content=msgspec.json.encode([spec]),
                           headers={**ADMIN, "Content-Type": "application/json"})
                assert r.status_code == 200, r.text
                token = c.post("/v1/auth/wechat", json={"code": "dev-schema"}).json()["token"]
                account = {"Authorization": f"Bearer {token}"}
            yield base, account
    finally:
        loop.run_until_complete(dbs.__aexit__(None, None, None))
        loop.close()


def _document() -> dict[str, Any]:
    """The app's OpenAPI document (building the app does no I/O)."""
    doc: dict[str, Any] = create_app(Settings(env="development")).openapi_schema.to_schema()
    return doc


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_served_document_is_the_one_tested(server: tuple[str, dict[str, str]]) -> None:
    served = httpx.get(server[0] + "/schema/openapi.json").json()
    assert served == msgspec.json.decode(msgspec.json.encode(DOCUMENT))


@schema.parametrize()
@settings(max_examples=15, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case: Any, server: tuple[str, dict[str, str]]) -> None:
    path = case.operation.path
    headers = dict(ADMIN) if path.startswith("/v1/admin") else dict(server[1])
    case.call_and_validate(base_url=server[0], headers=headers, checks=CHECKS)
