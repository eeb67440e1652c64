"""The HIS pushes: FHIR Subscription notifications (rest-hook).

``POST /v1/his/notify`` is the ``channel.endpoint`` of the Subscription the
hospital's FHIR server holds for our Appointments (criteria that stay true
in every state, e.g. ``Appointment?identifier=urn:haoyuan:booking|``, so a
cancel is never silent). It takes any notification shape: an empty R4 ping,
an R4/R4B backport ``history`` Bundle, a resource. Each one only wakes the
change poller (``engine.his.inbound``, run by ``haoyuan forwarder``), which
reads the changes with a FHIR search after its cursor: lost, repeated or
reordered notifications change nothing. The HIS sends
``Authorization: Bearer <HAOYUAN_HIS_NOTIFY_TOKEN>`` (``channel.header``);
without that setting the route is off (404).
"""

from __future__ import annotations

import hmac
from typing import Any, Literal

import msgspec
import structlog
from litestar import Controller, Request, Response, post

from api.context import api_of
from api.docs import errors
from api.guards import header
from api.problems import json_response, problem

__all__ = ["HisController"]

log = structlog.get_logger("haoyuan.api")
_encode = msgspec.json.Encoder().encode


class NotifyOut(msgspec.Struct, frozen=True):
    status: Literal["accepted"] = "accepted"


class HisController(Controller):
    path = "/v1/his"
    tags = ("his",)

    @post("/notify", status_code=200, responses=errors(401, 404),
          summary="A FHIR Subscription notification from the HIS (wakes the change poller)")
    async def notify(self, request: Request[Any, Any, Any]) -> Response[NotifyOut]:
        """Authenticated by the HIS's bearer token; the body (any notification
        shape, FHIR JSON or empty) is not needed: the poller searches."""
        api = api_of(request)
        path: str = request.scope["path"]
        token = api.settings.his_notify_token
        if not token:
            return problem("not-found", "HIS notifications are not configured", instance=path)
        value = header(request, b"authorization") or ""
        given = value[7:].strip() if value[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode("latin-1", "replace"),
                                                token.encode()):
            return problem("unauthorized", "the HIS notification token is required",
                           instance=path, headers={"WWW-Authenticate": 'Bearer realm="his"'})
        await api.engine.poke_his()
        api.metrics.decision("his_notify", "accepted")
        log.info("his_notification")
        return json_response(_encode(NotifyOut()))
