"""The notifier contract: one message, one answer.

A ``Message`` carries what its template shows (masked, nothing else
personal) and a ``dedup_key``: the same message sent again (a retry after a
crash or a timeout) carries the same key, which the provider or our
simulator uses to drop the repeat. ``send`` answers ``sent``, ``retry``
(try again later: the provider was away or busy) or ``refused`` (never:
the user withdrew consent, the recipient is unknown); an exception is an
unknown outcome, retried with the same key.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

__all__ = ["KINDS", "Channel", "Message", "Notifier", "SendResult"]

#: What a patient is told about.
KINDS = ("booking_confirmed", "waitlist_offer", "offer_passed_on", "suspension",
         "cancellation", "refund", "visit_reminder")

Channel = Literal["wechat", "sms"]


class Message(msgspec.Struct, frozen=True, kw_only=True):
    dedup_key: str
    kind: str
    channel: Channel
    #: The WeChat openid or the phone number (decrypted only to send; never logged).
    to: str = ""
    #: The template's fields: department, doctor, time, queue number,
    #: masked patient name, deadline, reason, amount.
    data: dict[str, str] = {}
    #: The mini-program page the message opens.
    page: str = ""


class SendResult(msgspec.Struct, frozen=True):
    outcome: Literal["sent", "retry", "refused"]
    detail: str = ""


class Notifier(Protocol):
    channel: Channel

    async def send(self, msg: Message) -> SendResult: ...

    async def aclose(self) -> None: ...
