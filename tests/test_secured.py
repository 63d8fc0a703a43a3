"""A secured deployment for real: Kafka over SASL_SSL (SCRAM-SHA-512), PostgreSQL over TLS
(verify-full), an HTTPS gateway demanding a token, secrets from files; and each wrong
credential failing fast in one sentence."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from paystream_tooling.devenv.certs import make_server_certificate
from paystream_tooling.devenv.kafka import KafkaBroker, SecureListener
from paystream_tooling.devenv.stack import DB_PASSWORD, Stack
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    new_env,
    private_postgres,
    processor,
    reconcile_now,
    running_simulator,
    settled,
    wait_for,
)

SASL_PASSWORD = "kafka-Secret-41"
GATEWAY_TOKEN = "gw-Token-7731"


@dataclass
class Secured:
    """One secured deployment: where everything is and the variables a processor gets."""

    env: Env
    simulator: SimulatorClient
    variables: dict[str, str]
    folder: Path

    def run(self, **changes: str) -> subprocess.CompletedProcess[str]:
        """`paystream run` expected to stop by itself (a configuration error); a change to ""
        removes the variable."""
        variables = {**self.variables, **changes}
        return subprocess.run(
            [sys.executable, "-m", "paystream", "run"],
            env={k: v for k, v in variables.items() if v},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _secret(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def secured(stack: Stack, folder: Path) -> Iterator[Secured]:
    tls = make_server_certificate(folder / "certs")
    broker = KafkaBroker(
        folder / "kafka",
        stack.home.parent / "cache",
        secure=SecureListener(tls=tls, username="paystream", password=SASL_PASSWORD),
    )
    broker.start()
    try:
        with private_postgres(folder / "pg", tls=tls) as (_, url):
            # Topics and the simulator's producer use the broker's plaintext listener; the
            # processor only the SASL_SSL one.
            env = new_env(stack, database_url=url, bootstrap=broker.bootstrap)
            token = _secret(folder, "gateway-token", GATEWAY_TOKEN)
            with running_simulator(env, "--token-file", str(token), tls=tls) as simulator:
                secure = broker.secure_client()
                properties = folder / "client.properties"
                properties.write_text(
                    # As a managed cluster hands it out, with the password kept elsewhere.
                    f"bootstrap.servers={secure['bootstrap.servers']}\n"
                    "security.protocol=SASL_SSL\n"
                    "sasl.mechanism=SCRAM-SHA-512\n"
                    "sasl.username=paystream\n"
                )
                no_password = url.replace(f":{DB_PASSWORD}@", "@")
                variables = {
                    "PATH": os.environ["PATH"],
                    "PAYSTREAM_KAFKA_CONFIG_FILE": str(properties),
                    "PAYSTREAM_KAFKA__SASL_PASSWORD_FILE": str(
                        _secret(folder, "sasl-password", SASL_PASSWORD)
                    ),
                    "PAYSTREAM_KAFKA__SSL_CA_LOCATION": str(tls.ca),
                    "PAYSTREAM_DATABASE_URL": f"{no_password}?sslmode=verify-full"
                    f"&sslrootcert={tls.ca}",
                    "PAYSTREAM_DATABASE_PASSWORD_FILE": str(
                        _secret(folder, "db-password", DB_PASSWORD)
                    ),
                    "PAYSTREAM_GATEWAY_URL": simulator.url,
                    "PAYSTREAM_LOG_URL": simulator.url,
                    "PAYSTREAM_THIRD_PARTY_CA_FILE": str(tls.ca),
                    "PAYSTREAM_GATEWAY_TOKEN_FILE": str(token),
                    "PAYSTREAM_GROUP_ID": f"group-{env.name}",
                    "PAYSTREAM_ONLINE_TOPIC": env.online_topic,
                    "PAYSTREAM_OFFLINE_TOPIC": env.offline_topic,
                    "PAYSTREAM_WEB_PORT": "0",
                    "PAYSTREAM_OUTBOX_IDLE_S": "0.2",
                    "PAYSTREAM_REVALIDATE_EVERY_S": "1",
                }
                yield Secured(env, simulator, variables, folder)
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def deployment(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    with secured(stack, tmp_path_factory.mktemp("secured")) as running:
        yield running


def test_the_whole_stream_flows_through_secured_kafka_postgres_and_gateway(
    deployment: Secured,
) -> None:
    """The processor reads over SASL_SSL, writes over TLS (checked in pg_stat_ssl), validates
    through HTTPS with a token from a file; the oracle finds nothing lost, and no secret is in
    its log."""
    env, simulator = deployment.env, deployment.simulator
    log_path = deployment.folder / "processor.log"
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            [sys.executable, "-m", "paystream", "run"],
            env=deployment.variables,
            stdout=log,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        try:
            simulator.start(records=300, seed=13, profile="hostile", rate=0)
            settings = env.settings(group_id=deployment.variables["PAYSTREAM_GROUP_ID"])
            wait_for(lambda: settled(env, simulator, settings), 120, "the stream to settle")
            encrypted = env.query(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity AS a"
                " JOIN pg_stat_ssl AS s USING (pid) WHERE a.application_name = 'paystream'"
            )
            report = reconcile_now(env, simulator, settings)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert 0 == proc.returncode, log_path.read_text()[-3000:]
    assert report.problems == []
    assert report.ok
    total_ssl, total = encrypted[0]
    assert 0 < total
    assert total == total_ssl
    text = log_path.read_text()
    for secret in (SASL_PASSWORD, GATEWAY_TOKEN):
        assert secret not in text


SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"  # trusted roots that did not sign ours


@pytest.mark.parametrize(
    ("changes", "removed", "sentence"),
    [
        (
            {"PAYSTREAM_KAFKA__SASL_PASSWORD": "wrong-sasl"},
            "PAYSTREAM_KAFKA__SASL_PASSWORD_FILE",
            "Kafka: the brokers refused our credentials",
        ),
        (
            {"PAYSTREAM_KAFKA__SSL_CA_LOCATION": SYSTEM_CAS},
            None,
            "Kafka: the TLS handshake with the brokers failed",
        ),
        ({}, "PAYSTREAM_THIRD_PARTY_CA_FILE", "The gateway's TLS certificate at"),
        (
            {"PAYSTREAM_GATEWAY_TOKEN": "stale-token"},
            "PAYSTREAM_GATEWAY_TOKEN_FILE",
            "the gateway refused our credentials (HTTP 401)",
        ),
        (
            {
                "PAYSTREAM_DATABASE_URL": "postgresql://tech@127.0.0.1:{port}/payments"
                f"?sslmode=verify-full&sslrootcert={SYSTEM_CAS}"
            },
            None,
            "Cannot connect to the database at postgresql://tech@127.0.0.1",
        ),
    ],
    ids=["sasl-password", "broker-certificate", "gateway-certificate", "gateway-token", "db"],
)
def test_a_wrong_credential_stops_the_start_in_one_sentence(
    deployment: Secured, changes: dict[str, str], removed: str | None, sentence: str
) -> None:
    """Exit 2 within seconds, one sentence naming what to fix, no secret echoed."""
    port = deployment.env.database_url.rsplit(":", 1)[1].split("/")[0]
    variables = {k: v.format(port=port) for k, v in changes.items()}
    result = deployment.run(**variables, **({} if removed is None else {removed: ""}))
    assert 2 == result.returncode, result.stderr[-2000:]
    assert sentence in result.stderr
    for secret in (SASL_PASSWORD, GATEWAY_TOKEN, "wrong-sasl", "stale-token"):
        assert secret not in result.stderr


async def test_credentials_revoked_while_running_keep_payments_waiting(
    env: Env, simulator: SimulatorClient
) -> None:
    """A key revoked while the processor runs is an outage of ours, not a decline: the payments
    are kept as gateway_unavailable and stored, with no operator, once the key works again."""
    simulator.faults(decline_rate=0)
    settings = env.settings(revalidate_every_s=0.5, gateway_breaker_max_cooldown_s=1.0)
    producer = Producer({"bootstrap.servers": env.bootstrap})

    def online(pid: str, account_id: int) -> bytes:
        document = {
            "payment_id": pid,
            "account_id": account_id,
            "payment_type": "online",
            "credit_card": "4111111111111111",
            "amount": 10,
        }
        return orjson.dumps(document)

    def stored() -> int:
        return int(env.query("SELECT count(*) FROM payments")[0][0])

    def kept() -> list[tuple[Any, ...]]:
        return env.query("SELECT reason, count(*) FROM paystream.kept_records GROUP BY 1")

    async with processor(settings):  # the start-up check passes: the key works
        producer.produce(env.online_topic, online("before", 1))
        assert 0 == producer.flush(10)
        await async_wait_for(lambda: 1 == stored(), 60, "a payment while the key works")
        simulator.faults(credentials_revoked=True)
        for i in range(5):
            producer.produce(env.online_topic, online(f"revoked-{i}", i + 2))
        assert 0 == producer.flush(10)
        await async_wait_for(lambda: [("gateway_unavailable", 5)] == kept(), 60, "5 kept")
        assert 1 == stored()
        simulator.faults(credentials_revoked=False)
        await async_wait_for(lambda: 6 == stored(), 60, "re-validation once the key works")
    assert [("gateway_unavailable", 5)] == kept()  # kept rows stay, as the audit trail
