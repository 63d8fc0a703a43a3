"""Poll batches, hand them to the pipeline, commit offsets after the database commit.

Several batches run at once. They may finish in any order, but offsets are committed only up to
the end of the oldest unfinished batch ("only greater offsets are committed"), so a crash leaves
every uncommitted record either durable (redelivery is a no-op) or unprocessed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID, uuid4

from paystream import tracing
from paystream.backoff import Backoff, pause
from paystream.errors import DatabaseUnavailable
from paystream.kafka import (
    Assigned,
    BrokerReachable,
    CommitAnswered,
    KafkaConsumer,
    KafkaEvent,
    Key,
    Offsets,
    Revoked,
    merge_offsets,
)
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


_DB_RETRY_FIRST_S = 0.2
"""The first pause of a batch the database failed, doubling up to Settings.db_retry_max_s: a
failover or a restart takes seconds, and a batch held at once would retry into it in a loop."""

_CONSUME_WAIT_S = 0.05
"""How long a consume call waits for records: short, so the loop comes back to free slots,
finished batches' commits and the stop event promptly; librdkafka prefetches meanwhile."""

_COMMIT_RETRY_S = 1.0
"""After a failed or refused commit, the next try waits this long (a rebalance or an outage is
what fails one; the offsets stay committable meanwhile)."""


class Membership:
    """This instance's share of the consumer group as the event loop knows it, built only from
    the snapshots the Kafka thread hands over (kafka.KafkaEvent), and the commit policy read
    from it: commit only partitions owned now, never at or below the group's committed offset
    or a commit on its way (another owner may have got further meanwhile)."""

    def __init__(self) -> None:
        self.assignment: set[Key] = set()
        self.generation = 0
        # Who writes the outcomes of what is fetched: a new writer with every assignment, since
        # after one a partition may be read again from its committed offset while batches of
        # the previous assignment are still being written (store.hold_partitions).
        self.writer: UUID = uuid4()
        self.broker_up = True
        self.retry_at = 0.0
        self._committed: Offsets = {}  # the group's, read on assignment, raised by each commit
        self._committing: Offsets = {}  # sent, not yet answered

    def apply(self, event: KafkaEvent) -> None:
        match event:
            case Assigned(generation=generation, partitions=partitions, committed=committed):
                self.generation = generation
                self.assignment |= partitions
                self.writer = uuid4()
                if committed is not None:
                    for key in partitions:
                        if key in committed:
                            self._committed[key] = committed[key]
                        else:
                            self._committed.pop(key, None)
            case Revoked(generation=generation, partitions=partitions):
                self.generation = generation
                self.assignment -= partitions
                for key in partitions:
                    self._committing.pop(key, None)
            case CommitAnswered(done=done, failed=failed, reason=reason):
                for key, offset in {**done, **failed}.items():
                    if self._committing.get(key, -1) <= offset:
                        self._committing.pop(key, None)
                for key, offset in done.items():
                    self._committed[key] = max(self._committed.get(key, -1), offset)
                if failed:
                    # Sent again (after a pause) while the partitions are ours; a new owner
                    # re-reads from the group's offset instead, and writes are idempotent.
                    self.retry_at = time.monotonic() + _COMMIT_RETRY_S
                    log.warning(
                        "offset commit failed (%s) for %s; sent again", reason, sorted(failed)
                    )
            case BrokerReachable(up=up):
                self.broker_up = up

    def uncommitted(self, offsets: Offsets) -> Offsets:
        """Those of `offsets` for partitions owned now and beyond both the group's committed
        offset and any commit on its way."""
        return {
            key: offset
            for key, offset in offsets.items()
            if key in self.assignment
            and offset > max(self._committed.get(key, -1), self._committing.get(key, -1))
        }

    async def commit(self, kafka: KafkaConsumer, offsets: Offsets) -> Offsets:
        """Commit what `uncommitted` leaves of `offsets`; return the owned offsets now covered
        by a commit, sent or done, or nothing if it could not be sent (try again later)."""
        owned = {key: offset for key, offset in offsets.items() if key in self.assignment}
        ahead = self.uncommitted(offsets)
        if not ahead:
            return owned
        if time.monotonic() < self.retry_at:
            return {}
        self._committing.update(ahead)  # before the call: its answer may come first
        if await kafka.commit(ahead, self.generation):
            return owned
        for key, offset in ahead.items():
            if self._committing.get(key) == offset:
                del self._committing[key]
        return {}


@dataclass(frozen=True, slots=True)
class Batch:
    """Records to process, and the writer of the assignment they were fetched in."""

    records: list[Record]
    writer: UUID


class BatchConsumer:
    def __init__(
        self,
        kafka: KafkaConsumer,
        membership: Membership,
        pipeline: Pipeline,
        *,
        batch_size: int,
        batches_in_flight: int,
        db_retry_max_s: float,
        report_database_error: Reporter,
        on_batch: Callable[[BatchResult], None] = lambda _: None,
    ) -> None:
        self._kafka = kafka
        self._membership = membership
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
        pending: list[Batch] = []  # fetched while every slot was busy, oldest first
        async with asyncio.TaskGroup() as group:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(self._slots.acquire(), timeout=_STALLED_S)
                except TimeoutError:
                    # Every slot is busy (the database may be down): stop fetching, but keep
                    # calling consume so the group does not evict us.
                    await self._kafka.pause()
                    fetched = await self._fetch()
                    if pending and pending[-1].writer == fetched.writer:
                        pending[-1].records.extend(fetched.records)
                    elif fetched.records:
                        pending.append(fetched)
                    continue
                await self._kafka.resume()
                batch = pending.pop(0) if pending else await self._fetch()
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

    async def _fetch(self) -> Batch:
        fetched = await self._kafka.consume(self._batch_size, _CONSUME_WAIT_S)
        # The snapshots of the rebalances this call ran reached the loop before its result.
        assert fetched.generation == self._membership.generation
        return Batch(fetched.records, self._membership.writer)

    async def _run_batch(self, seq: int, batch: Batch, stop: asyncio.Event) -> None:
        records = batch.records
        with tracing.span(
            "paystream.batch",
            links_to=[r.traceparent for r in records] if tracing.enabled() else (),
            attributes={"paystream.records": len(records)},
        ):
            await self._run_traced(seq, batch, stop)

    async def _run_traced(self, seq: int, batch: Batch, stop: asyncio.Event) -> None:
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

    async def _process_until_durable(self, batch: Batch, stop: asyncio.Event) -> BatchResult | None:
        records = batch.records
        backoff = Backoff(initial_s=_DB_RETRY_FIRST_S, max_s=self._db_retry_max_s)
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
                await pause(backoff.next_s(), stop)
                if stop.is_set():
                    return None
                continue
            return result

    def _commit_soon(self) -> None:
        idle = self._committer is None or self._committer.done()
        due = time.monotonic() >= self._commit_not_before
        if idle and due and self._membership.uncommitted(self._commits.committable):
            self._committer = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        """One committer at a time; it goes on while batches finish during its broker call.
        After a failed commit (a rebalance, the broker away) the next try waits a second."""
        while offsets := self._membership.uncommitted(self._commits.committable):
            with tracing.span(
                "paystream.commit", attributes={"paystream.partitions": len(offsets)}
            ):
                covered = await self._membership.commit(self._kafka, offsets)
            if not covered:
                self._commit_not_before = time.monotonic() + _COMMIT_RETRY_S
                return
