"""FHIR request bodies, read strictly: what the facade reads of them, typed.

A body must be ``application/fhir+json`` (or ``application/json``; a PATCH
``application/json-patch+json``), nest at most ``api.strict.MAX_DEPTH``
levels and repeat no key; every element the facade reads must have its FHIR
JSON type (no ``"3"`` for an integer). Elements the facade does not read are
ignored (a client may send whole resources), never stored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec
from litestar import Request

from api.fhir.outcomes import OutcomeError
from api.strict import MAX_DEPTH, json_depth_ok

__all__ = [
    "Appointment",
    "Coding",
    "HumanName",
    "Identifier",
    "Param",
    "Parameters",
    "PatchOp",
    "Patient",
    "Reference",
    "read_body",
]

_MEDIA = {"application/fhir+json", "application/json"}
_PATCH = "application/json-patch+json"


class Identifier(msgspec.Struct, frozen=True):
    system: str | None = None
    value: str | None = None


class Coding(msgspec.Struct, frozen=True):
    system: str | None = None
    code: str | None = None


class Reference(msgspec.Struct, frozen=True):
    reference: str | None = None
    identifier: Identifier | None = None
    type: str | None = None
    display: str | None = None


class HumanName(msgspec.Struct, frozen=True):
    text: str | None = None
    family: str | None = None
    given: list[str] = []


class ContactPoint(msgspec.Struct, frozen=True):
    system: str | None = None
    value: str | None = None


class Patient(msgspec.Struct, frozen=True, tag_field="resourceType", tag="Patient"):
    id: str | None = None
    identifier: list[Identifier] = []
    name: list[HumanName] = []
    telecom: list[ContactPoint] = []


class Participant(msgspec.Struct, frozen=True):
    actor: Reference | None = None
    status: str | None = None


class Appointment(msgspec.Struct, frozen=True, tag_field="resourceType", tag="Appointment"):
    id: str | None = None
    status: str | None = None
    identifier: list[Identifier] = []
    slot: list[Reference] = []
    participant: list[Participant] = []
    #: Only contained Patients are read (``participant.actor.reference = "#id"``).
    contained: list[dict[str, Any]] = []


class Money(msgspec.Struct, frozen=True):
    value: int | float | None = None
    currency: str | None = None


class Param(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    value_uri: str | None = None
    value_string: str | None = None
    value_date_time: str | None = None
    value_code: str | None = None
    value_integer: int | None = None
    value_money: Money | None = None
    value_identifier: Identifier | None = None
    value_reference: Reference | None = None
    resource: dict[str, Any] | None = None

    @property
    def text(self) -> str | None:
        """The value of a uri, string, dateTime or code parameter."""
        for v in (self.value_uri, self.value_string, self.value_date_time, self.value_code):
            if v is not None:
                return v
        if self.value_reference is not None:
            return self.value_reference.reference
        return None


class Parameters(msgspec.Struct, frozen=True, tag_field="resourceType", tag="Parameters"):
    parameter: list[Param] = []

    def all(self, name: str) -> list[Param]:
        return [p for p in self.parameter if p.name == name]

    def one(self, name: str) -> Param | None:
        got = self.all(name)
        if len(got) > 1:
            raise OutcomeError.of("invalid-input", f"parameter {name[:40]} is given twice")
        return got[0] if got else None


class PatchOp(msgspec.Struct, frozen=True):
    op: str
    path: str
    value: Any = None


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise OutcomeError.of("invalid-input", "the request body repeats a key")
    return out


def decode_resource(raw: Any, typ: Any) -> Any:
    """A resource already parsed to plain JSON (a Parameters' ``resource``), typed."""
    try:
        return msgspec.convert(raw, typ, strict=True)
    except msgspec.ValidationError as exc:
        raise OutcomeError.of("invalid-input", "the resource does not match what the operation"
                              " reads: " + str(exc)[:200]) from None


async def read_body(request: Request[Any, Any, Any], typ: Any,
                    kind: Literal["fhir", "patch"] = "fhir") -> Any:
    """The request body as ``typ`` (an OperationOutcome error otherwise)."""
    ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if (kind == "patch" and ctype != _PATCH) or (kind == "fhir" and ctype not in _MEDIA):
        want = _PATCH if kind == "patch" else "application/fhir+json"
        raise OutcomeError.of("unsupported-media-type", f"send the body as {want}")
    body = await request.body()
    if not json_depth_ok(body):
        raise OutcomeError.of("invalid-input", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        json.loads(body, object_pairs_hook=_dupes)
    except OutcomeError:
        raise
    except (ValueError, RecursionError):
        raise OutcomeError.of("invalid-input", "the request body is malformed") from None
    decoder = _decoders.get(typ)
    if decoder is None:
        decoder = _decoders[typ] = msgspec.json.Decoder(typ, strict=True)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise OutcomeError.of("invalid-input", "the request does not match what the operation"
                              " reads: " + str(exc)[:200]) from None
    except msgspec.DecodeError:
        raise OutcomeError.of("invalid-input", "the request body is malformed") from None
