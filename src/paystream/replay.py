"""Re-drive kept records through the pipeline, e.g. after an account was created or the
gateway recovered. Idempotent: a record whose payment is stored is marked resolved, never stored
twice."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import aiohttp
import psycopg_pool

from paystream import store
from paystream.app import topic_types
from paystream.config import Settings
from paystream.gateway import Gateway
from paystream.pipeline import BatchResult, Pipeline


async def replay(
    settings: Settings,
    pool: psycopg_pool.AsyncConnectionPool,
    *,
    ids: list[int] | None = None,
    error_type: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    batch: int = 200,
    on_progress: Callable[[int], None] = lambda _: None,
) -> BatchResult:
    """Replay unresolved kept records matching the filters, oldest first."""
    total = BatchResult()
    async with aiohttp.ClientSession() as session:
        gateway = Gateway(
            session,
            settings.gateway_url,
            max_in_flight=settings.gateway_max_in_flight,
            timeout_s=settings.gateway_timeout_s,
            attempts=settings.gateway_attempts,
            budget_s=settings.gateway_budget_s,
        )
        pipeline = Pipeline(pool, gateway, topic_types(settings))
        after = 0
        while True:
            async with pool.connection() as conn:
                rows = await store.list_kept(
                    conn,
                    ids=ids,
                    error_type=error_type,
                    reason=reason,
                    since=since,
                    unresolved_only=True,
                    after_id=after,
                    limit=batch,
                )
            rows = [r for r in rows if r.record.id.topic in topic_types(settings)]
            if not rows:
                return total
            after = rows[-1].id
            total.add(await pipeline.process([r.record for r in rows], replay=True))
            on_progress(len(rows))
