"""The staff audit trail from the API: who (the request's staff member) did
what to which target. One row of ``staff_audit`` per change, written after
the change succeeded, and the same facts in the log (so a failed audit
write still leaves a trace)."""

from __future__ import annotations

from typing import Any

import structlog

from api.context import api_of
from api.guards import staff_of
from engine.store.staff import record_action

__all__ = ["record"]

log = structlog.get_logger("haoyuan.staff")


async def record(request: Any, action: str, target: str | None = None, **detail: Any) -> None:
    actor = staff_of(request)
    log.info("staff_action", actor=actor.id, role=actor.role, action=action, target=target)
    try:
        await record_action(api_of(request).pool, actor, action, target, detail)
    except Exception as exc:
        log.error("staff_audit_write_failed", actor=actor.id, action=action, target=target,
                  error=type(exc).__name__)
