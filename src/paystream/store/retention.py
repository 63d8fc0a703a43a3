"""What `paystream prune` removes (retention.sql, which also says what each table takes on
disk, for `make bench`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from paystream.store.queries import Conn, query

PRUNED = {
    "replays": "prune_replays",
    "done ranges": "prune_done_ranges",
    "positions": "prune_positions",
    "origins": "prune_origins",
}
"""What a prune counts, and the statement that removes it, in the order it runs."""


async def prune(conn: Conn, keep: timedelta, topics: Sequence[str]) -> dict[str, int]:
    """Remove the bookkeeping older than `keep` that no payment or kept record needs any more
    (retention.sql), positions of topics other than `topics` included; how many rows of each."""
    params = {"keep": keep, "topics": list(topics)}
    counts = {}
    for name, statement in PRUNED.items():
        counts[name] = (await conn.execute(query(statement), params)).rowcount
    return counts
