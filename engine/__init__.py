"""haoyuan (号源): the embeddable reservation engine.

    async with Engine.connect("redis://127.0.0.1:6379/0") as eng:
        await eng.load_session(spec)
        result = await eng.hold(session_id, slot_id, patient=ref, account=acct)
"""

from engine.engine import Engine, EngineConfig
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import (
    Availability,
    Booked,
    Cancelled,
    Held,
    Reason,
    Refused,
    Released,
    Waitlisted,
)

__all__ = [
    "Availability",
    "Booked",
    "Cancelled",
    "Engine",
    "EngineConfig",
    "Held",
    "Reason",
    "Refused",
    "Released",
    "SessionSpec",
    "SlotSpec",
    "Waitlisted",
]
