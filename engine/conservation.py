"""Conservation of one session, from an atomic snapshot of its state in
Redis (``Engine.snapshot``, the ``readSession`` script). Pure: no I/O.

Per slot: capacity = free + delayed + held + booked; no unit free and in use
at once, in use by two records, or in use by a record that points elsewhere.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.keys import POOL_BASE, SLOT_BASE
from engine.outcomes import RecordState, SessionAudit, SlotAudit, decode_record

__all__ = ["audit_snapshot"]


def audit_snapshot(session_id: str, snap: dict[str, Any]) -> SessionAudit:
    """Conservation per slot: capacity = free + delayed + held + booked; no
    unit free and in use at once, or in use by two records."""
    meta: dict[str, str] = snap["meta"]
    breaches: list[str] = []
    slots = [s["id"] for s in msgspec.json.decode(meta["slots"])]
    index = {sid: int(meta[f"i:{sid}"]) for sid in slots}
    by_index = {v: k for k, v in index.items()}
    caps = {sid: int(meta[f"c:{sid}"]) for sid in slots}
    nextno = int(meta.get("nextno", 0))
    per: dict[str, SlotAudit] = {s: SlotAudit(s, caps[s], 0, 0, 0) for s in slots}
    free_units: set[int] = set()
    for unit_s, score in snap["free"]:
        unit = int(unit_s)
        free_units.add(unit)
        slot = by_index.get(int(score) // SLOT_BASE)
        if slot is None or int(score) % POOL_BASE != unit or not 1 <= unit <= nextno:
            breaches.append(f"free unit {unit} has a bad score {score}")
            continue
        per[slot].free += 1
    for member in snap.get("delayed", []):
        unit_s, slot, score = member.split(":")
        unit = int(unit_s)
        if unit in free_units:
            breaches.append(f"unit {unit} is both free and delayed")
        free_units.add(unit)
        if slot not in per or by_index.get(int(score) // SLOT_BASE) != slot:
            breaches.append(f"delayed unit {unit} has a bad slot {slot}")
            continue
        per[slot].delayed += 1
    seen_ids: dict[str, int] = {}
    booked_units: dict[str, int] = {}
    for unit_s, raw, rec_id in snap["used"]:
        unit = int(unit_s)
        if unit in free_units:
            breaches.append(f"unit {unit} is both free and in use by {rec_id}")
        if rec_id in seen_ids:
            breaches.append(f"record {rec_id} holds units {seen_ids[rec_id]} and {unit}")
        seen_ids[rec_id] = unit
        if raw is False:
            breaches.append(f"unit {unit} is in use by a missing record {rec_id}")
            continue
        rec = decode_record(raw)
        if rec.unit != unit or rec.session_id != session_id or rec.slot_id not in per:
            breaches.append(f"unit {unit}: record {rec_id} points elsewhere")
            continue
        if rec.state is RecordState.HELD:
            per[rec.slot_id].held += 1
        elif rec.state is RecordState.BOOKED:
            per[rec.slot_id].booked += 1
            booked_units[rec_id] = unit
        else:
            breaches.append(f"unit {unit} is in use by record {rec_id} in state {rec.state.label}")
    for s in per.values():
        if s.capacity != s.free + s.delayed + s.held + s.booked:
            breaches.append(
                f"slot {s.slot_id}: capacity {s.capacity} != free {s.free} + delayed"
                f" {s.delayed} + held {s.held} + booked {s.booked}"
            )
    total = list(per.values())
    return SessionAudit(
        session_id=session_id,
        capacity=sum(s.capacity for s in total),
        free=sum(s.free for s in total),
        held=sum(s.held for s in total),
        booked=sum(s.booked for s in total),
        delayed=sum(s.delayed for s in total),
        ok=not breaches,
        breaches=breaches,
        slots=total,
        booked_units=booked_units,
    )
