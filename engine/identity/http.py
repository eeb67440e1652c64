"""A real-name verifier over HTTP: the hospital's gateway to its authority
(a carrier ID-name-phone check, WeChat's real-name / face check, the HIS
patient index), speaking the JSON contract of ``engine.identity.wire``."""

from __future__ import annotations

import httpx
import msgspec

from engine.identity.base import Claim, RealNameUnavailable, Verdict
from engine.identity.wire import VerifyAnswer, VerifyRequest

__all__ = ["HttpRealNameVerifier"]

_decode = msgspec.json.Decoder(VerifyAnswer).decode
_encode = msgspec.json.Encoder().encode


class HttpRealNameVerifier:
    def __init__(self, url: str, key: str, *, timeout_s: float = 5.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self._key = key
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._own = client is None

    async def verify(self, claim: Claim) -> Verdict:
        body = _encode(VerifyRequest(id_number=claim.national_id, name=claim.name,
                                     phone=claim.phone, account=claim.account,
                                     ticket=claim.ticket))
        try:
            resp = await self._client.post(
                self.url, content=body,
                headers={"Authorization": f"Bearer {self._key}",
                         "Content-Type": "application/json"})
        except httpx.HTTPError:
            raise RealNameUnavailable("the real-name gateway cannot be reached") from None
        if resp.status_code != 200:
            raise RealNameUnavailable(f"the real-name gateway answered {resp.status_code}")
        try:
            got = _decode(resp.content)
        except msgspec.DecodeError:
            raise RealNameUnavailable("the real-name gateway answered badly") from None
        if got.result == "match":
            return Verdict(outcome="verified", level="self" if got.self else "data",
                           reference=got.reference)
        if got.result == "mismatch":
            return Verdict(outcome="mismatch", reference=got.reference, reason=got.reason)
        return Verdict(outcome="unknown", reference=got.reference, reason=got.reason)

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()
