"""The outbox events the Lua scripts write, as one tagged union.

Each entry of a partition's outbox stream (``hy:{p}:outbox``) has one field
``e``: the JSON of ``event_of`` in ``lua/includes/outbox.lua``, tagged by
``t``. Decoding picks the class; an entry whose ``t`` is unknown does not
decode and goes to the dead letters (``engine.writer``).
"""

from __future__ import annotations

import msgspec

__all__ = [
    "Booked",
    "Cancelled",
    "OfferLapsed",
    "OutboxEvent",
    "RefundDue",
    "WaitlistClosed",
    "WaitlistOffer",
    "decode_event",
]


class _Event(msgspec.Struct, frozen=True, tag_field="t", kw_only=True):
    id: str  # the hold/booking id (a waitlist_closed: "<session>:<patient>")
    sid: str
    slot: str
    unit: int
    pat: str  # the patient ref (keyed hash), never the ID number
    acct: str
    at: int  # server time ms
    v: int = 1
    fee: int = 0
    pay: str = ""
    rsn: str = ""
    dl: int = 0  # a waitlist offer's payment deadline
    late: int = 0  # a patient's cancel within a day of the visit (no-show policy)
    prev: str = ""  # a booking rescheduled (改约) from this one

    @property
    def kind(self) -> str:
        """The ``t`` tag, as stored in ``booking_events.event_type``."""
        return str(self.__struct_config__.tag)


class Booked(_Event, frozen=True, tag="booked"):
    """A hold became a booking (confirmHold)."""


class Cancelled(_Event, frozen=True, tag="cancelled"):
    """A booking was cancelled (patient, admin, 停诊, HIS rejection, conflict)."""


class RefundDue(_Event, frozen=True, tag="refund_due"):
    """A payment arrived for a hold that had ended and found no unit."""


class WaitlistOffer(_Event, frozen=True, tag="waitlist_offer"):
    """A returned unit was offered to the head of the waitlist, as a hold."""


class WaitlistClosed(_Event, frozen=True, tag="waitlist_closed"):
    """A waiter's place ended without an offer (cut-off or suspension)."""


class OfferLapsed(_Event, frozen=True, tag="offer_lapsed"):
    """A waitlist offer expired unpaid: the unit passed on (to the next waiter)."""


OutboxEvent = Booked | Cancelled | RefundDue | WaitlistOffer | WaitlistClosed | OfferLapsed

decode_event = msgspec.json.Decoder(OutboxEvent).decode
