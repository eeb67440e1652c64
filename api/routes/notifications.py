"""The account's notifications (通知): consent and what was sent.

``POST /v1/notifications/consent``: the kinds the user agreed to receive by
WeChat subscribe message (the mini-program calls
``wx.requestSubscribeMessage`` and reports the templates accepted). A
one-time authorization allows one message of its kind; ``long_term`` (for
the services WeChat allows it) every message until withdrawn (``DELETE``).
``GET /v1/notifications``: the account's latest messages and their states,
with nothing personal.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, get_args

import msgspec
from litestar import Controller, Request, delete, get, post

from api.context import api_of
from api.docs import ACCOUNT, errors
from api.guards import account_of, account_required
from engine.notify.base import KINDS

__all__ = ["NotificationController"]

Kind = Literal["booking_confirmed", "waitlist_offer", "offer_passed_on", "suspension",
               "cancellation", "refund", "visit_reminder"]
if set(get_args(Kind)) != set(KINDS):  # pragma: no cover - one list, two spellings
    raise RuntimeError("the notification kinds of the API and of engine.notify differ")


class ConsentIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    kinds: Annotated[list[Kind], msgspec.Meta(min_length=1, max_length=len(KINDS))]
    long_term: bool = False


class ConsentOut(msgspec.Struct, frozen=True):
    #: Messages each kind may still send (None: long-term).
    remaining: dict[str, int | None]


class NotificationOut(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    channel: str
    state: str
    booking_id: str | None
    created_at_ms: int
    sent_at_ms: int | None


def _ms(t: dt.datetime | None) -> int | None:
    return None if t is None else int(t.timestamp() * 1000)


class NotificationController(Controller):
    path = "/v1/notifications"
    tags = ("notifications",)

    @post("/consent", status_code=200, before_request=account_required, security=ACCOUNT,
          responses=errors(401, 422), summary="Record the user's consent to messages")
    async def consent(self, request: Request[Any, Any, Any], data: ConsentIn) -> ConsentOut:
        api = api_of(request)
        account = account_of(request)
        async with api.pool.acquire() as conn, conn.transaction():
            for kind in dict.fromkeys(data.kinds):
                await conn.execute(
                    "INSERT INTO notify_consent (account_id, kind, remaining)"
                    " VALUES ($1, $2, CASE WHEN $3 THEN NULL ELSE 1 END)"
                    " ON CONFLICT (account_id, kind) DO UPDATE SET remaining ="
                    " CASE WHEN $3 OR notify_consent.remaining IS NULL THEN NULL"
                    " ELSE least(notify_consent.remaining + 1, 1000) END, updated_at = now()",
                    account, kind, data.long_term)
            rows = await conn.fetch("SELECT kind, remaining FROM notify_consent"
                                    " WHERE account_id = $1", account)
        return ConsentOut({r["kind"]: r["remaining"] for r in rows})

    @delete("/consent", status_code=204, before_request=account_required, security=ACCOUNT,
            responses=errors(401), summary="Withdraw every consent to messages")
    async def withdraw(self, request: Request[Any, Any, Any]) -> None:
        api = api_of(request)
        await api.pool.execute("DELETE FROM notify_consent WHERE account_id = $1",
                               account_of(request))

    @get("/", before_request=account_required, security=ACCOUNT, responses=errors(401),
         summary="The account's latest notifications")
    async def mine(self, request: Request[Any, Any, Any]) -> list[NotificationOut]:
        rows = await api_of(request).pool.fetch(
            "SELECT kind, channel, state, booking_id, created_at, sent_at FROM notifications"
            " WHERE account_id = $1 ORDER BY created_at DESC LIMIT 50", account_of(request))
        return [NotificationOut(kind=r["kind"], channel=r["channel"], state=r["state"],
                                booking_id=r["booking_id"], created_at_ms=_ms(r["created_at"])
                                or 0, sent_at_ms=_ms(r["sent_at"])) for r in rows]
