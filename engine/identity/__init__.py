"""Real-name verification of bound patients: the contract (``base``), an
HTTP gateway client (``http``) and a simulator for tests and the demo."""

from engine.identity.base import (
    VERIFIED,
    Claim,
    RealNameUnavailable,
    RealNameVerifier,
    Verdict,
    Verification,
    verification_of,
)

__all__ = [
    "VERIFIED",
    "Claim",
    "RealNameUnavailable",
    "RealNameVerifier",
    "Verdict",
    "Verification",
    "verification_of",
]
