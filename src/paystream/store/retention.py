"""What `paystream prune` removes (retention.sql, which also says what each table takes on
disk, for `make bench`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from paystream.store.queries import Conn, query

PRUNED = ("replays", "done ranges", "positions", "origins")
"""What a prune counts, in the order it removes them."""


async def prune(conn: Conn, keep: timedelta, topics: Sequence[str]) -> dict[str, int]:
    """Remove the bookkeeping older than `keep` that no payment or kept record needs any more
    (retention.sql), positions of topics other than `topics` included; how many rows of each."""
    counts: dict[str, int] = {}
    params = {"keep": keep, "topics": list(topics)}
    for name, statement in zip(
        PRUNED,
        ("prune_replays", "prune_done_ranges", "prune_positions", "prune_origins"),
        strict=True,
    ):
        cursor = await conn.execute(query(statement), params)
        if statement == "prune_positions":
            row = await cursor.fetchone()
            counts[name] = int(row[0]) if row else 0
        else:
            counts[name] = max(cursor.rowcount, 0)
    return counts
