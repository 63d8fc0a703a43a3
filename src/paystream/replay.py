"""Re-drive kept records through the pipeline, e.g. after an account was created or the
gateway recovered. Idempotent: a record whose payment is stored is marked resolved, never stored
twice; a record kept again keeps its row (re-reported only if the reason changed)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import psycopg_pool

from paystream import store
from paystream.backoff import pause
from paystream.errors import DatabaseUnavailable, GatewayUnavailable, SealedRecordUnreadable
from paystream.gateway import BreakerState, Gateway
from paystream.model import Reason
from paystream.pipeline import BatchResult, Pipeline

log = logging.getLogger(__name__)


async def replay(
    pool: psycopg_pool.AsyncConnectionPool,
    pipeline: Pipeline,
    topics: set[str],
    where: store.KeptFilter,
    *,
    batch: int = 200,
    on_progress: Callable[[int], None] = lambda _: None,
    proceed: Callable[[], bool] = lambda: True,
) -> BatchResult:
    """Replay the unresolved kept records of `topics` that match `where`, oldest first, a batch
    at a time for as long as `proceed()` holds. A batch whose sealed records do not open with
    the pipeline's keys raises SealedRecordUnreadable before anything of it is written."""
    where = dataclasses.replace(where, unresolved_only=True)
    total = BatchResult()
    after = 0
    while proceed():
        rows = await _kept(pool, where, after, batch)
        if not rows:
            return total
        after = rows[-1].id
        # A gap (`expired`, `topic_recreated`) has no record to replay: it stays kept, as it is.
        records = [
            r.record(pipeline.cipher) for r in rows if r.topic in topics and not r.reason.is_gap
        ]
        if records:
            total.add(await pipeline.replay(records))
        on_progress(len(rows))
    return total


async def _kept(
    pool: psycopg_pool.AsyncConnectionPool, where: store.KeptFilter, after: int, limit: int
) -> list[store.KeptRow]:
    try:
        async with pool.connection() as conn:
            return await store.list_kept(conn, where, after_id=after, limit=limit)
    except store.DATABASE_ERRORS as exc:
        raise DatabaseUnavailable.caused_by(exc) from exc


async def revalidate(
    pool: psycopg_pool.AsyncConnectionPool,
    pipeline: Pipeline,
    gateway: Gateway,
    topics: set[str],
    stop: asyncio.Event,
    *,
    every_s: float,
    max_attempts: int,
) -> None:
    """Every `every_s`, re-drive the payments the gateway could not answer, with no operator and
    whether or not new traffic arrives; each gets at most `max_attempts` tries that reached the
    gateway before it waits for a manual `paystream replay`.

    The breaker decides when: while it is open nothing is sent; once half-open, this loop sends
    the probe itself (the oldest such payment), since the breaker closes only on a successful
    call and, once the stream has stopped, no other call comes. The replay then stops at the
    first batch after which the breaker is no longer closed.
    """

    waiting = store.KeptFilter(
        reason=Reason.GATEWAY_UNAVAILABLE, unresolved_only=True, max_replays=max_attempts
    )

    def closed() -> bool:
        return gateway.breaker.closed

    while not stop.is_set():
        await pause(every_s, stop)
        if stop.is_set():
            return
        try:
            if not closed() and not await _probe(pool, pipeline, gateway, waiting):
                continue
            result = await replay(pool, pipeline, topics, waiting, proceed=closed)
        except DatabaseUnavailable as exc:
            log.warning("revalidation postponed: %s", exc)
            continue
        except SealedRecordUnreadable as exc:
            log.error("revalidation stopped until the key is fixed: %s", exc)
            continue
        if result.stored or result.kept:
            log.info("revalidated: %d stored, %d still kept", result.stored, result.kept)


async def _probe(
    pool: psycopg_pool.AsyncConnectionPool,
    pipeline: Pipeline,
    gateway: Gateway,
    waiting: store.KeptFilter,
) -> bool:
    """Whether a half-open breaker closed on one call for the oldest payment waiting on the
    gateway. Its verdict is not kept: the replay that follows asks again, with the same
    idempotency key, so the provider sees one request."""
    if gateway.breaker.state is not BreakerState.HALF_OPEN:
        return False
    rows = await _kept(pool, waiting, 0, 1)
    if not rows or rows[0].payment_id is None:
        return False
    try:
        await gateway.validate(rows[0].payment_id, rows[0].record(pipeline.cipher).value or b"")
    except GatewayUnavailable as exc:
        log.info("gateway probe failed, circuit stays open: %s", exc)
        return False
    return gateway.breaker.closed
