"""How instances of one consumer group share the two topics (a real broker, two consumers)."""

from __future__ import annotations

import time

from paystream.kafka import KafkaConsumer
from tests.conftest import Env


async def test_each_instance_gets_partitions_of_both_topics(env: Env) -> None:
    """Two instances split the partitions so that each takes online *and* offline payments
    (cooperative-sticky gave one instance every online partition and the other every offline)."""
    settings = env.settings()
    topics = [env.online_topic, env.offline_topic]
    everything = {(t, p) for t in topics for p in range(env.stack.partitions)}
    first = KafkaConsumer(settings.kafka_bootstrap_servers, settings.group_id, topics)
    second = KafkaConsumer(settings.kafka_bootstrap_servers, settings.group_id, topics)

    def settled() -> bool:
        return (
            bool(first.assignment and second.assignment)
            and not first.assignment & second.assignment
            and first.assignment | second.assignment == everything
        )

    await first.start()
    try:
        await second.start()
        try:
            deadline = time.monotonic() + 30
            while not settled() and time.monotonic() < deadline:
                await first.consume(100, 0.05)  # the group protocol advances inside consume
                await second.consume(100, 0.05)
            assert settled(), (first.assignment, second.assignment)
            shares = [set(first.assignment), set(second.assignment)]
        finally:
            await second.close()
    finally:
        await first.close()
    for share in shares:
        assert {topic for topic, _ in share} == set(topics)
