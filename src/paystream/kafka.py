"""A thin asyncio bridge over confluent-kafka. No business logic.

librdkafka's consumer is not thread-safe, so one dedicated thread owns it: every call goes through
a single-thread executor, and rebalance callbacks run on that same thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from uuid import UUID, uuid4

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from paystream import tracing
from paystream.errors import ConfigurationError
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


# Errors that mean the cluster refused us, not that it is away: fixing them takes a person.
_REFUSALS = {
    KafkaError._AUTHENTICATION: "the brokers refused our credentials",
    KafkaError.SASL_AUTHENTICATION_FAILED: "the brokers refused our credentials",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "the credentials may not read the topics",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "the credentials may not join the group",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "the credentials may not use the cluster",
    KafkaError._SSL: "the TLS handshake with the brokers failed",
}


def check_access(client: Mapping[str, str], timeout_s: float = 10.0) -> None:
    """Raise ConfigurationError, in one sentence, when the brokers refuse our credentials or TLS
    fails (an untrusted certificate, say), so that a wrong setting stops the start instead of
    retrying for ever. A cluster that does not answer is an outage, not a setting: logged, and
    the consumer keeps trying."""
    refused: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in _REFUSALS:
            refused.append(error)

    try:
        config: dict[str, Any] = {**client, "error_cb": on_error, "log_level": 0}
        admin = AdminClient(config)
    except KafkaException as exc:
        raise _rejected(exc) from exc
    deadline = time.monotonic() + timeout_s
    while not refused and time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1)
            return
        except KafkaException as exc:
            admin.poll(0)  # serves the error callbacks the failed request queued
            if exc.args[0].code() in _REFUSALS:
                refused.append(exc.args[0])
    if refused:
        error = refused[0]
        raise ConfigurationError(
            f"Kafka: {_REFUSALS[error.code()]} ({error.str()}); check the security settings in "
            "PAYSTREAM_KAFKA_CONFIG_FILE or PAYSTREAM_KAFKA__* (sasl.username, sasl.password, "
            "ssl.ca.location)."
        )
    log.warning("Kafka not reachable at start-up: the consumer keeps trying")


def _rejected(exc: KafkaException) -> ConfigurationError:
    return ConfigurationError(
        f"The Kafka client refused its configuration ({exc.args[0].str()}); check "
        "PAYSTREAM_KAFKA_CONFIG_FILE and the PAYSTREAM_KAFKA__* variables."
    )


GroupProtocol = Literal["classic", "consumer"]

# Whether the brokers answer, for readiness and paystream_broker_up: asked every 5 s (one small
# metadata request) and on every consume call while they do not. librdkafka's own errors say so
# only once a connection has failed, and a link that went silent fails no connection until
# socket.timeout.ms has passed (and not at all while a commit holds the consumer's thread).
_PROBE_EVERY_S = 5.0
_PROBE_TIMEOUT_S = 1.0
_BROKER_AWAY = frozenset(
    {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._TIMED_OUT}
)

LINK_TIMEOUTS: dict[str, Any] = {
    # A link that drops packets silently (a partition, a dead NAT entry, a broker host that
    # vanished) sends no reset: it shows only as requests that never get an answer. librdkafka
    # waits socket.timeout.ms for one before it closes the connection and reconnects; its
    # default, 60 s, would let a 20 s partition heal before the consumer noticed it. Our
    # requests are fetches that wait at most fetch.wait.max.ms (50 ms), heartbeats and
    # commits: a healthy broker answers each in milliseconds, so 10 s means it is away.
    "socket.timeout.ms": 10_000,
    # A connection attempt whose SYN gets no answer: give up after 10 s (default 30 s) and try
    # again, so that a healed link is used within seconds of healing.
    "socket.connection.setup.timeout.ms": 10_000,
    # Keep idle connections (a coordinator between heartbeats) open through NAT and firewall
    # idle timers, which otherwise forget them silently.
    "socket.keepalive.enable": True,
}


def _group_settings(protocol: GroupProtocol) -> dict[str, Any]:
    """How the group assigns partitions: set by paystream only (config.FIXED_KAFKA_PROPERTIES)."""
    if protocol == "consumer":
        # KIP-848: the broker assigns, incrementally, so a join or a leave moves only the
        # partitions that change hands while the rest keep flowing. `range` assigns each topic
        # on its own, so every instance still gets its share of online and of offline payments.
        # Session and heartbeat timing are the broker's then (group.consumer.* settings).
        return {"group.protocol": "consumer", "group.remote.assignor": "range"}
    return {
        # Round-robin over the partitions of both topics, so every instance gets its share of
        # each kind of payment. cooperative-sticky balances only the partition count: with two
        # instances it gave one every online partition and the other every offline one (seen
        # in `make bench`), leaving the gateway work on a single instance.
        "partition.assignment.strategy": "roundrobin",
    }


def _group_timing(protocol: GroupProtocol) -> dict[str, Any]:
    """Our defaults for the classic protocol's timing, which a deployment may tune; under
    KIP-848 the timing is the broker's, and librdkafka refuses these."""
    if protocol == "consumer":
        return {}
    return {"session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000}


def choose_group_protocol(
    client: Mapping[str, str],
    topic: str,
    wanted: Literal["auto", "classic", "consumer"],
    timeout_s: float = 10.0,
) -> GroupProtocol:
    """`wanted` itself, or for "auto" the consumer protocol (KIP-848) if the brokers take it,
    else the classic one. Asked by joining a throwaway group of our own on `topic`: a broker
    without KIP-848 answers its heartbeat with a fatal UNSUPPORTED_VERSION at once."""
    if wanted != "auto":
        return wanted
    probe = Consumer(
        {
            **client,
            **_group_settings("consumer"),
            "group.id": f"paystream-protocol-probe-{uuid4()}",
            "enable.auto.commit": False,
            "log_level": 0,
            "error_cb": lambda _: None,
        }
    )
    try:
        probe.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = probe.poll(0.1)
            error = None if message is None else message.error()
            if error is not None and error.fatal():
                log.info("the brokers do not take KIP-848 groups (%s): classic", error.str())
                return "classic"
            if probe.assignment():
                return "consumer"
        log.info("no answer to a KIP-848 join in %.0f s: the classic protocol", timeout_s)
        return "classic"
    finally:
        probe.close()


class KafkaConsumer:
    def __init__(
        self,
        client: Mapping[str, str],
        group_id: str,
        topics: list[str],
        *,
        group_protocol: GroupProtocol = "classic",
        **overrides: Any,
    ) -> None:
        """`client`: the deployment's librdkafka properties (bootstrap servers, security); they
        may tune anything but what correctness depends on (config.FIXED_KAFKA_PROPERTIES)."""
        fixed = {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A new group must not miss what was produced before it joined.
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            **_group_settings(group_protocol),
        }
        self._config = {
            **_group_timing(group_protocol),
            **LINK_TIMEOUTS,
            "max.poll.interval.ms": 300_000,
            "fetch.wait.max.ms": 50,
            # Bound prefetched memory whatever the backlog (librdkafka's default is 64 MiB).
            "queued.max.messages.kbytes": 16_384,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            **client,
            **overrides,
            **fixed,
        }
        self._topics = topics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")
        self._consumer: Consumer | None = None
        self.assignment: set[tuple[str, int]] = set()
        # The group's committed offset of each owned partition, as far as this consumer knows:
        # read when the partition is assigned, raised by each commit. Never committed below.
        self._committed: Offsets = {}
        self._committing: Offsets = {}  # sent, not yet answered
        self._commit_retry_at = 0.0
        self._paused = False
        self._writer = uuid4()
        self.broker_ok = True
        self._next_probe = 0.0

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _on_error(self, error: KafkaError) -> None:
        # A connection that failed or timed out (socket.timeout.ms) as well as all of them
        # down: the next consume call asks the broker again and says when it is back.
        if error.code() in _BROKER_AWAY:
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
        for p in partitions:
            self._committing.pop((p.topic, p.partition), None)
        log.info("revoked %s", sorted((p.topic, p.partition) for p in partitions))

    def _open(self) -> None:
        try:
            self._consumer = Consumer(self._config)
        except KafkaException as exc:
            raise _rejected(exc) from exc
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
        now = time.monotonic()
        if not self.broker_ok or now >= self._next_probe:
            self._next_probe = now + _PROBE_EVERY_S
            try:
                self._consumer.list_topics(self._topics[0], timeout=_PROBE_TIMEOUT_S)
                self.broker_ok = True
            except KafkaException:
                self.broker_ok = False
        records = []
        tracing_on = tracing.enabled()
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
                    traceparent=_traceparent(message) if tracing_on else None,
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
        """Those of `offsets` for partitions owned now and beyond both the group's committed
        offset and any commit on its way.

        One at or below it (another owner got further while this one did not hold the partition)
        is covered already: committing it would move the group back.
        """
        return {
            key: offset
            for key, offset in offsets.items()
            if key in self.assignment
            and offset > max(self._committed.get(key, -1), self._committing.get(key, -1))
        }

    def _commit(self, offsets: Offsets) -> Offsets:
        """Send the commit and return at once: a synchronous commit to a broker that went
        silent holds this thread (and so every consume call, the broker probe and shutdown)
        until the link heals. The result arrives in `_on_commit`, served by consume calls."""
        assert self._consumer is not None
        owned = {key: offset for key, offset in offsets.items() if key in self.assignment}
        ahead = self.uncommitted(owned)
        if ahead:
            if time.monotonic() < self._commit_retry_at:
                return {}
            try:
                self._consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in ahead.items()],
                    asynchronous=True,
                )
            except KafkaException as exc:
                # Lost the partition in a rebalance: its new owner re-reads; writes are idempotent.
                log.warning("offset commit failed (%s); records will be redelivered", exc)
                return {}
            self._committing.update(ahead)
        return owned

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if self._committing.get(key, -1) <= tp.offset:
                self._committing.pop(key, None)
            if error is None and tp.error is None:
                self._committed[key] = max(self._committed.get(key, -1), tp.offset)
            else:
                failed.append(key)
        if failed:
            # Sent again (no sooner than in a second) while the partitions are ours; a new
            # owner re-reads from the group's offset instead, and writes are idempotent.
            self._commit_retry_at = time.monotonic() + 1.0
            reason = error.str() if error is not None else "a partition's commit failed"
            log.warning("offset commit failed (%s) for %s; sent again", reason, sorted(failed))

    async def commit(self, offsets: Offsets) -> Offsets:
        """Commit the offsets of the partitions this consumer owns, never below what the group
        has committed already or a commit on its way; returns the owned offsets now covered by
        a commit, sent or done (closing waits for those sent)."""
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


def _traceparent(message: Message) -> str | None:
    """The record's `traceparent` header (librdkafka returns headers as a list of pairs)."""
    headers = message.headers()
    if not isinstance(headers, list):
        return None
    for name, value in headers:
        if name == tracing.TRACEPARENT and value:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return None


def merge_offsets(target: Offsets, records: Iterable[Record]) -> None:
    for record in records:
        key = (record.id.topic, record.id.partition)
        target[key] = max(target.get(key, 0), record.id.offset + 1)
