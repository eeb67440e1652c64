"""The Redis key schema and partitions, in one place.

Every key a script touches carries the hash tag of its partition, ``{p<k>}``,
so one script never crosses a Redis Cluster slot. A department-day maps to
one of ``PARTITIONS`` partitions; its sessions, their units, holds, patient
rules, rate limits and the partition's outbox stream all live there.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

PARTITIONS = 64
#: A free unit's score: slot index * SLOT_BASE + pool * POOL_BASE + queue
#: number (lua/includes/units.lua), so "lowest free unit of slot i in pool p"
#: is one range query.
SLOT_BASE = 1_000_000
POOL_BASE = 100_000
PREFIX = "hy"
# Session ids and slot ids go into key names and hold ids: keep them plain.
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SLOT_RE = re.compile(r"^[A-Za-z0-9_:-]{1,32}$")
#: Global (untagged) index session id -> partition; read once per process.
SESSION_INDEX = f"{PREFIX}:sessions"
#: Wake-ups of the HIS change poller (a notification from the HIS arrived).
HIS_WAKE = f"{PREFIX}:his:wake"


def partition_of(dept: str, date: str) -> int:
    """The partition of a department-day (stable across processes and versions)."""
    return zlib.crc32(f"{dept}|{date}".encode()) % PARTITIONS


def tag(p: int) -> str:
    return f"{PREFIX}:{{p{p}}}"


def partition_of_record(record_id: str) -> int:
    """Hold and booking ids are ``<partition>.<session id>.<seq>``."""
    head, _, _ = record_id.partition(".")
    if not head.isdigit() or int(head) >= PARTITIONS:
        raise ValueError("malformed hold or booking id")
    return int(head)


def session_of_record(record_id: str) -> str:
    parts = record_id.split(".")
    if len(parts) != 3 or not ID_RE.match(parts[1]) or not parts[2].isdigit():
        raise ValueError("malformed hold or booking id")
    return parts[1]


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    p: int

    @property
    def records(self) -> str:
        return f"{tag(self.p)}:recs"

    @property
    def deadlines(self) -> str:
        return f"{tag(self.p)}:deadlines"

    @property
    def outbox(self) -> str:
        return f"{tag(self.p)}:outbox"

    @property
    def sessions(self) -> str:
        return f"{tag(self.p)}:sessions"

    @property
    def seq(self) -> str:
        return f"{tag(self.p)}:seq"

    @property
    def epoch(self) -> str:
        """The recovery marker: present while the partition's state is whole
        (lua/includes/bundle.lua ``recovering``; engine.recovery)."""
        return f"{tag(self.p)}:epoch"

    @property
    def demand_index(self) -> str:
        """The demand sets of this partition not folded into PostgreSQL yet."""
        return f"{tag(self.p)}:dmi"

    def dept_day(self, dept: str, date: str) -> str:
        return f"{tag(self.p)}:dd:{dept}:{date}"

    def idempotency(self, account: str, key: str) -> str:
        return f"{tag(self.p)}:i:{account}:{key}"

    def rate_account(self, account: str) -> str:
        return f"{tag(self.p)}:rl:a:{account}"

    def rate_patient(self, patient: str) -> str:
        return f"{tag(self.p)}:rl:p:{patient}"

    def rule(self, scope: str, dept: str, doctor: str, date: str) -> str:
        who = f"doc:{doctor}" if scope == "doctor" else f"dept:{dept}"
        return f"{tag(self.p)}:r:{who}:{date}"

    def patient_active(self, patient: str) -> str:
        """On the patient's own partition: the patient's active holds and bookings."""
        return f"{tag(self.p)}:pa:{patient}"

    def patient_ban(self, patient: str) -> str:
        return f"{tag(self.p)}:ban:{patient}"


def binding_mirror(account: str) -> str:
    """The account's binding mirror (patient id -> ref) and its token
    revocations (``~``-fields, see lua/readAccess-1.lua), one key, untagged:
    the scripts that use it take only this key."""
    return f"{PREFIX}:pb:{account}"


def mine(account: str) -> str:
    """What an account has going (``Engine.note_mine``): its holds, waitlist
    offers and waitlist places, for GET /v1/holds; untagged, like the mirror."""
    return f"{PREFIX}:mine:{account}"


def limiter(kind: str, client: str) -> str:
    """A per-client limiter (``limitAttempts``): ``kind`` of attempt, keyed client hash."""
    return f"{PREFIX}:lim:{kind}:{client}"


#: The waiting room's line (``takeTicket``, ``readLine``): one hash tag, one slot.
WAITING_LINE = f"{PREFIX}:{{wr}}:line"
WAITING_PLACES = f"{PREFIX}:{{wr}}:acct"


def partition_of_patient(patient: str) -> int:
    """Where a patient's hospital-wide state lives (active count, ban)."""
    return zlib.crc32(f"patient|{patient}".encode()) % PARTITIONS


@dataclass(frozen=True, slots=True)
class SessionKeys:
    p: int
    sid: str

    @property
    def part(self) -> PartitionKeys:
        return PartitionKeys(self.p)

    @property
    def meta(self) -> str:
        return f"{tag(self.p)}:s:{self.sid}"

    @property
    def free(self) -> str:
        return f"{tag(self.p)}:f:{self.sid}"

    @property
    def units(self) -> str:
        return f"{tag(self.p)}:u:{self.sid}"

    @property
    def deadlines(self) -> str:
        return f"{tag(self.p)}:x:{self.sid}"

    @property
    def waitlist(self) -> str:
        return f"{tag(self.p)}:w:{self.sid}"

    @property
    def delayed(self) -> str:
        return f"{tag(self.p)}:q:{self.sid}"

    def demand(self, kind: str) -> str:
        """Accounts of one kind of demand (tried, refused, joined): engine.stats."""
        return f"{tag(self.p)}:dm:{kind}:{self.sid}"

    def bundle(self, rule_key: str) -> list[str]:
        """The twelve KEYS every mutating session script takes first
        (lua/includes/bundle.lua documents them)."""
        pk = self.part
        return [self.meta, self.free, self.units, self.deadlines, self.waitlist, self.delayed,
                pk.records, pk.deadlines, rule_key, pk.outbox, pk.seq, pk.epoch]
