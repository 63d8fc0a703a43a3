"""The development environment's three-node Kafka cluster: replicated topics that keep taking
writes and serving reads while a node is killed, and a node that rejoins and catches up."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from paystream_tooling.devenv.kafka import KafkaCluster
from tests.conftest import wait_for

pytestmark = pytest.mark.infra


def _rss_mb(pid: int | None) -> float:
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 0})
    for value in values:
        producer.produce(topic, value, partition=0)
    assert 0 == producer.flush(30)


def _read_all(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )
    consumer.subscribe([topic])
    read: list[bytes] = []

    def done() -> bool:
        read.extend(m.value() or b"" for m in consumer.consume(500, 0.5) if m.error() is None)
        return len(read) >= count

    try:
        wait_for(done, 60, f"{count} records of {topic}")
    finally:
        consumer.close()
    return read


def test_a_replicated_topic_survives_its_leader_killed(tmp_path: Path) -> None:
    """Three nodes, a topic replicated three times with two in sync: the leader of its partition
    is killed (-9); writes with acks=all go on, a new group reads everything, and the node
    started again rejoins until nothing is under-replicated. Prints what the cluster costs."""
    started = time.monotonic()
    cache = Path.home() / ".cache" / "paystream"
    with KafkaCluster(tmp_path / "cluster", cache, size=3) as cluster:
        up_s = time.monotonic() - started
        rss_mb = sum(_rss_mb(node.pid) for node in cluster.nodes)
        print(f"three nodes up in {up_s:.1f} s, {rss_mb:.0f} MB resident")
        topic = f"replicated-{uuid.uuid4().hex[:8]}"
        cluster.create_topics([topic], partitions=1)
        _produce(cluster.bootstrap, topic, [b"before-%d" % i for i in range(100)])
        leader = cluster.leader(topic, 0)
        assert leader in (1, 2, 3)

        killed_at = time.monotonic()
        cluster.node(leader).kill()
        wait_for(lambda: cluster.leader(topic, 0) not in (-1, leader), 60, "a new leader")
        print(f"a new leader after {time.monotonic() - killed_at:.1f} s")
        _produce(cluster.bootstrap, topic, [b"after-%d" % i for i in range(100)])
        values = _read_all(cluster.bootstrap, topic, 200)
        assert [b"before-%d" % i for i in range(100)] + [b"after-%d" % i for i in range(100)] == (
            values
        )

        restarted_at = time.monotonic()
        cluster.restart(leader)
        wait_for(lambda: cluster.under_replicated([topic]) == 0, 90, "the node to catch up")
        print(f"back in sync {time.monotonic() - restarted_at:.1f} s after its restart")
