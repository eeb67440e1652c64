"""SMART Scheduling Links: the ``$bulk-publish`` manifest and its NDJSON files.

Public (the data is public by design: no token), read from the last
publication ``haoyuan publish`` wrote to PostgreSQL (``engine.scheduling.publish``),
micro-cached per worker. Both answer ``ETag`` and ``Cache-Control:
max-age=60`` (aggregators poll at most once a minute) and a 304 to a
matching ``If-None-Match``. Before the first publication the manifest lists
no files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get

from api.context import api_of
from api.fhir import common
from api.fhir.outcomes import OutcomeError
from api.problems import SECURITY_HEADERS, RawResponse
from engine.store import scheduling as store

__all__ = ["BulkController"]

AnyRequest = Request[Any, Any, Any]
_NAME = re.compile(r"[A-Za-z0-9.-]{1,120}\.ndjson", re.ASCII)
_encode = msgspec.json.Encoder().encode
MAX_AGE_S = 60
_NOT_CACHE = [(k, v) for k, v in SECURITY_HEADERS if k != b"cache-control"]


def _public(request: AnyRequest, body: bytes, media: str, etag: str) -> Response[Any]:
    """A public, cacheable answer (the one place without ``no-store``)."""
    tag = f'"{etag}"'
    match = request.headers.get("if-none-match")
    status, payload = (304, b"") if match is not None and tag in (
        t.strip() for t in match.split(",")) else (200, body)
    resp = RawResponse(payload, status, media)
    resp._raw.headers = [(b"content-type", media.encode()),
                         (b"content-length", str(len(payload)).encode()), *_NOT_CACHE,
                         (b"cache-control", f"public, max-age={MAX_AGE_S}".encode()),
                         (b"etag", tag.encode())]
    return resp


class BulkController(Controller):
    path = common.PATH
    tags = ("fhir",)

    @get("/$bulk-publish", summary="SMART Scheduling Links manifest (public)")
    async def manifest(self, request: AnyRequest) -> Response[Any]:
        """``transactionTime``, ``request``, ``output`` (Location, Schedule
        and per-hospital Slot NDJSON files, with ``extension.state`` where
        known) and ``error``."""
        api = api_of(request)
        base = common.base_url(api)

        async def load() -> bytes:
            got = await store.bulk_manifest(api.pool)
            when = got[0] if got is not None else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
            files = got[2] if got is not None else []
            out: list[dict[str, Any]] = []
            for f in files:
                item: dict[str, Any] = {"type": f.type, "url": f"{base}/bulk/{f.name}"}
                if f.jurisdiction:
                    item["extension"] = {"state": f.jurisdiction}
                out.append(item)
            return _encode({
                "transactionTime": when.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
                "request": f"{base}/$bulk-publish", "output": out, "error": []})

        body = await api.catalog_cache.get("bulk-manifest", load)
        return _public(request, body, "application/json", hashlib.sha256(body).hexdigest()[:32])

    @get("/bulk/{name:str}", summary="One NDJSON file of the bulk publication (public)")
    async def file(self, request: AnyRequest, name: str) -> Response[Any]:
        api = api_of(request)
        if not _NAME.fullmatch(name):
            raise OutcomeError.of("not-found", "no such file")

        async def load() -> bytes:
            f = await store.bulk_file(api.pool, name)
            return b"" if f is None else f.etag.encode() + b"\n" + f.body

        got = await api.catalog_cache.get(("bulk", name), load)
        if not got:
            raise OutcomeError.of("not-found", "no such file")
        etag, _, body = got.partition(b"\n")
        return _public(request, body, "application/fhir+ndjson", etag.decode())
