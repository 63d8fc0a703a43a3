"""How instances of one consumer group share the two topics (a real broker, two consumers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from paystream.devenv.kafka import KafkaBroker
from paystream.kafka import GroupProtocol, KafkaConsumer, choose_group_protocol
from tests.conftest import Env


async def _consume_until(consumers: list[KafkaConsumer], done: Callable[[], bool]) -> None:
    """Call consume on each (the group protocol advances inside it) until `done`, at most 30 s."""
    deadline = time.monotonic() + 30
    while not done() and time.monotonic() < deadline:
        for consumer in consumers:
            await consumer.consume(100, 0.05)
    assert done(), [c.assignment for c in consumers]


async def _assigned(consumer: KafkaConsumer) -> None:
    """Start the consumer and wait until the group has given it partitions."""
    await consumer.start()
    await _consume_until([consumer], lambda: bool(consumer.assignment))


def _group_offset(env: Env, group_id: str, topic: str) -> int:
    reader = Consumer({"bootstrap.servers": env.bootstrap, "group.id": group_id})
    try:
        (committed,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
        return int(committed.offset)
    finally:
        reader.close()


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
async def test_each_instance_gets_partitions_of_both_topics(
    env: Env, protocol: GroupProtocol
) -> None:
    """Two instances split the partitions so that each takes online *and* offline payments
    (cooperative-sticky gave one instance every online partition and the other every offline),
    with the classic protocol's round-robin and with KIP-848's broker-side range alike."""
    settings = env.settings()
    topics = [env.online_topic, env.offline_topic]
    everything = {(t, p) for t in topics for p in range(env.stack.partitions)}
    first = KafkaConsumer(
        settings.kafka_client(), settings.group_id, topics, group_protocol=protocol
    )
    second = KafkaConsumer(
        settings.kafka_client(), settings.group_id, topics, group_protocol=protocol
    )

    def settled() -> bool:
        return (
            bool(first.assignment and second.assignment)
            and not first.assignment & second.assignment
            and first.assignment | second.assignment == everything
        )

    await _assigned(first)
    try:
        held_throughout = set(first.assignment)  # narrowed to what it never stopped holding
        await second.start()
        try:

            def settled_watching() -> bool:
                held_throughout.intersection_update(first.assignment)
                return settled()

            await _consume_until([first, second], settled_watching)
            shares = [set(first.assignment), set(second.assignment)]
        finally:
            await second.close()
    finally:
        await first.close()
    for share in shares:
        assert {topic for topic, _ in share} == set(topics)
    if protocol == "consumer":
        # Incremental: the partitions the first instance keeps never stopped flowing.
        assert held_throughout == shares[0]


async def test_auto_takes_kip_848_where_the_brokers_do(env: Env, tmp_path: Path) -> None:
    """ "auto" picks the consumer protocol on a broker that takes it and the classic one on a
    broker that accepts only classic groups."""
    client = env.settings().kafka_client()
    assert "consumer" == choose_group_protocol(client, env.online_topic, "auto")
    assert "classic" == choose_group_protocol(client, env.online_topic, "classic")
    old = KafkaBroker(
        tmp_path / "kafka", env.stack.home.parent / "cache", group_protocols="classic"
    )
    old.start()
    try:
        old.create_topics(["t"])
        assert "classic" == choose_group_protocol({"bootstrap.servers": old.bootstrap}, "t", "auto")
    finally:
        old.stop()


async def test_a_stale_offset_never_moves_the_group_back(env: Env) -> None:
    """An instance holding an older finished offset for a partition another instance has since
    taken further (it got the partition back) does not commit it over the newer one."""
    settings = env.settings()
    topics = [env.online_topic, env.offline_topic]
    key = (env.online_topic, 0)
    for offset in (10, 20):  # two owners in turn, each further than the last
        owner = KafkaConsumer(settings.kafka_client(), settings.group_id, topics)
        await _assigned(owner)
        assert {key: offset} == await owner.commit({key: offset})
        await owner.close()
    assert 20 == _group_offset(env, settings.group_id, env.online_topic)

    late = KafkaConsumer(settings.kafka_client(), settings.group_id, topics)
    await _assigned(late)
    try:
        covered = await late.commit({key: 15})  # finished while it did not hold the partition
    finally:
        await late.close()
    assert {key: 15} == covered
    assert 20 == _group_offset(env, settings.group_id, env.online_topic)


async def test_every_assignment_gets_a_writer_of_its_own(env: Env) -> None:
    """After a rebalance a consumer may read its partitions again from the committed offsets
    while batches of its previous assignment are still being written: its records then carry a
    new writer, so that the database keeps the two apart (`store.hold_partitions`)."""
    settings = env.settings()
    topics = [env.online_topic, env.offline_topic]
    first = KafkaConsumer(settings.kafka_client(), settings.group_id, topics)
    second = KafkaConsumer(settings.kafka_client(), settings.group_id, topics)
    await _assigned(first)
    try:
        before = (await first.consume(1, 0.05)).writer
        assert before == (await first.consume(1, 0.05)).writer  # the same assignment
        await second.start()
        try:
            everything = {(t, p) for t in topics for p in range(env.stack.partitions)}

            def shared() -> bool:  # first holds its share only once it was assigned anew
                return (
                    bool(first.assignment and second.assignment)
                    and not first.assignment & second.assignment
                    and first.assignment | second.assignment == everything
                )

            await _consume_until([first, second], shared)
            after = (await first.consume(1, 0.05)).writer
        finally:
            await second.close()
    finally:
        await first.close()
    assert after != before
