"""The load the benchmark offers: fresh payments as shops and the web send them, produced as a
backlog or at a steady rate."""

from __future__ import annotations

import random
import threading
import time
import uuid

import orjson
from confluent_kafka import Producer

from paystream.config import Settings

REPORT = orjson.dumps(
    {
        "payment_id": "c0ffee00-0000-4000-8000-000000000000",
        "error_type": "other",
        "error": "other",
        "error_description": "duplicate of a payment already stored",
    }
)
"""An error report as the processor sends one, for measuring the log API's capacity."""


def document(rng: random.Random, payment_type: str) -> bytes:
    return orjson.dumps(
        {
            "payment_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "account_id": rng.randint(1, 2000),
            "payment_type": payment_type,
            "credit_card": "4111111111111111" if payment_type == "online" else "",
            "amount": rng.randint(1, 500),
        }
    )


def produce(bootstrap: str, messages: list[tuple[str, bytes]]) -> None:
    """Records go round-robin over each topic's partitions, so every instance gets its share
    (the default sticky partitioner fills one partition per producer batch)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000}
    )
    counts = {t: len(m.partitions) for t, m in producer.list_topics(timeout=10).topics.items()}
    for n, (topic, value) in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value, partition=n % counts[topic])
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


class PacedLoad:
    """Online and offline payments (69/31) at a steady rate, as shops and the web send them."""

    def __init__(self, settings: Settings, rng: random.Random, rate: int) -> None:
        self._producer = Producer(
            {"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 1}
        )
        self._topics = {"online": settings.online_topic, "offline": settings.offline_topic}
        self._rng = rng
        self._rate = rate

    def produce(self, seconds: float, stop: threading.Event | None = None) -> int:
        """Payments for `seconds`, or until `stop` is set: how many were produced."""
        count = int(self._rate * seconds)
        started = time.monotonic()
        for i in range(count):
            if stop is not None and stop.is_set():
                return i
            kind = "online" if self._rng.random() < 0.69 else "offline"
            self._producer.produce(self._topics[kind], document(self._rng, kind))
            self._producer.poll(0)
            wait = started + (i + 1) / self._rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the offered load, not waiting for a result
        return count

    def flush(self) -> None:
        self._producer.flush(30)
