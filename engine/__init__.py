"""haoyuan (号源): the embeddable reservation engine.

    from engine import Engine, EngineConfig, Held

    async with Engine.connect("redis://127.0.0.1:6379/0", EngineConfig.from_env()) as eng:
        await eng.load_session(spec)
        result = await eng.hold(session_id, slot_id, patient=ref, account=acct)
        if isinstance(result, Held):
            booked = await eng.confirm(result.hold_id, payment_ref="pay-1")

Everything a caller needs is named here, the types every public method
returns included; ``examples/embed.py`` is a runnable program.
"""

from engine.config import Connections, EngineConfig
from engine.engine import Engine, SessionRef
from engine.model import SessionSpec, SlotSpec
from engine.outcomes import (
    Availability,
    Booked,
    Cancelled,
    Held,
    Loaded,
    Reason,
    Record,
    RecordState,
    Refused,
    Released,
    Rescheduled,
    Restore,
    SessionAudit,
    SessionAvailability,
    SlotAudit,
    SlotAvailability,
    SlotLoad,
    Suspended,
    Waitlisted,
)
from engine.scripts import NotDurable, ScriptError

#: Bumped on any change to a script contract, an outbox event or a migration.
__version__ = "0.3.0"

__all__ = (
    "Availability",
    "Booked",
    "Cancelled",
    "Connections",
    "Engine",
    "EngineConfig",
    "Held",
    "Loaded",
    "NotDurable",
    "Reason",
    "Record",
    "RecordState",
    "Refused",
    "Released",
    "Rescheduled",
    "Restore",
    "ScriptError",
    "SessionAudit",
    "SessionAvailability",
    "SessionRef",
    "SessionSpec",
    "SlotAudit",
    "SlotAvailability",
    "SlotLoad",
    "SlotSpec",
    "Suspended",
    "Waitlisted",
    "__version__",
)
