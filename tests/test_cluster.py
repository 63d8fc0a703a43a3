"""The development environment's three-node Kafka cluster: replicated topics that keep taking
writes and serving reads while a node is killed, and a node that rejoins and catches up."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from paystream_tooling.devenv.kafka import KafkaCluster
from paystream_tooling.devenv.stack import Stack
from tests.chaos import RATE, RECORDS, chaos_settings, check, processes, produced_at_least, seeds
from tests.conftest import new_env, running_simulator, wait_for

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


class _CommittedOffsets:
    """The group's committed offsets, read every 0.2 s in a thread: any that moved backwards."""

    def __init__(self, bootstrap: str, group_id: str, partitions: list[tuple[str, int]]) -> None:
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group_id, "log_level": 0}
        )
        self._partitions = [TopicPartition(t, p) for t, p in partitions]
        self.highest: dict[tuple[str, int], int] = {}
        self.backwards: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                committed = self._consumer.committed(self._partitions, timeout=5)
            except KafkaException:  # the coordinator moving: read again next time
                continue
            self.reads += 1
            for tp in committed:
                key = (tp.topic, tp.partition)
                if tp.offset < 0:  # nothing committed yet
                    continue
                if tp.offset < self.highest.get(key, -1):
                    self.backwards.append(f"{key}: {self.highest[key]} then {tp.offset}")
                self.highest[key] = max(tp.offset, self.highest.get(key, -1))

    def __enter__(self) -> _CommittedOffsets:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


@pytest.mark.chaos
@pytest.mark.parametrize("seed", seeds("cluster-leader-killed"))
def test_the_leader_of_the_consumed_partitions_killed(
    stack: Stack, tmp_path: Path, seed: int
) -> None:
    """Three nodes, the topics replicated three times: the node leading most of the consumed
    partitions is killed (-9) mid-stream and started again. Nothing lost or doubled, every kept
    record reported, and the group's committed offsets never moved backwards."""
    cache = stack.home.parent / "cache"
    with KafkaCluster(tmp_path / f"cluster-{seed}", cache, size=3) as cluster:
        env = new_env(stack, bootstrap=cluster.bootstrap, replication=3)
        topics = [env.online_topic, env.offline_topic]
        with running_simulator(env) as simulator:
            settings = chaos_settings(env)
            with (
                processes(settings, tmp_path) as start,
                _CommittedOffsets(
                    cluster.bootstrap,
                    settings.group_id,
                    [(t, p) for t in topics for p in range(stack.partitions)],
                ) as offsets,
            ):
                start()
                simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
                wait_for(produced_at_least(simulator, 0.4), 60, "the stream")
                leaders = Counter(
                    cluster.leader(topic, p) for topic in topics for p in range(stack.partitions)
                )
                victim = leaders.most_common(1)[0][0]
                cluster.node(victim).kill()
                wait_for(produced_at_least(simulator, 0.8), 90, "the stream")
                cluster.restart(victim)
                check(env, simulator, settings, "cluster-leader-killed", seed, time.monotonic())
            assert [] == offsets.backwards
            assert offsets.reads > 0
