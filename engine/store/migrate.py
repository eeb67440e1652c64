"""Apply the numbered SQL files of ``engine.store.migrations`` in order.

- One session-level ``pg_advisory_lock`` serialises concurrent runners (several
  workers starting at once): each file is applied exactly once.
- Each file runs in its own transaction together with its row in
  ``schema_migrations(version, name, applied_at, checksum)``.
- Idempotent: a second run applies nothing. A file whose checksum differs from
  the one recorded when it was applied is refused (``MigrationError``): edit
  the schema with a new numbered file, never by changing an applied one.

    python -m engine.store.migrate postgresql://postgres@127.0.0.1:5432/haoyuan
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import asyncpg
import msgspec

__all__ = ["LOCK_KEY", "Migration", "MigrationError", "apply_migrations", "load", "migrate"]

#: The advisory lock key: "haoyuan" as a bigint.
LOCK_KEY = int.from_bytes(b"haoyuan", "big")
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum   text NOT NULL
)
"""


class MigrationError(RuntimeError):
    """The migrations on disk and in the database disagree."""


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str  # file name without ".sql", e.g. "0001_initial"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(package: str = "engine.store.migrations") -> list[Migration]:
    """The migration files shipped in ``package``, in version order."""
    found: list[Migration] = []
    for entry in resources.files(package).iterdir():
        m = _FILE_RE.match(entry.name)
        if m is None or not entry.is_file():
            continue
        found.append(Migration(int(m.group(1)), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda x: x.version)
    for a, b in itertools.pairwise(found):
        if a.version == b.version:
            raise MigrationError(f"two migrations share version {a.version}: {a.name}, {b.name}")
    return found


async def apply_migrations(
    conn: Any,
    migrations: Sequence[Migration] | None = None,
    *,
    lock_timeout_s: float = 60.0,
) -> list[str]:
    """Apply pending migrations over an open asyncpg connection; the names applied.

    Waits at most ``lock_timeout_s`` for another runner's advisory lock.
    """
    todo = load() if migrations is None else sorted(migrations, key=lambda x: x.version)
    await conn.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    finally:
        await conn.execute("RESET lock_timeout")
    try:
        await conn.execute(_BOOTSTRAP)
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {r["version"]: (r["name"], r["checksum"]) for r in rows}
        for mig in todo:
            if mig.version in applied:
                name, checksum = applied[mig.version]
                if name != mig.name or checksum != mig.checksum:
                    raise MigrationError(
                        f"migration {mig.name} differs from the one applied as {name} "
                        "(checksum changed): add a new migration instead of editing one"
                    )
        done: list[str] = []
        for mig in todo:
            if mig.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version,
                    mig.name,
                    mig.checksum,
                )
            done.append(mig.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def migrate(dsn: str, *, lock_timeout_s: float = 60.0) -> list[str]:
    """Connect to ``dsn``, apply pending migrations; the names applied (empty if none)."""
    conn = await asyncpg.connect(dsn)
    try:
        names: list[str] = await apply_migrations(conn, lock_timeout_s=lock_timeout_s)
        return names
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.store.migrate [DSN]`` (the same as ``haoyuan migrate``)."""
    import argparse
    import asyncio
    import os

    ap = argparse.ArgumentParser(
        prog="python -m engine.store.migrate",
        description="Apply pending PostgreSQL migrations (engine/store/migrations/*.sql, in "
                    "order, each once, under an advisory lock; a changed file is refused).")
    ap.add_argument("dsn", nargs="?", default=os.environ.get("HAOYUAN_PG_DSN"),
                    help="PostgreSQL DSN (default: $HAOYUAN_PG_DSN)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.dsn:
        ap.error("give a DSN or set HAOYUAN_PG_DSN")
    applied = asyncio.run(migrate(args.dsn))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
