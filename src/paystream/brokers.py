"""What we ask of the brokers before consuming: that they take our credentials (or stop the
start in one sentence), and which consumer-group protocol they speak."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Literal
from uuid import uuid4

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from paystream.errors import ConfigurationError

log = logging.getLogger(__name__)

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
        raise rejected(exc) from exc
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


def rejected(exc: KafkaException) -> ConfigurationError:
    return ConfigurationError(
        f"The Kafka client refused its configuration ({exc.args[0].str()}); check "
        "PAYSTREAM_KAFKA_CONFIG_FILE and the PAYSTREAM_KAFKA__* variables."
    )


GroupProtocol = Literal["classic", "consumer"]


def group_settings(protocol: GroupProtocol) -> dict[str, Any]:
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


def group_timing(protocol: GroupProtocol) -> dict[str, Any]:
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
            **group_settings("consumer"),
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
