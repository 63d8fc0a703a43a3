"""Re-drive kept records through the pipeline, e.g. after an account was created or the
gateway recovered. Idempotent: a record whose payment is stored is marked resolved, never stored
twice; a record kept again keeps its row (re-reported only if the reason changed)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import psycopg
import psycopg_pool

from paystream import store
from paystream.errors import DatabaseUnavailable
from paystream.pipeline import BatchResult, Pipeline


async def replay(
    pool: psycopg_pool.AsyncConnectionPool,
    pipeline: Pipeline,
    topics: set[str],
    *,
    ids: list[int] | None = None,
    error_type: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    max_replays: int | None = None,
    batch: int = 200,
    on_progress: Callable[[int], None] = lambda _: None,
) -> BatchResult:
    """Replay unresolved kept records of `topics` matching the filters, oldest first."""
    total = BatchResult()
    after = 0
    while True:
        try:
            async with pool.connection() as conn:
                rows = await store.list_kept(
                    conn,
                    ids=ids,
                    error_type=error_type,
                    reason=reason,
                    since=since,
                    unresolved_only=True,
                    max_replays=max_replays,
                    after_id=after,
                    limit=batch,
                )
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        if not rows:
            return total
        after = rows[-1].id
        records = [r.record for r in rows if r.record.id.topic in topics]
        if records:
            total.add(await pipeline.process(records, replay=True))
        on_progress(len(rows))
