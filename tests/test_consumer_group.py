"""How instances of one consumer group share the two topics (a real broker, two consumers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest
from confluent_kafka import Consumer, TopicPartition

from paystream.brokers import GroupProtocol, choose_group_protocol
from paystream.consumer import Membership
from paystream.kafka import Assigned, CommitAnswered, KafkaConsumer, Offsets, Revoked
from paystream.model import PartitionId
from paystream_tooling.devenv.kafka import KafkaBroker
from paystream_tooling.polling import until_async
from tests.conftest import Env


class Member:
    """One instance's Kafka bridge and the loop's view of its membership, as app.py wires them."""

    def __init__(self, env: Env, protocol: GroupProtocol = "classic") -> None:
        settings = env.settings()
        self.membership = Membership()
        self.kafka = KafkaConsumer(
            settings.kafka_client(),
            settings.group_id,
            [env.online_topic, env.offline_topic],
            group_protocol=protocol,
            listener=self.membership.apply,
        )

    @property
    def assignment(self) -> set[PartitionId]:
        return self.membership.assignment

    async def writer_after_consume(self) -> UUID:
        await self.kafka.consume(1, 0.05)
        return self.membership.writer

    async def commit(self, offsets: Offsets) -> bool:
        return await self.membership.commit(self.kafka, offsets)


async def _consume_until(members: list[Member], done: Callable[[], bool]) -> None:
    """Call consume on each (the group protocol advances inside it) until `done`, at most 30 s."""

    async def consumed() -> bool:
        for member in members:
            await member.kafka.consume(100, 0.05)
        return done()

    what = f"the group to settle (now {[m.assignment for m in members]})"
    await until_async(consumed, 30, what, every_s=0)


async def _assigned(member: Member) -> None:
    """Start the consumer and wait until the group has given it partitions."""
    await member.kafka.start()
    await _consume_until([member], lambda: bool(member.assignment))


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
    topics = [env.online_topic, env.offline_topic]
    everything = {(t, p) for t in topics for p in range(env.stack.partitions)}
    first, second = Member(env, protocol), Member(env, protocol)

    def settled() -> bool:
        return (
            bool(first.assignment and second.assignment)
            and not first.assignment & second.assignment
            and first.assignment | second.assignment == everything
        )

    await _assigned(first)
    try:
        held_throughout = set(first.assignment)  # narrowed to what it never stopped holding
        await second.kafka.start()
        try:

            def settled_watching() -> bool:
                held_throughout.intersection_update(first.assignment)
                return settled()

            await _consume_until([first, second], settled_watching)
            shares = [set(first.assignment), set(second.assignment)]
        finally:
            await second.kafka.close()
    finally:
        await first.kafka.close()
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
    key = (env.online_topic, 0)
    for offset in (10, 20):  # two owners in turn, each further than the last
        owner = Member(env)
        await _assigned(owner)
        assert await owner.commit({key: offset})
        await owner.kafka.close()
    assert 20 == _group_offset(env, settings.group_id, env.online_topic)

    late = Member(env)
    await _assigned(late)
    try:
        # Finished while it did not hold the partition: nothing is due, nothing is sent.
        assert {} == late.membership.commits.due({key: 15})
        assert await late.commit({key: 15})
        # One computed before a rebalance the Kafka thread has run since is not sent at all.
        stale = late.membership.generation - 1
        assert not await late.kafka.commit({key: 30}, stale)
    finally:
        await late.kafka.close()
    assert 20 == _group_offset(env, settings.group_id, env.online_topic)


async def test_every_assignment_gets_a_writer_of_its_own(env: Env) -> None:
    """After a rebalance a consumer may read its partitions again from the committed offsets
    while batches of its previous assignment are still being written: its records then carry a
    new writer, so that the database keeps the two apart (`store.hold_partitions`)."""
    topics = [env.online_topic, env.offline_topic]
    first, second = Member(env), Member(env)
    await _assigned(first)
    try:
        before = await first.writer_after_consume()
        assert before == await first.writer_after_consume()  # the same assignment
        await second.kafka.start()
        try:
            everything = {(t, p) for t in topics for p in range(env.stack.partitions)}

            def shared() -> bool:  # first holds its share only once it was assigned anew
                return (
                    bool(first.assignment and second.assignment)
                    and not first.assignment & second.assignment
                    and first.assignment | second.assignment == everything
                )

            await _consume_until([first, second], shared)
            after = await first.writer_after_consume()
        finally:
            await second.kafka.close()
    finally:
        await first.kafka.close()
    assert after != before


def test_membership_commits_only_owned_partitions_beyond_the_group() -> None:
    """The loop's view, built from the Kafka thread's snapshots alone: a partition counts once
    assigned and until revoked, an offset only beyond the group's committed one, and a commit's
    answer raises the group's offset."""
    membership = Membership()
    a, b = ("t", 0), ("t", 1)
    membership.apply(Assigned(1, frozenset({a, b}), {a: 5}))
    assert {a: 6, b: 1} == membership.commits.ahead({a: 6, b: 1})
    assert {} == membership.commits.ahead({a: 5})
    membership.apply(CommitAnswered({b: 9}, {}, None))
    assert {} == membership.commits.ahead({b: 9})
    membership.apply(Revoked(2, frozenset({a})))
    assert {b: 10} == membership.commits.ahead({a: 7, b: 10})
    assert 2 == membership.generation


def test_a_new_assignment_brings_a_new_writer() -> None:
    """Every Assigned snapshot names a new writer; a revocation keeps the current one."""
    membership = Membership()
    first = membership.writer
    membership.apply(Assigned(1, frozenset({("t", 0)}), {}))
    second = membership.writer
    membership.apply(Revoked(2, frozenset({("t", 0)})))
    assert first != second
    assert second == membership.writer
