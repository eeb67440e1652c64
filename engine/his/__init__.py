"""The HIS side: the contract, a FHIR R4 client, retry policy and a simulator.

``engine.testing.his_simulator`` (Litestar, granian) is imported on demand only.
"""

from engine.his.base import (
    HisBooking,
    HisChange,
    HisClient,
    HisError,
    HisPatient,
    HisProtocolError,
    HisResult,
    HisSchedule,
    HisSlot,
    HisUnavailable,
)
from engine.his.fhir import FhirHisClient
from engine.his.forwarder_policy import Backoff, BreakerState, CircuitBreaker

__all__ = [
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "FhirHisClient",
    "HisBooking",
    "HisChange",
    "HisClient",
    "HisError",
    "HisPatient",
    "HisProtocolError",
    "HisResult",
    "HisSchedule",
    "HisSlot",
    "HisUnavailable",
]
