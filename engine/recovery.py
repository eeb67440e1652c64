"""Knowing whether Redis's state is whole, and keeping sales closed until it is.

Redis admits; PostgreSQL is the record. Each partition carries a recovery
marker in Redis (``hy:{p}:epoch``, ``engine.keys.PartitionKeys.epoch``)
whose value PostgreSQL also records (table ``redis_partitions``). Every
script that sells or changes a record refuses with ``recovering`` while the
marker is absent (``lua/includes/bundle.lua``), so:

- **Redis lost its data** (a wipe, a restart without persistence): the
  marker went with it, and nothing in the partition sells until
  ``haoyuan rebuild`` has put PostgreSQL's bookings back and reopened it.
  Atomic: no request is decided on the empty state.
- **Redis lost only its newest writes** (AOF ``everysec`` and a power cut, a
  failover to a lagging replica): the marker survives, but the newest outbox
  entry PostgreSQL committed (``redis_partitions.applied_*``) is missing from
  a stream that still has older ones. The writer checks this when it starts,
  when Redis restarted (a new ``run_id``) and every few seconds, and closes
  the partition (deletes the marker) at once; ``haoyuan audit`` reports it.
  Decisions taken between the restart and the check are the PostgreSQL
  arbiter's to catch (one booked row per unit).
- **Nothing lost** (AOF ``always``, a clean restart): marker and stream
  agree with PostgreSQL; no rebuild is needed and the audit says so.

``import_epochs`` decides, for a schedule import, whether a partition may be
opened: a new partition is, one PostgreSQL knows but Redis lost is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from engine import keys as K
from engine.engine import Engine, _txt, new_epoch

__all__ = [
    "PartitionCheck",
    "RecoveryError",
    "check_partitions",
    "close_damaged",
    "import_epochs",
    "last_entry",
    "record_open",
]

State = Literal["lost", "rolled-back", "mismatch"]


class RecoveryError(RuntimeError):
    """A rebuild could not finish (PostgreSQL unreachable, the outbox would
    not drain): the partitions it closed stay closed."""


class PartitionCheck(msgspec.Struct, frozen=True):
    """A partition whose Redis state is not whole: run ``haoyuan rebuild``."""

    partition: int
    state: State
    detail: str


StreamId = tuple[int, int]


def parse_id(entry_id: str) -> StreamId:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def fmt_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


async def recorded(pool: Any, partitions: Iterable[int] | None = None) -> dict[int, Any]:
    """PostgreSQL's rows of ``redis_partitions`` (all, or these)."""
    if partitions is None:
        rows = await pool.fetch("SELECT * FROM redis_partitions")
    else:
        rows = await pool.fetch("SELECT * FROM redis_partitions WHERE partition = ANY($1)",
                                list(partitions))
    return {r["partition"]: r for r in rows}


async def known_partitions(pool: Any) -> set[int]:
    """Partitions PostgreSQL knows: a recorded marker, or a session of its own."""
    rows = await pool.fetch(
        "SELECT partition FROM redis_partitions WHERE epoch <> ''"
        " UNION SELECT DISTINCT partition FROM sessions")
    return {r["partition"] for r in rows}


async def last_entry(engine: Engine, partition: int) -> StreamId:
    """The newest entry id of the partition's outbox stream ((0, 0) if none)."""
    got = await engine.client.xrevrange(K.PartitionKeys(partition).outbox, count=1)
    return parse_id(_txt(got[0][0])) if got else (0, 0)


async def _has_entry(engine: Engine, partition: int, entry: StreamId) -> tuple[bool, StreamId]:
    """Whether the stream still has ``entry``, and its oldest entry id."""
    stream = K.PartitionKeys(partition).outbox
    pipe = engine.client.pipeline(transaction=False)
    pipe.xrange(stream, min=fmt_id(entry), max=fmt_id(entry), count=1)
    pipe.xrange(stream, count=1)
    found, first = await pipe.execute()
    oldest = parse_id(_txt(first[0][0])) if first else (0, 0)
    return bool(found), oldest


async def check_partitions(
    engine: Engine, pool: Any, partitions: Sequence[int] | None = None
) -> list[PartitionCheck]:
    """Every partition (PostgreSQL knows, or of ``partitions``) whose Redis
    state is not whole. Read-only."""
    rows = await recorded(pool, partitions)
    wanted = sorted(set(partitions) if partitions is not None else await known_partitions(pool))
    if not wanted:
        return []
    markers = await engine.partition_epochs(wanted)
    out: list[PartitionCheck] = []
    for p in wanted:
        row = rows.get(p)
        marker = markers[p]
        pg_epoch = row["epoch"] if row is not None else ""
        if marker is None:
            # A partition PostgreSQL knows (a recorded marker or its sessions).
            if pg_epoch or await pool.fetchval(
                    "SELECT 1 FROM sessions WHERE partition = $1 LIMIT 1", p):
                out.append(PartitionCheck(p, "lost", "Redis has no recovery marker for it "
                                          "(its data was lost, or a rebuild did not finish)"))
            continue
        if pg_epoch and marker != pg_epoch:
            out.append(PartitionCheck(p, "mismatch", f"Redis's marker {marker} is not "
                                      f"PostgreSQL's {pg_epoch} (another or an older dataset)"))
            continue
        applied: StreamId = (row["applied_ms"], row["applied_seq"]) if row is not None else (0, 0)
        if applied > (0, 0):
            present, oldest = await _has_entry(engine, p, applied)
            if not present and (oldest == (0, 0) or oldest < applied):
                out.append(PartitionCheck(
                    p, "rolled-back", f"the outbox lost entry {fmt_id(applied)}, which "
                    "PostgreSQL committed: Redis lost its newest writes"))
    return out


async def close_damaged(engine: Engine, pool: Any) -> list[PartitionCheck]:
    """Close every partition whose Redis state is not whole (the writer's
    guard). Returns what it found."""
    found = await check_partitions(engine, pool)
    for c in found:
        if c.state != "lost":  # a lost partition has no marker: closed already
            await engine.close_partition(c.partition)
    return found


async def record_open(pool: Any, partition: int, epoch: str, applied: StreamId) -> None:
    """PostgreSQL's record of a partition (re)opened under ``epoch``, whose
    outbox is written up to ``applied``."""
    await pool.execute(
        "INSERT INTO redis_partitions (partition, epoch, opened_at, applied_ms, applied_seq)"
        " VALUES ($1, $2, now(), $3, $4) ON CONFLICT (partition) DO UPDATE SET epoch = $2,"
        " opened_at = now(), applied_ms = $3, applied_seq = $4",
        partition, epoch, applied[0], applied[1])


async def import_epochs(engine: Engine, pool: Any, partitions: Iterable[int]
                        ) -> dict[int, str | None]:
    """For a schedule import: the marker to open each partition with, or None
    if the partition must stay closed (PostgreSQL knows it, Redis lost it:
    ``haoyuan rebuild`` reopens it). A new partition gets a new marker,
    recorded in PostgreSQL first (two importers agree on one)."""
    wanted = sorted(set(partitions))
    markers = await engine.partition_epochs(wanted)
    rows = await recorded(pool, wanted)
    out: dict[int, str | None] = {}
    for p in wanted:
        marker, row = markers[p], rows.get(p)
        pg_epoch = row["epoch"] if row is not None else ""
        if marker is not None:
            if not pg_epoch:  # opened outside an import (embedded use): adopt it
                await pool.execute(
                    "INSERT INTO redis_partitions (partition, epoch) VALUES ($1, $2)"
                    " ON CONFLICT (partition) DO UPDATE SET epoch = $2"
                    " WHERE redis_partitions.epoch = ''", p, marker)
            out[p] = marker
            continue
        if pg_epoch or await pool.fetchval(
                "SELECT 1 FROM bookings b JOIN sessions s ON s.id = b.session_id"
                " WHERE s.partition = $1 LIMIT 1", p):
            out[p] = None  # Redis lost what PostgreSQL knows: stays closed
            continue
        epoch = await pool.fetchval(
            "INSERT INTO redis_partitions (partition, epoch) VALUES ($1, $2)"
            " ON CONFLICT (partition) DO UPDATE SET epoch = $2 WHERE redis_partitions.epoch = ''"
            " RETURNING epoch", p, new_epoch())
        if epoch is None:  # another importer recorded one first
            epoch = await pool.fetchval(
                "SELECT epoch FROM redis_partitions WHERE partition = $1", p)
        out[p] = str(epoch)
    return out
