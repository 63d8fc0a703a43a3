"""Poll batches, hand them to the pipeline, commit offsets after the database commit.

Several batches run at once. Each records in its own transaction the span of offsets it made
durable, so the database knows where each partition's records are done (paystream.position);
every partition is read from there, placed on assignment, and again whenever the database turns
out to be behind what this instance made durable (restored, or failed over with commits missing).
Offsets are still committed to Kafka, up to the end of the oldest unfinished batch, for lag
tooling; only a database with no recorded position yet trusts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID, uuid4

import psycopg_pool
from confluent_kafka import KafkaException

from paystream import position, store, tracing
from paystream.backoff import Backoff, pause
from paystream.errors import DatabaseRefusing, DatabaseUnavailable
from paystream.kafka import (
    Assigned,
    BrokerReachable,
    CommitAnswered,
    KafkaConsumer,
    KafkaEvent,
    OffsetLost,
    Offsets,
    Revoked,
)
from paystream.metrics import (
    BATCH_SECONDS,
    BATCH_SIZE,
    DB_FAILURES,
    RECORDS,
    RECORDS_EXPIRED,
    REWINDS,
)
from paystream.model import PartitionId, Record
from paystream.pipeline import BatchResult, Pipeline
from paystream.stalls import Stalls

log = logging.getLogger(__name__)

_STALLED_S = 10.0
"""How long every batch slot may stay busy before fetching is paused. Pausing throws away what
the consumer prefetched (librdkafka purges its queue), so it is kept for a real stall: at 1 s,
every online batch (1-2 s of gateway calls) paused it, and the next batch came 0.4 s after a
slot freed instead of at once."""

Reporter = Callable[[str], Awaitable[None]]
"""Sends a best-effort error report that does not depend on the database."""
_T = TypeVar("_T")


_DB_RETRY_FIRST_S = 0.2
"""The first pause of a batch the database failed, doubling up to Settings.db_retry_max_s: a
failover or a restart takes seconds, and a batch held at once would retry into it in a loop."""

_CONSUME_WAIT_S = 0.05
"""How long a consume call waits for records: short, so the loop comes back to free slots,
finished batches' commits and the stop event promptly; librdkafka prefetches meanwhile."""

_COMMIT_RETRY_S = 1.0
"""After a failed or refused commit, the next try waits this long (a rebalance or an outage is
what fails one; the offsets stay committable meanwhile)."""

_LAST_ANSWER_S = 10.0
"""On the way out, how long the last commit waits for the answer to the one on its way."""

_IN_THE_LOG = 2**63 - 1
"""The log end assumed for a partition whose bounds were not asked: any position is in it."""

_CHECK_POSITIONS_S = 5.0
"""How often the database's positions of the partitions owned are read back (and their done
spans folded): a database that went back while running (a failover behind a multi-host URL, a
restore) is read again from its position within this long."""


class Membership:
    """This instance's share of the consumer group as the event loop knows it, built only from
    the snapshots the Kafka thread hands over (kafka.KafkaEvent): the partitions owned, those not
    yet placed, and what to commit (position.Commits)."""

    def __init__(self, commits: position.Commits | None = None) -> None:
        self.assignment: set[PartitionId] = set()
        self.generation = 0
        # Who writes the outcomes of what is fetched: a new writer with every assignment, since
        # after one a partition may be read again from its start while batches of the previous
        # assignment are still being written (store.hold_partitions).
        self.writer: UUID = uuid4()
        self.broker_up = True
        self.commits = commits or position.Commits(retry_s=_COMMIT_RETRY_S)
        # Partitions assigned, or whose position left the log, not yet placed (the loop chooses
        # where they are read from). The former are read meanwhile from where they were assigned
        # (`assigned_at`: the group's committed offset, None for the log start); the latter are
        # paused, `lost` holding where reading stood.
        self.unplaced: set[PartitionId] = set()
        self.assigned_at: dict[PartitionId, int | None] = {}
        self.lost: dict[PartitionId, int] = {}
        # Starts of the latest assignments the fetching side has not taken yet (take_starts).
        self._new_starts: Offsets = {}
        self.placing = asyncio.Event()

    def apply(self, event: KafkaEvent) -> None:
        match event:
            case Assigned(
                generation=generation, partitions=partitions, committed=committed, starts=starts
            ):
                self.generation = generation
                self.assignment |= partitions
                self.commits.assigned(partitions, committed)
                self.unplaced |= partitions
                for key in partitions:
                    self.lost.pop(key, None)
                    self.assigned_at[key] = (starts or {}).get(key)
                    self._new_starts.pop(key, None)
                self._new_starts.update(starts or {})
                self.placing.set()
                self.writer = uuid4()
            case Revoked(generation=generation, partitions=partitions):
                self.generation = generation
                self.assignment -= partitions
                self.commits.revoked(partitions)
                self.unplaced -= partitions
                for key in partitions:
                    self.lost.pop(key, None)
            case CommitAnswered(done=done, failed=failed, reason=reason):
                self.commits.answered(done, failed)
                if failed:
                    log.warning(
                        "offset commit failed (%s) for %s; sent again", reason, sorted(failed)
                    )
            case BrokerReachable(up=up):
                self.broker_up = up
            case OffsetLost(key=key, offset=offset):
                if key in self.assignment:
                    self.unplaced.add(key)
                    if offset >= 0:  # else placed from the database's position
                        self.lost[key] = offset
                    self.placing.set()

    def take_starts(self) -> Offsets:
        """Where the partitions assigned since the last call are read from (once each)."""
        starts, self._new_starts = self._new_starts, {}
        return starts

    async def commit(self, kafka: KafkaConsumer, durable: Offsets, *, last: bool = False) -> bool:
        """Send what is due of `durable` (position.Commits); False if something was due and
        could not be sent (it will be, after the pause)."""
        due = self.commits.due(durable, last=last)
        return await self.send(kafka, due) if due else True

    async def send(self, kafka: KafkaConsumer, due: Offsets) -> bool:
        """Send a commit of `due`; False if it could not be sent."""
        self.commits.sending(due)  # before the call: its answer may come first
        if await kafka.commit(due, self.generation):
            return True
        self.commits.not_sent(due)
        return False


@dataclass(frozen=True, slots=True)
class Batch:
    """Records to process, the writer of the assignment they were fetched in, the span of
    offsets they cover in each partition and the epoch of each (position.Progress)."""

    records: list[Record]
    writer: UUID
    spans: dict[PartitionId, store.Span]
    epochs: dict[PartitionId, int]

    def extend(self, other: Batch) -> None:
        """Take on a later fetch of the same assignment (while fetching is paused)."""
        self.records.extend(other.records)
        for key, (first, end) in other.spans.items():
            self.spans[key] = (self.spans.get(key, (first, end))[0], end)
        self.epochs.update(other.epochs)


class BatchConsumer:
    def __init__(
        self,
        kafka: KafkaConsumer,
        membership: Membership,
        pipeline: Pipeline,
        pool: psycopg_pool.AsyncConnectionPool,
        *,
        batch_size: int,
        batches_in_flight: int,
        db_retry_max_s: float,
        report_database_error: Reporter,
        stalls: Stalls,
        on_batch: Callable[[BatchResult], None] = lambda _: None,
    ) -> None:
        """`stalls` hears of every batch that fails and of each once it is durable."""
        self._kafka = kafka
        self._membership = membership
        self._pipeline = pipeline
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(batches_in_flight)
        self._processing = 0  # batches not yet durable
        self._db_retry_max_s = db_retry_max_s
        self._report_database_error = report_database_error
        self._on_batch = on_batch
        self._stalls = stalls
        self._pool = pool
        self._progress = position.Progress()
        self._fetched_to: Offsets = {}  # where each partition's next fetch starts
        self._pending: list[Batch] = []  # fetched while every slot was busy, oldest first
        self._committer: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: poll, process, commit. In-flight batches finish before it returns."""
        pending = self._pending
        async with asyncio.TaskGroup() as group:
            placing = group.create_task(self._place_partitions(stop))
            while not stop.is_set():
                try:
                    await asyncio.wait_for(self._slots.acquire(), timeout=_STALLED_S)
                except TimeoutError:
                    # Every slot is busy (the database may be down): stop fetching, but keep
                    # calling consume so the group does not evict us.
                    await self._kafka.pause()
                    fetched = await self._fetch()
                    if pending and pending[-1].writer == fetched.writer:
                        pending[-1].extend(fetched)
                    elif fetched.spans:
                        pending.append(fetched)
                    continue
                await self._kafka.resume()
                batch = pending.pop(0) if pending else await self._fetch()
                # Offsets of batches that finished while their partitions were being reassigned
                # are committed once the partitions are back, even if no new record arrives.
                self._commit_soon()
                if not batch.spans:
                    self._slots.release()
                    continue
                self._processing += 1
                group.create_task(self._run_batch(self._progress.begin(batch.epochs), batch, stop))
            await placing
        if self._committer is not None:
            await self._committer
        await self._commit(last=True)  # a last try on the way out, whatever the back-off

    async def _fetch(self) -> Batch:
        fetched = await self._kafka.consume(self._batch_size, _CONSUME_WAIT_S)
        # The snapshots of the rebalances this call ran reached the loop before its result.
        assert fetched.generation == self._membership.generation
        for key, offset in self._membership.take_starts().items():
            self._restart(key, offset)  # reading starts there, before any record of it
        firsts: Offsets = {}
        ends: Offsets = {}
        for record in fetched.records:  # in offset order within a partition
            key = (record.id.topic, record.id.partition)
            firsts.setdefault(key, record.id.offset)
            ends[key] = record.id.offset + 1
        # Past the last record: transaction markers and aborted records, no record to process,
        # but offsets that must count as done (else the position would stop short of the end).
        for key, reached in fetched.positions.items():
            if reached > ends.get(key, self._fetched_to.get(key, reached)):
                ends[key] = reached
        spans: dict[PartitionId, store.Span] = {}
        for key, end in ends.items():
            first = firsts.get(key, end)
            spans[key] = (min(self._fetched_to.get(key, first), first), end)
        self._fetched_to.update(ends)
        epochs = self._progress.epochs(spans)
        return Batch(fetched.records, self._membership.writer, spans, epochs)

    async def _run_batch(self, seq: int, batch: Batch, stop: asyncio.Event) -> None:
        records = batch.records
        with tracing.span(
            "paystream.batch",
            links_to=[r.traceparent for r in records] if tracing.enabled() else (),
            attributes={"paystream.records": len(records)},
        ):
            try:
                await self._run_traced(seq, batch, stop)
            finally:
                self._stalls.cleared(seq)

    async def _run_traced(self, seq: int, batch: Batch, stop: asyncio.Event) -> None:
        records = batch.records
        try:
            started = time.perf_counter()
            result = await self._process_until_durable(seq, batch, stop)
        finally:
            # Durable (or given up on): the slot is free for the next batch while the accounts
            # are stamped and offsets committed in the background.
            self._slots.release()
            self._processing -= 1
        if result is None:
            return  # stopping: left uncommitted, so it is redelivered
        BATCH_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(records))
        for topic, count in Counter(r.id.topic for r in records).items():
            RECORDS.labels(topic=topic).inc(count)
        self._on_batch(result)
        stamping_failed = self._failed(seq, batch, "stamping the accounts")
        if await self._until_done(self._stamped, stop, stamping_failed) is None:
            return  # stopping: durable, its stamps due; the next pass of any instance applies them
        self._progress.finish(
            seq, {key: end for key, (_, end) in batch.spans.items()}, batch.epochs
        )
        self._commit_soon()

    async def _process_until_durable(
        self, seq: int, batch: Batch, stop: asyncio.Event
    ) -> BatchResult | None:
        """Prepare the batch once (the gateway is asked once per payment), then write it until
        the database takes it; None if stopping meanwhile."""
        records = batch.records
        failed = self._failed(seq, batch, f"batch of {len(records)}")
        reported = False

        async def failed_and_reported(exc: DatabaseUnavailable) -> None:
            nonlocal reported
            DB_FAILURES.inc()
            await failed(exc)
            if not reported:
                reported = True
                first = records[0].id
                await self._report_database_error(
                    f"{exc}; {len(records)} records from {first.topic}/{first.partition}"
                    f"@{first.offset} wait uncommitted and will be processed when it is back"
                )

        pipeline = self._pipeline
        prepared = await self._until_done(
            lambda: pipeline.prepare(records), stop, failed_and_reported
        )
        if prepared is None:
            return None
        return await self._until_done(
            lambda: pipeline.write(prepared, writer=batch.writer, spans=batch.spans),
            stop,
            failed_and_reported,
        )

    def _failed(
        self, seq: int, batch: Batch, what: str
    ) -> Callable[[DatabaseUnavailable], Awaitable[None]]:
        """What a failure of the batch's `what` does: said in the log, and its partitions
        counted as failing (paystream.stalls) until it is durable."""

        async def failed(exc: DatabaseUnavailable) -> None:
            log.warning("%s; %s waits and retries", exc, what)
            blocked = {key: first for key, (first, _) in batch.spans.items()}
            record = exc.record if isinstance(exc, DatabaseRefusing) else None
            if record is not None:
                blocked[(record.topic, record.partition)] = record.offset
            self._stalls.failing(seq, blocked, str(exc), exc.cause)

        return failed

    async def _stamped(self) -> bool:
        """A stamping pass after the batch (paystream.stamping); at once if no other batch is
        being processed or waits to be, none could share it."""
        await self._pipeline.stamps.applied(at_once=not self._processing and not self._pending)
        return True

    async def _until_done(
        self,
        step: Callable[[], Awaitable[_T]],
        stop: asyncio.Event,
        failed: Callable[[DatabaseUnavailable], Awaitable[None]],
    ) -> _T | None:
        """`step` again, with back-off, until the database lets it finish (`failed` hears of each
        time it did not); None if stopping meanwhile."""
        backoff = Backoff(initial_s=_DB_RETRY_FIRST_S, max_s=self._db_retry_max_s)
        while True:
            try:
                return await step()
            except DatabaseUnavailable as exc:
                await failed(exc)
                await pause(backoff.next_s(), stop)
                if stop.is_set():
                    return None

    async def _place_partitions(self, stop: asyncio.Event) -> None:
        """Place every partition assigned (or lost from the log) before it is read, and read
        back the database's positions every few seconds; while the database or the brokers are
        away, the partitions wait paused and this tries again with back-off."""
        backoff = Backoff(initial_s=_DB_RETRY_FIRST_S, max_s=self._db_retry_max_s)
        checked = time.monotonic()
        while not stop.is_set():
            membership = self._membership
            membership.placing.clear()
            try:
                if membership.unplaced:
                    # Their last reader may have stopped before its stamping pass: its stamps
                    # are applied before the positions placed here are committed.
                    await self._pipeline.stamps.applied(at_once=True)
                    await self._place(set(membership.unplaced), membership.generation)
                elif time.monotonic() - checked >= _CHECK_POSITIONS_S:
                    checked = time.monotonic()
                    await self._check_positions(membership.generation)
            except (*store.DATABASE_ERRORS, DatabaseUnavailable, KafkaException) as exc:
                log.warning("placing partitions: %s (%s); trying again", type(exc).__name__, exc)
                await store.leave_refusing_server(self._pool, exc)
                await pause(backoff.next_s(), stop)
                continue
            backoff.reset()
            if not membership.unplaced:
                await pause(_CHECK_POSITIONS_S, stop, membership.placing)

    async def _place(self, keys: set[PartitionId], generation: int) -> None:
        """Choose where each of `keys` starts (position.resolve), make what that says durable
        (a first position, a gap kept, a position moved back), then seek there.

        The log's bounds are asked only where they decide: a partition with no position to
        start from (its log start), or one whose position left the log. Elsewhere the position
        is taken as in the log (a request less per partition on every join); if it is not, the
        fetch says so and the partition is placed again, with its bounds."""
        membership = self._membership
        # A position may leave the log while this runs: that is placed again, next time.
        lost = {key: membership.lost[key] for key in keys if key in membership.lost}
        ids = await self._kafka.topic_ids(topic for topic, _ in keys)
        async with self._pool.connection() as conn, conn.transaction():
            logs = await store.position_logs(conn, keys)
            # A position recorded in another log than the topic's now: deleted and created
            # again. It is carried over the old log's done spans only: those from the group's
            # offset on, where reading began at once on assignment, may be the new log's.
            other_log = {
                key for key, log in logs.items() if log.topic_id not in (None, ids[key[0]])
            }
            caps = {
                key: at
                for key in other_log
                if (at := membership.commits.committed(key)) is not None
            }
            recorded = await store.fold_positions(conn, keys, caps=caps)
        committed = membership.commits.committed
        unknown = {
            key
            for key in keys
            if key in lost or key in other_log or (key not in recorded and committed(key) is None)
        }
        bounds = await self._kafka.bounds(unknown) if unknown else {}
        starts: dict[PartitionId, position.Start] = {}
        seeks: dict[PartitionId, int] = {}
        async with self._pool.connection() as conn, conn.transaction():
            for key in sorted(keys):
                low, high = bounds.get(key, (0, _IN_THE_LOG))
                # Where reading stood when the position left the log; the database's position
                # if further (the batches before it are durable by now).
                furthest = max(lost.get(key, -1), recorded.get(key, -1))
                wanted = None if furthest < 0 else furthest
                start = position.resolve(
                    wanted,
                    committed(key),
                    low,
                    high,
                    other_log=key in other_log,
                    seen_end=logs[key].seen_end if key in logs else None,
                )
                starts[key] = start
                await self._record_start(conn, key, start, recorded.get(key), low)
                if key in lost or start.offset != membership.assigned_at.get(key):
                    seeks[key] = start.offset
            # Each position now belongs to its topic's log as it is.
            await store.mark_logs(conn, {key: (ids.get(key[0]), None) for key in keys})
        release = [key for key in starts if key not in lost and key not in membership.lost]
        if not await self._kafka.place(seeks, generation, release):
            return  # a rebalance ran meanwhile: the loop places what is still unplaced
        for key, offset in seeks.items():
            self._restart(key, offset)
        for key in starts:
            if membership.lost.get(key) == lost.get(key):
                membership.unplaced.discard(key)
                membership.lost.pop(key, None)
        log.info(
            "placed %s (moved: %s)",
            {f"{t}/{p}": s.offset for (t, p), s in sorted(starts.items())},
            sorted(f"{t}/{p}" for t, p in seeks) or "none",
        )

    async def _record_start(
        self,
        conn: store.Conn,
        key: PartitionId,
        start: position.Start,
        recorded: int | None,
        low: int,
    ) -> None:
        """What a start says, durable and told: a first position, records expired unread (kept as
        a gap, reported), a position behind the group's or past the log's end."""
        topic = key[0]
        if recorded is None:
            await store.start_positions(conn, {key: start.offset})
        if start.expired is not None:
            first, last = start.expired
            await store.keep_gap(conn, key, first, last)
            await store.record_done(conn, {key: (first, low)})
            await store.fold_positions(conn, [key])
            RECORDS_EXPIRED.labels(topic=topic).inc(last - first + 1)
            log.error("%s/%s: records %d to %d left Kafka unread; kept as a gap", *key, first, last)
        if start.recreated:
            if start.gone is not None:
                first, last = start.gone
                await store.keep_gap(conn, key, first, last, recreated=True)
                RECORDS_EXPIRED.labels(topic=topic).inc(last - first + 1)
            await _read_from_start(conn, key, start.offset, "recreated")
            log.error(
                "%s/%s: the topic was deleted and created again (its id changed): reading the "
                "new log from its start, %d; %s",
                *key,
                start.offset,
                "the old log's records never processed are kept as a gap"
                if start.gone
                else "the old log had no record known to be unprocessed",
            )
        if start.beyond_end:
            await _read_from_start(conn, key, start.offset, "beyond_end")
            log.warning(
                "%s/%s: its position is past the log's end (the topic was created again, "
                "or truncated): reading it from its start, %d",
                *key,
                start.offset,
            )
        if start.behind_by:
            REWINDS.labels(topic=topic, cause="database_behind").inc()
            log.warning(
                "%s/%s: the database's position is %d records behind the group's "
                "committed offset: reading them again",
                *key,
                start.behind_by,
            )

    async def _check_positions(self, generation: int) -> None:
        """Read back the positions of the partitions owned. One behind what this instance made
        durable there means the database went back (a restore, a failover that lost commits):
        read again from its position. One gone means it lost them all: place it anew."""
        membership = self._membership
        keys = membership.assignment - membership.unplaced
        waiting = {key for batch in self._pending for key in batch.spans}  # not begun yet
        known = {
            key: offset
            for key, offset in self._progress.durable.items()
            if key in keys and key not in waiting and self._progress.settled(key)
        }
        ends = await self._kafka.seen_ends(keys)
        async with self._pool.connection() as conn, conn.transaction():
            recorded = await store.fold_positions(conn, keys)
            # How far each log reached: what a gap can name if its topic is deleted.
            await store.mark_logs(conn, {key: (None, end) for key, end in ends.items()})
        behind = {key: offset for key, offset in recorded.items() if offset < known.get(key, 0)}
        membership.unplaced |= keys - recorded.keys()
        if not behind or not await self._kafka.place(behind, generation):
            return
        for key, offset in behind.items():
            REWINDS.labels(topic=key[0], cause="database_behind").inc()
            log.warning(
                "%s/%s: the database's position, %d, is %d records behind what this "
                "instance made durable: reading them again",
                *key,
                offset,
                known[key] - offset,
            )
            self._restart(key, offset)

    def _restart(self, key: PartitionId, offset: int) -> None:
        self._progress.restart(key, offset)
        self._fetched_to[key] = offset

    def _commit_soon(self) -> None:
        idle = self._committer is None or self._committer.done()
        if idle and self._membership.commits.due(self._progress.durable):
            self._committer = asyncio.create_task(self._commit())

    async def _commit(self, *, last: bool = False) -> None:
        """One committer at a time; it goes on while batches finish during its broker call, and
        stops when nothing is due (all sent, one on its way, or a pause after a failure). The
        `last` waits for the answer to the one on its way first, fetching nothing meanwhile."""
        durable = self._progress.durable
        if last and self._membership.commits.on_its_way:
            await self._kafka.pause()
            deadline = time.monotonic() + _LAST_ANSWER_S
            while self._membership.commits.on_its_way and time.monotonic() < deadline:
                await self._kafka.consume(1, _CONSUME_WAIT_S)  # serves the answer
        while due := self._membership.commits.due(durable, last=last):
            with tracing.span("paystream.commit", attributes={"paystream.partitions": len(due)}):
                if not await self._membership.send(self._kafka, due):
                    return


async def _read_from_start(conn: store.Conn, key: PartitionId, offset: int, cause: str) -> None:
    """The partition's position moved back to its log's start, its spans dropped; counted."""
    await store.move_positions(conn, {key: offset}, overwrite=True)
    REWINDS.labels(topic=key[0], cause=cause).inc()
