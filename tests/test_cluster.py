"""The development environment's three-node Kafka cluster: replicated topics that keep taking
writes and serving reads while a node is killed, and a node that rejoins and catches up."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from paystream_tooling.devenv import network
from paystream_tooling.devenv.kafka import KafkaCluster
from paystream_tooling.devenv.processes import answers_ok, free_port
from paystream_tooling.devenv.stack import Stack
from paystream_tooling.polling import TimedOut
from tests.chaos import RATE, RECORDS, chaos_settings, check, processes, produced_at_least, seeds
from tests.conftest import Env, SimulatorClient, new_env, running_simulator, wait_for

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


class _Watcher:
    """Something asked every 0.2 s in a thread of its own, from entering to leaving."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self.ask()

    def ask(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """After the last question."""

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.close()


class _CommittedOffsets(_Watcher):
    """The group's committed offsets: any that moved backwards."""

    def __init__(self, bootstrap: str, group_id: str, partitions: list[tuple[str, int]]) -> None:
        super().__init__()
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group_id, "log_level": 0}
        )
        self._partitions = [TopicPartition(t, p) for t, p in partitions]
        self.highest: dict[tuple[str, int], int] = {}
        self.backwards: list[str] = []
        self.reads = 0

    def ask(self) -> None:
        try:
            committed = self._consumer.committed(self._partitions, timeout=5)
        except KafkaException:  # the coordinator moving: read again next time
            return
        self.reads += 1
        for tp in committed:
            key = (tp.topic, tp.partition)
            if tp.offset < 0:  # nothing committed yet
                continue
            if tp.offset < self.highest.get(key, -1):
                self.backwards.append(f"{key}: {self.highest[key]} then {tp.offset}")
            self.highest[key] = max(tp.offset, self.highest.get(key, -1))

    def close(self) -> None:
        self._consumer.close()


class _Readiness(_Watcher):
    """A processor's /health/ready: for how long, in seconds, it was not ready (200), from the
    first time it was."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._url = f"http://127.0.0.1:{port}/health/ready"
        self.asked = 0
        self.not_ready_s = 0.0
        self._last = time.monotonic()

    def ask(self) -> None:
        ready = answers_ok(self._url)
        now = time.monotonic()
        if ready or self.asked:
            self.asked += 1
            self.not_ready_s += 0.0 if ready else now - self._last
        self._last = now


@dataclass
class _Round:
    """One scenario's cluster, topics, simulator and processor settings; the body sets
    `fault_ended` when its fault is over."""

    cluster: KafkaCluster
    env: Env
    simulator: SimulatorClient
    settings: Any
    fault_ended: float = 0.0

    @property
    def partitions(self) -> list[tuple[str, int]]:
        topics = (self.env.online_topic, self.env.offline_topic)
        return [(t, p) for t in topics for p in range(self.env.stack.partitions)]

    def leaders(self) -> Counter[int]:
        """How many of the consumed partitions each node leads."""
        return Counter(self.cluster.leader(t, p) for t, p in self.partitions)


@contextlib.contextmanager
def _round(
    stack: Stack,
    folder: Path,
    scenario: str,
    seed: int,
    *,
    instances: int = 1,
    records: int = RECORDS,
    rate: float = RATE,
    isolatable: network.TestHost | None = None,
    leader: int | None = None,
    not_ready_s: float = 0.0,
) -> Iterator[_Round]:
    """A three-node cluster, the topics replicated three times, `instances` processors on the
    hostile stream of `records` at `rate`. After the body: the full oracle; the group's
    committed offsets, read every 0.2 s meanwhile, never moved backwards; and the first
    processor was not ready for at most `not_ready_s` (two nodes of three always answer, so a
    connection to the third that fails must not make it say the brokers are away)."""
    port = free_port()
    cache = stack.home.parent / "cache"
    with KafkaCluster(folder / "cluster", cache, size=3, isolatable=isolatable) as cluster:
        env = new_env(stack, cluster=cluster, leader=leader)
        with running_simulator(env) as simulator:
            settings = chaos_settings(env)
            this = _Round(cluster, env, simulator, settings)
            with (
                processes(settings, folder) as start,
                _CommittedOffsets(cluster.bootstrap, settings.group_id, this.partitions) as offsets,
            ):
                for i in range(instances):
                    start(settings.model_copy(update={"web_port": port if i == 0 else 0}))
                with _Readiness(port) as readiness:
                    simulator.start(records=records, seed=seed, profile="hostile", rate=rate)
                    yield this
                check(env, simulator, settings, scenario, seed, this.fault_ended)
            assert [] == offsets.backwards
            assert offsets.reads > 0
            print(f"{scenario}: not ready for {readiness.not_ready_s:.1f} s")
            assert readiness.asked > 10
            assert readiness.not_ready_s <= not_ready_s


def _killed_mid_stream(this: _Round, victim_now: Callable[[], int]) -> None:
    """At 40 % of the stream, `kill -9` of the node `victim_now` names then; started again at
    80 %."""
    wait_for(produced_at_least(this.simulator, 0.4), 60, "the stream")
    victim = victim_now()
    assert victim in (1, 2, 3)
    this.cluster.node(victim).kill()
    wait_for(produced_at_least(this.simulator, 0.8), 90, "the stream")
    this.cluster.restart(victim)
    this.fault_ended = time.monotonic()


@pytest.mark.chaos
@pytest.mark.parametrize("seed", seeds("cluster-leader-killed"))
def test_the_leader_of_the_consumed_partitions_killed(
    stack: Stack, tmp_path: Path, seed: int
) -> None:
    """The node leading most of the consumed partitions is killed (-9) mid-stream and started
    again once most records are out."""
    with _round(stack, tmp_path, "cluster-leader-killed", seed) as this:
        _killed_mid_stream(this, lambda: this.leaders().most_common(1)[0][0])


@pytest.mark.chaos
@pytest.mark.parametrize("seed", seeds("cluster-coordinator-killed"))
def test_the_group_coordinator_killed_under_two_instances(
    stack: Stack, tmp_path: Path, seed: int
) -> None:
    """Two instances share the partitions; the node coordinating their group, as the cluster
    names it, is killed (-9) mid-stream and started again once most records are out."""
    with _round(stack, tmp_path, "cluster-coordinator-killed", seed, instances=2) as this:
        _killed_mid_stream(this, lambda: this.cluster.coordinator(this.settings.group_id))


@pytest.mark.chaos
@pytest.mark.parametrize("seed", seeds("cluster-rolling-restart"))
def test_a_rolling_restart_of_every_node(stack: Stack, tmp_path: Path, seed: int) -> None:
    """As an operator upgrades a cluster: each node in turn stopped cleanly and started again,
    the next only once no replica is out of sync, while records keep coming (a stream long
    enough to outlast the three restarts)."""
    records = 3 * RECORDS
    with _round(
        stack, tmp_path, "cluster-rolling-restart", seed, records=records, rate=RATE / 4
    ) as this:
        wait_for(produced_at_least(this.simulator, 1 / 12, records), 60, "the stream")
        this.cluster.rolling_restart([this.env.online_topic, this.env.offline_topic])
        assert this.simulator.status().get("done") is not True, "the stream outlasts the restarts"
        # Settling is timed from the stream's end, which comes after the restarts.
        wait_for(lambda: this.simulator.status().get("done") is True, 120, "the stream's end")
        this.fault_ended = time.monotonic()


@pytest.mark.chaos
@pytest.mark.parametrize("seed", seeds("cluster-leader-isolated"))
def test_the_leader_cut_off_by_a_silent_link(stack: Stack, tmp_path: Path, seed: int) -> None:
    """The node leading every consumed partition loses its network mid-stream: packets to and
    from the other nodes and the processor vanish without a reset. The others elect new leaders
    and the processor follows them; the link heals once most records are out (or after 30 s).
    The processor may say the brokers are away until it gives up on that node (at most 15 s)."""
    if "PAYSTREAM_CHAOS_ROUNDS" not in os.environ:
        # The reconnected node's replicas missed the test's wait for them in about one round in
        # five (the broker's own resync; never the processor's oracle), before issue 26's
        # changes as after: `make chaos` runs it, `make test` does not.
        pytest.skip("the isolation scenario runs under make chaos (PAYSTREAM_CHAOS_ROUNDS)")
    reason = network.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the isolation scenario cannot run: {reason}")
        pytest.skip(reason)
    host = network.TestHost(3)
    network.add_service_addresses()
    host.create()
    try:
        # Requests to the node cut off go unanswered until the client gives up on them
        # (socket.timeout.ms, 10 s): its metadata probe meanwhile may be one of them.
        with _round(
            stack,
            tmp_path,
            "cluster-leader-isolated",
            seed,
            isolatable=host,
            leader=3,
            not_ready_s=15.0,
        ) as this:
            victim = this.cluster.isolatable
            assert {victim: len(this.partitions)} == this.leaders()
            wait_for(produced_at_least(this.simulator, 0.4), 60, "the stream")
            this.cluster.isolate()
            wait_for(lambda: victim not in this.leaders(), 60, "new leaders")
            # Healed at 80 % of the stream, or 30 s after the cut: the simulator's idempotent
            # producer (librdkafka) stayed stuck on the node cut off in one round of three,
            # retrying it until it came back. The producer's concern, not the processor's.
            with contextlib.suppress(TimedOut):
                wait_for(produced_at_least(this.simulator, 0.8), 30, "the stream")
            this.cluster.reconnect()
            this.fault_ended = time.monotonic()
            this.cluster.wait_in_sync([this.env.online_topic, this.env.offline_topic], 90)
    finally:
        host.destroy()
