"""A thin asyncio bridge over confluent-kafka. No business logic.

librdkafka's consumer is not thread-safe, so one dedicated thread owns it: every call goes through
a single-thread executor, and rebalance callbacks run on that same thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID, uuid4

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from paystream.model import Record, RecordId

log = logging.getLogger(__name__)
T = TypeVar("T")

Offsets = dict[tuple[str, int], int]
"""(topic, partition) → the next offset to read, i.e. the offset to commit."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """The records of one consume call, and who writes their outcomes: a new writer with every
    assignment, since after one a partition may be read again from its committed offset while
    the batches of the previous assignment are still being written."""

    records: list[Record]
    writer: UUID


class KafkaConsumer:
    def __init__(self, bootstrap: str, group_id: str, topics: list[str], **overrides: Any) -> None:
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A new group must not miss what was produced before it joined.
            "auto.offset.reset": "earliest",
            # Round-robin over the partitions of both topics, so every instance gets its share of
            # each kind of payment. cooperative-sticky balances only the partition count: with two
            # instances it gave one every online partition and the other every offline one (seen
            # in `make bench`), leaving the gateway work on a single instance.
            "partition.assignment.strategy": "roundrobin",
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            "max.poll.interval.ms": 300_000,
            "fetch.wait.max.ms": 50,
            # Bound prefetched memory whatever the backlog (librdkafka's default is 64 MiB).
            "queued.max.messages.kbytes": 16_384,
            "error_cb": self._on_error,
            **overrides,
        }
        self._topics = topics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")
        self._consumer: Consumer | None = None
        self.assignment: set[tuple[str, int]] = set()
        # The group's committed offset of each owned partition, as far as this consumer knows:
        # read when the partition is assigned, raised by each commit. Never committed below.
        self._committed: Offsets = {}
        self._paused = False
        self._writer = uuid4()
        self.broker_ok = True

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.broker_ok = False
        log.warning("kafka: %s", error)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment |= {(p.topic, p.partition) for p in partitions}
        self._writer = uuid4()
        try:
            for tp in consumer.committed(partitions, timeout=10) if partitions else []:
                if tp.offset >= 0:
                    self._committed[(tp.topic, tp.partition)] = tp.offset
                else:
                    self._committed.pop((tp.topic, tp.partition), None)
        except KafkaException as exc:
            log.warning("could not read committed offsets on assignment: %s", exc)
        if self._paused and partitions:
            consumer.pause(partitions)
        log.info("assigned %s", sorted((p.topic, p.partition) for p in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment -= {(p.topic, p.partition) for p in partitions}
        log.info("revoked %s", sorted((p.topic, p.partition) for p in partitions))

    def _open(self) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(
            self._topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    async def start(self) -> None:
        await self._call(self._open)

    def _consume(self, max_records: int, timeout_s: float) -> Fetched:
        assert self._consumer is not None
        if not self.broker_ok:
            try:
                self._consumer.list_topics(self._topics[0], timeout=0.5)
                self.broker_ok = True
            except KafkaException:
                pass
        records = []
        for message in self._consumer.consume(max_records, timeout_s):
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka consume error: %s", error)
                continue
            _, timestamp = message.timestamp()
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None
            assert partition is not None
            assert offset is not None
            records.append(
                Record(
                    id=RecordId(
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        timestamp_ms=timestamp,
                    ),
                    value=message.value(),
                )
            )
        # Rebalance callbacks run inside consume, and librdkafka drops what the call fetched for
        # partitions revoked meanwhile: every record returned belongs to the current assignment.
        return Fetched(records, self._writer)

    async def consume(self, max_records: int, timeout_s: float) -> Fetched:
        return await self._call(self._consume, max_records, timeout_s)

    def _set_paused(self, paused: bool) -> None:
        assert self._consumer is not None
        self._paused = paused
        partitions = [TopicPartition(t, p) for t, p in sorted(self.assignment)]
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)

    async def pause(self) -> None:
        """Stop fetching but keep group membership alive (consume() must still be called)."""
        if not self._paused:
            await self._call(self._set_paused, True)

    async def resume(self) -> None:
        if self._paused:
            await self._call(self._set_paused, False)

    def uncommitted(self, offsets: Offsets) -> Offsets:
        """Those of `offsets` for partitions owned now and beyond the group's committed offset.

        One at or below it (another owner got further while this one did not hold the partition)
        is covered already: committing it would move the group back.
        """
        return {
            key: offset
            for key, offset in offsets.items()
            if key in self.assignment and offset > self._committed.get(key, -1)
        }

    def _commit(self, offsets: Offsets) -> Offsets:
        assert self._consumer is not None
        owned = {key: offset for key, offset in offsets.items() if key in self.assignment}
        ahead = self.uncommitted(owned)
        if ahead:
            try:
                self._consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in ahead.items()],
                    asynchronous=False,
                )
            except KafkaException as exc:
                # Lost the partition in a rebalance: its new owner re-reads; writes are idempotent.
                log.warning("offset commit failed (%s); records will be redelivered", exc)
                return {}
            self._committed.update(ahead)
        return owned

    async def commit(self, offsets: Offsets) -> Offsets:
        """Commit the offsets of the partitions this consumer owns, never below what the group
        has committed already; returns the owned offsets now covered by a commit."""
        return await self._call(self._commit, offsets)

    def _close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    async def close(self) -> None:
        try:
            await self._call(self._close)
        finally:
            self._executor.shutdown(wait=True)


def merge_offsets(target: Offsets, records: Iterable[Record]) -> None:
    for record in records:
        key = (record.id.topic, record.id.partition)
        target[key] = max(target.get(key, 0), record.id.offset + 1)
