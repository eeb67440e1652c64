"""The JSON wire contract of an HTTP real-name gateway (see ``engine.identity.http``).

    POST <url>   Authorization: Bearer <key>   Content-Type: application/json
    {"id_number": "...", "name": "...", "phone": "...", "account": "...", "ticket": null}

    200 {"result": "match" | "mismatch" | "not_found", "self": false,
         "reference": "...", "reason": null}

Any other status, or a body that does not decode, means nothing was checked.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = ["VerifyAnswer", "VerifyRequest"]

_Short = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class VerifyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id_number: _Short
    name: _Short
    phone: _Short
    account: _Short
    ticket: Annotated[str, msgspec.Meta(max_length=512)] | None = None


class VerifyAnswer(msgspec.Struct, frozen=True):
    result: Literal["match", "mismatch", "not_found"]
    #: The ticket proved that the account holder is the person.
    self: bool = False
    reference: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    reason: Annotated[str, msgspec.Meta(max_length=256)] | None = None
