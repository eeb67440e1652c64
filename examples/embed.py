"""Embedding haoyuan's engine in another backend: load a session, hold the
lowest free unit for a patient, confirm it after payment, and see refusals as
values (never exceptions).

    python examples/embed.py [REDIS_URL]

The Redis must run with AOF in production (see the README's durability
modes); here any Redis will do. It writes keys under ``hy:``.
"""

from __future__ import annotations

import asyncio
import sys
import time

from engine import Booked, Engine, EngineConfig, Held, Refused, SessionSpec, SlotSpec
from engine.pii import Crypto


async def main(redis_url: str) -> int:
    crypto = Crypto.generate_dev()  # in production: Crypto.from_env() with your keys
    now = int(time.time() * 1000)
    spec = SessionSpec(
        session_id="EMBED-1", hospital="H1", dept="CARDIO", doctor="DR_LI",
        date=time.strftime("%Y-%m-%d", time.gmtime(now / 1000 + 86400)), period="AM",
        fee=5000, release_at_ms=now - 1000,
        slots=[SlotSpec(slot_id="0800", start="08:00", end="08:30", capacity=1)],
    )
    # A patient is named by the keyed hash of the national ID, never the number.
    patient = crypto.id_hash("11010519491231002X")
    async with Engine.connect(redis_url, EngineConfig()) as eng:
        await eng.load_session(spec)
        held = await eng.hold("EMBED-1", "0800", patient=patient, account="acct-1",
                              idempotency_key="press-1")
        if not isinstance(held, Held):
            print(f"refused: {held.reason.value}")
            return 1
        print(f"held unit {held.unit} until {held.expires_at_ms}")
        other = await eng.hold("EMBED-1", "0800", patient=crypto.id_hash("110101199003071233"),
                               account="acct-2")
        assert isinstance(other, Refused)
        print(f"second patient: {other.reason.value}")  # sold-out: one unit only
        booked = await eng.confirm(held.hold_id, payment_ref="pay-1")
        if not isinstance(booked, Booked):
            print(f"refused: {booked.reason.value}")
            return 1
        print(f"booked {booked.booking_id} (unit {booked.unit})")
        audit = await eng.audit("EMBED-1")
        print(f"audit ok: {audit.ok} (capacity {audit.capacity}, booked {audit.booked})")
        return 0 if audit.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0")))
