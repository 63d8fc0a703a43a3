"""Poll batches, hand them to the pipeline, commit offsets after the database commit.

Several batches run at once. They may finish in any order, but offsets are committed only up to
the end of the oldest unfinished batch ("only greater offsets are committed"), so a crash leaves
every uncommitted record either durable (redelivery is a no-op) or unprocessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from paystream import tracing
from paystream.errors import DatabaseUnavailable
from paystream.kafka import Fetched, KafkaConsumer, Offsets, merge_offsets
from paystream.metrics import BATCH_SECONDS, BATCH_SIZE, DB_FAILURES, RECORDS
from paystream.model import Record
from paystream.pipeline import BatchResult, Pipeline

log = logging.getLogger(__name__)

_STALLED_S = 10.0
"""How long every batch slot may stay busy before fetching is paused. Pausing throws away what
the consumer prefetched (librdkafka purges its queue), so it is kept for a real stall: at 1 s,
every online batch (1-2 s of gateway calls) paused it, and the next batch came 0.4 s after a
slot freed instead of at once."""

Reporter = Callable[[str], Awaitable[None]]
"""Sends a best-effort error report that does not depend on the database."""


class OrderedCommits:
    """Tracks batches by sequence number; offsets advance only over a finished prefix."""

    def __init__(self) -> None:
        self._next = 0
        self._oldest_unfinished = 0
        # A finished batch waiting for an older one keeps only its offsets, not its records.
        self._finished: dict[int, Offsets] = {}
        self.committable: Offsets = {}

    def begin(self) -> int:
        self._next += 1
        return self._next - 1

    def finish(self, seq: int, records: list[Record]) -> None:
        merge_offsets(self._finished.setdefault(seq, {}), records)
        while self._oldest_unfinished in self._finished:
            for key, offset in self._finished.pop(self._oldest_unfinished).items():
                self.committable[key] = max(self.committable.get(key, 0), offset)
            self._oldest_unfinished += 1


class BatchConsumer:
    def __init__(
        self,
        kafka: KafkaConsumer,
        pipeline: Pipeline,
        *,
        batch_size: int,
        batches_in_flight: int,
        db_retry_max_s: float,
        report_database_error: Reporter,
        on_batch: Callable[[BatchResult], None] = lambda _: None,
    ) -> None:
        self._kafka = kafka
        self._pipeline = pipeline
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(batches_in_flight)
        self._db_retry_max_s = db_retry_max_s
        self._report_database_error = report_database_error
        self._on_batch = on_batch
        self._commits = OrderedCommits()
        self._committer: asyncio.Task[None] | None = None
        self._commit_not_before = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: poll, process, commit. In-flight batches finish before it returns."""
        pending: list[Fetched] = []  # fetched while every slot was busy, oldest first
        async with asyncio.TaskGroup() as group:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(self._slots.acquire(), timeout=_STALLED_S)
                except TimeoutError:
                    # Every slot is busy (the database may be down): stop fetching, but keep
                    # calling consume so the group does not evict us.
                    await self._kafka.pause()
                    fetched = await self._kafka.consume(self._batch_size, 0.05)
                    if pending and pending[-1].writer == fetched.writer:
                        pending[-1].records.extend(fetched.records)
                    elif fetched.records:
                        pending.append(fetched)
                    continue
                await self._kafka.resume()
                if pending:
                    batch = pending.pop(0)
                else:
                    batch = await self._kafka.consume(self._batch_size, 0.05)
                # Offsets of batches that finished while their partitions were being reassigned
                # are committed once the partitions are back, even if no new record arrives.
                self._commit_soon()
                if not batch.records:
                    self._slots.release()
                    continue
                group.create_task(self._run_batch(self._commits.begin(), batch, stop))
        if self._committer is not None:
            await self._committer
        await self._commit()  # a last try on the way out, whatever the back-off

    async def _run_batch(self, seq: int, batch: Fetched, stop: asyncio.Event) -> None:
        records = batch.records
        with tracing.span(
            "paystream.batch",
            links_to=[r.traceparent for r in records] if tracing.enabled() else (),
            attributes={"paystream.records": len(records)},
        ):
            await self._run_traced(seq, batch, stop)

    async def _run_traced(self, seq: int, batch: Fetched, stop: asyncio.Event) -> None:
        records = batch.records
        try:
            started = time.perf_counter()
            result = await self._process_until_durable(batch, stop)
            if result is None:
                return  # stopping: left uncommitted, so it is redelivered
            BATCH_SECONDS.observe(time.perf_counter() - started)
            BATCH_SIZE.observe(len(records))
            for topic, count in Counter(r.id.topic for r in records).items():
                RECORDS.labels(topic=topic).inc(count)
            self._on_batch(result)
            self._commits.finish(seq, records)
        finally:
            # Durable (or given up on): the slot is free for the next batch while offsets are
            # committed in the background.
            self._slots.release()
        self._commit_soon()

    async def _process_until_durable(
        self, batch: Fetched, stop: asyncio.Event
    ) -> BatchResult | None:
        records = batch.records
        delay_s = 0.2
        reported = False
        while True:
            try:
                result = await self._pipeline.process(records, writer=batch.writer)
            except DatabaseUnavailable as exc:
                DB_FAILURES.inc()
                log.warning("%s; batch of %d waits and retries", exc, len(records))
                if not reported:
                    reported = True
                    first = records[0].id
                    await self._report_database_error(
                        f"{exc}; {len(records)} records from {first.topic}/{first.partition}"
                        f"@{first.offset} wait uncommitted and will be processed when it is back"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay_s)
                if stop.is_set():
                    return None
                delay_s = min(delay_s * 2, self._db_retry_max_s)
                continue
            return result

    def _commit_soon(self) -> None:
        idle = self._committer is None or self._committer.done()
        due = time.monotonic() >= self._commit_not_before
        if idle and due and self._kafka.uncommitted(self._commits.committable):
            self._committer = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        """One committer at a time; it goes on while batches finish during its broker call.
        After a failed commit (a rebalance, the broker away) the next try waits a second."""
        while offsets := self._kafka.uncommitted(self._commits.committable):
            with tracing.span(
                "paystream.commit", attributes={"paystream.partitions": len(offsets)}
            ):
                covered = await self._kafka.commit(offsets)
            if not covered:
                self._commit_not_before = time.monotonic() + 1.0
                return
