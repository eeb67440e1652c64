"""A real-name authority for tests and the demo, in process or over HTTP.

:class:`SimulatedRealName` answers like an ID-name-phone check with a face
check on top:

- people it knows (``register``): a claim matches when its name and phone
  are theirs (``data``), and with a valid ticket (``ticket()``) it is the
  person (``self``); any other name, phone or ticket is a ``mismatch``;
- ID numbers it does not know: every claim of one verifies at ``data``
  level (``unknown_ids="verify"``, the default: the demo's and load test's
  generated patients), or the authority has no record (``"unknown"``);
- ``down = True``: nothing is checked (``RealNameUnavailable``).

Tickets are stateless (an HMAC of the account and the ID with a fixed
simulator key), so every API worker process agrees on them.

Over HTTP (the wire contract of :class:`engine.identity.http.HttpRealNameVerifier`):
``simulator_app(sim)`` is a Litestar app answering ``POST /verify``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

import msgspec
from litestar import Litestar, Request, Response, post

from engine.identity.base import Claim, RealNameUnavailable, Verdict
from engine.identity.wire import VerifyAnswer, VerifyRequest

__all__ = ["SimulatedRealName", "simulator_app"]

_KEY = hashlib.sha256(b"haoyuan real-name simulator").digest()


class SimulatedRealName:
    def __init__(self, *, unknown_ids: Literal["verify", "unknown"] = "verify") -> None:
        self.unknown_ids = unknown_ids
        self.down = False
        self.calls = 0
        self._people: dict[str, tuple[str, str]] = {}
        self._seq = 0

    def register(self, national_id: str, name: str, phone: str) -> None:
        """The authority's record of a person (normalised ID and phone)."""
        self._people[national_id] = (name, phone)

    @staticmethod
    def ticket(account: str, national_id: str) -> str:
        """The ticket ``account``'s phone gets when ``national_id``'s person passes the check."""
        mac = hmac.new(_KEY, f"{account}|{national_id}".encode(), hashlib.sha256).hexdigest()
        return "simt-" + mac[:32]

    async def verify(self, claim: Claim) -> Verdict:
        self.calls += 1
        if self.down:
            raise RealNameUnavailable("the simulated authority is down")
        self._seq += 1
        ref = f"sim-{self._seq}"
        known = self._people.get(claim.national_id)
        if known is None and self.unknown_ids == "unknown":
            return Verdict(outcome="unknown", reference=ref, reason="no record of this ID")
        if known is not None and known != (claim.name, claim.phone):
            return Verdict(outcome="mismatch", reference=ref, reason="name or phone differ")
        if claim.ticket is None:
            return Verdict(outcome="verified", level="data", reference=ref)
        if hmac.compare_digest(claim.ticket, self.ticket(claim.account, claim.national_id)):
            return Verdict(outcome="verified", level="self", reference=ref)
        return Verdict(outcome="mismatch", reference=ref, reason="the ticket is not valid")

    async def aclose(self) -> None:
        return None


def simulator_app(sim: SimulatedRealName, key: str) -> Litestar:
    """The simulator behind the HTTP wire contract; callers send ``Bearer <key>``."""

    @post("/verify", status_code=200)
    async def verify(request: Request[Any, Any, Any], data: VerifyRequest) -> Response[Any]:
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {key}".encode()):
            return Response({"error": "unauthorized"}, status_code=401)
        try:
            v = await sim.verify(Claim(national_id=data.id_number, name=data.name,
                                       phone=data.phone, account=data.account,
                                       ticket=data.ticket))
        except RealNameUnavailable:
            return Response({"error": "down"}, status_code=503)
        result: Literal["match", "mismatch", "not_found"] = (
            "match" if v.verified else "mismatch" if v.outcome == "mismatch" else "not_found")
        body = VerifyAnswer(result=result, self=v.level == "self", reference=v.reference,
                            reason=v.reason)
        return Response(msgspec.to_builtins(body))

    return Litestar([verify], debug=False)
