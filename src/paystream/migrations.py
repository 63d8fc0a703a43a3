"""Versioned SQL migrations, applied at start-up. Safe when several instances start at once."""

from __future__ import annotations

import re
from importlib import resources

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

_LOCK_KEY = 0x7061_7973  # "pays": one advisory lock serialises concurrent migrators
_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("paystream") / "sql"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def latest() -> int:
    """The newest migration this version knows: the schema version it runs at."""
    return _migrations()[-1][0]


async def schema_version(conn: AsyncConnection[TupleRow]) -> int:
    """The newest migration applied to this database (0: none)."""
    cursor = await conn.execute("SELECT to_regclass('paystream.schema_migrations') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return 0
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM paystream.schema_migrations")
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])


async def migrate(conn: AsyncConnection[TupleRow]) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction. Returns their names.

    Never touches the retailer's tables; ours live in the `paystream` schema. A database at this
    version's schema, or at a newer one (a newer version rolling out beside this one: migrations
    only add), is left as it is without writing to it, so a read-only server does not stop an
    instance that has nothing to apply.
    """
    await conn.set_autocommit(True)
    if await schema_version(conn) >= latest():
        return []
    applied_now = []
    # Waiting for another instance's migrations, or one backfilling a large table, may take
    # longer than the statement and lock timeouts our sessions run with (app.configure_session).
    cursor = await conn.execute(
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
    )
    row = await cursor.fetchone()
    before = ("0", "0") if row is None else (str(row[0]), str(row[1]))
    await conn.execute("SELECT set_config('statement_timeout', '0', false)")
    await conn.execute("SELECT set_config('lock_timeout', '0', false)")
    await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS paystream")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS paystream.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT version FROM paystream.schema_migrations")
        done = {row[0] for row in await cursor.fetchall()}
        for version, name, sql in _migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql.encode())
                await conn.execute(
                    "INSERT INTO paystream.schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
        await conn.execute("SELECT set_config('statement_timeout', %s, false)", (before[0],))
        await conn.execute("SELECT set_config('lock_timeout', %s, false)", (before[1],))
    return applied_now
