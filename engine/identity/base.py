"""The real-name verification contract: is this patient who the account says?

Binding a patient (就诊人) names a person by ID number, name and phone.
Anyone who knows an ID number could type it in, so a binding can hold a
unit only once an authority confirmed it. A ``RealNameVerifier`` asks one:

- a third-party ID-name-phone check (the carriers' 三要素: the phone is
  registered to that ID under that name);
- WeChat's real-name / face check (实名核身): the mini-program runs it on the
  phone and hands the server a one-time ticket, which proves that the person
  at the phone *is* the patient;
- the hospital's patient index (HIS EMPI), which knows its patients.

Every call answers a ``Verdict``:

- ``verified`` with a ``level``: ``data`` when ID, name and phone belong
  together (knowledge of all three: the patient, or someone the patient
  gave them to, such as family); ``self`` when the claim also carried a
  ticket proving the account holder is that person;
- ``mismatch``: the authority knows the ID, and the name, phone or ticket
  do not match it;
- ``unknown``: the authority has no record of the ID.

When nothing could be checked (the authority is down, slow, or answered
something we cannot read) the verifier raises :class:`RealNameUnavailable`:
the binding is kept unverified and may be verified again later.

The claim carries the raw ID number, name and phone: they leave the process
only towards the authority, never into logs, Redis or errors.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec

__all__ = [
    "VERIFIED",
    "Claim",
    "Level",
    "Outcome",
    "RealNameUnavailable",
    "RealNameVerifier",
    "Verdict",
    "Verification",
    "verification_of",
]

Outcome = Literal["verified", "mismatch", "unknown"]
Level = Literal["self", "data"]
#: What a binding records (PostgreSQL ``patients.verification``).
Verification = Literal["self", "data", "mismatch", "unknown", "unavailable", "unverified"]


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """Who an account says a patient is (normalised, see ``engine.pii``)."""

    national_id: str
    name: str
    phone: str
    #: The account making the claim: a ticket is valid only for the account
    #: (the WeChat user) that ran the check on its phone.
    account: str
    #: A one-time ticket from a check the person took on the phone (face /
    #: WeChat real-name); None when only the data can be checked.
    ticket: str | None = None

    def __repr__(self) -> str:  # never the raw values, even in a traceback
        return f"Claim(account={self.account!r}, ticket={'yes' if self.ticket else 'no'})"


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    outcome: Outcome
    #: Set when ``outcome == "verified"``.
    level: Level | None = None
    #: The authority's transaction id, kept with the binding for the audit.
    reference: str | None = None
    #: Why not, in the authority's words (never personal data).
    reason: str | None = None

    @property
    def verified(self) -> bool:
        return self.outcome == "verified" and self.level is not None


class RealNameUnavailable(Exception):
    """Nothing was checked (authority down, slow, or unreadable): try again later."""


@runtime_checkable
class RealNameVerifier(Protocol):
    """What binding a patient needs from a real-name authority."""

    async def verify(self, claim: Claim) -> Verdict:
        """Check the claim; raises ``RealNameUnavailable`` when nothing could be checked."""
        ...

    async def aclose(self) -> None: ...


def verification_of(verdict: Verdict | None) -> Verification:
    """The binding's recorded state for a verdict (None: the check could not run)."""
    if verdict is None:
        return "unavailable"
    if verdict.verified:
        assert verdict.level is not None
        return verdict.level
    return "mismatch" if verdict.outcome == "mismatch" else "unknown"


#: Recorded states that may hold, strongest first.
VERIFIED: tuple[Verification, ...] = ("self", "data")
