"""How far a consumer group is behind: records between its committed offsets and the ends of its
topics. The one lag reader of the monitor, the demo, the reconcile oracle and the benchmark."""

from __future__ import annotations

from collections.abc import Mapping

import stamina
from confluent_kafka import Consumer, KafkaException, TopicPartition

from paystream.model import PartitionId

Watermarks = dict[PartitionId, tuple[int, int]]
"""(topic, partition) → (low, high): the first offset still on the broker and the next one."""


class GroupLag:
    """One open client on the group's coordinator, kept open by whoever reads often: a new
    client and a watermark request per partition on every read cost the broker a tenth of a
    core at ten reads a second (make bench). A reader whose topics no longer grow (a drain being
    measured) reads the watermarks once (`watermarks`) and then asks only for the committed
    offsets; the processor's monitor reads both every 2 s."""

    def __init__(self, kafka: str | Mapping[str, str], group_id: str, topics: list[str]) -> None:
        """`kafka`: the bootstrap servers, or a whole librdkafka client configuration."""
        client = {"bootstrap.servers": kafka} if isinstance(kafka, str) else dict(kafka)
        self._consumer = Consumer({**client, "group.id": group_id, "log_level": 0})
        self._topics = topics

    def watermarks(self) -> Watermarks:
        metadata = self._consumer.list_topics(timeout=10)
        ends = {}
        for topic in self._topics:
            for partition in metadata.topics[topic].partitions if topic in metadata.topics else ():
                ends[(topic, partition)] = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10, cached=False
                )
        return ends

    @stamina.retry(on=KafkaException, attempts=5, timeout=30)
    def behind(self, watermarks: Watermarks | None = None) -> dict[PartitionId, int]:
        """Per partition, records past the committed offset (from the start for a partition the
        group never committed), against `watermarks` or the ends as they are now.

        Retried: the group coordinator answers with transient errors while it loads."""
        ends = self.watermarks() if watermarks is None else watermarks
        committed = self._consumer.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
        lag = {}
        for tp in committed:
            low, high = ends[(tp.topic, tp.partition)]
            lag[(tp.topic, tp.partition)] = high - (tp.offset if tp.offset >= 0 else low)
        return lag

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> GroupLag:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def committed_lag(kafka: str | Mapping[str, str], group_id: str, topics: list[str]) -> int:
    """Records between the group's committed offsets and the end of the topics (0: caught up)."""
    with GroupLag(kafka, group_id, topics) as lag:
        return sum(lag.behind().values())
