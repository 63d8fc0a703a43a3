"""Replay of kept records, the `paystream` commands as a user runs them, and migrations."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
from confluent_kafka import Producer

from paystream.app import open_pool
from paystream.migrations import migrate
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    caught_up,
    cli,
    processor,
    settings_env,
    unreported,
    wait_for,
)


def _produce(env: Env, topic: str, documents: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": env.stack.kafka.bootstrap})
    for document in documents:
        producer.produce(topic, orjson.dumps(document))
    assert producer.flush(10) == 0


def _offline(pid: str, account_id: int, amount: int = 10) -> dict[str, Any]:
    return {
        "payment_id": pid,
        "account_id": account_id,
        "payment_type": "offline",
        "credit_card": "",
        "amount": amount,
    }


async def test_replay_stores_a_payment_once_its_account_exists(
    env: Env, simulator: SimulatorClient
) -> None:
    """An unknown account is kept as `database`; after the account is created, replay stores the
    payment, stamps the account and resolves the kept record; a second replay changes nothing."""
    settings = env.settings()
    _produce(env, env.offline_topic, [_offline("p-unknown", 4242), _offline("p-known", 7)])
    async with processor(settings):
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        await async_wait_for(lambda: unreported(env) == 0, 60, "the report")
    assert env.query("SELECT payment_id, error_type, reason FROM paystream.kept_records") == [
        ("p-unknown", "database", "unknown_account")
    ]
    assert [
        {"payment_id": e["payment_id"], "error_type": e["error_type"]} for e in simulator.logs()
    ] == [{"payment_id": "p-unknown", "error_type": "database"}]

    env.execute("INSERT INTO accounts (account_id, email) VALUES (4242, 'new@example.com')")
    result = cli(env, "replay", "--reason", "unknown_account")
    assert result.returncode == 0, result.stderr
    assert "stored 1" in result.stdout
    assert env.query(
        "SELECT payment_id, account_id FROM payments WHERE payment_id = 'p-unknown'"
    ) == [("p-unknown", 4242)]
    assert env.query(
        "SELECT last_payment_date = (SELECT created_on FROM payments"
        " WHERE payment_id = 'p-unknown') FROM accounts WHERE account_id = 4242"
    ) == [(True,)]
    assert env.query("SELECT resolved_at IS NOT NULL, replays FROM paystream.kept_records") == [
        (True, 1)
    ]
    again = cli(env, "replay")
    assert again.returncode == 0, again.stderr
    assert "stored 0" in again.stdout
    assert env.query("SELECT count(*) FROM payments") == [(2,)]


async def test_gateway_outage_keeps_payments_for_replay(
    env: Env, simulator: SimulatorClient
) -> None:
    """Online payments that meet a gateway outage are kept as `network`; offline ones are still
    stored meanwhile; a replay the open circuit refuses spends no attempt; once the gateway is
    back, replay stores the approved ones."""
    settings = env.settings(gateway_attempts=2, gateway_budget_s=1.0)
    simulator.faults(gateway_outage=True, decline_rate=0.0)
    online = [
        dict(_offline(f"on-{i}", i + 1), payment_type="online", credit_card="4111")
        for i in range(5)
    ]
    _produce(env, env.online_topic, online)
    _produce(env, env.offline_topic, [_offline("off-1", 9)])
    async with processor(settings):
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
    assert env.query("SELECT payment_id FROM payments") == [("off-1",)]
    assert env.query(
        "SELECT count(*), min(error_type) FROM paystream.kept_records"
        " WHERE reason = 'gateway_unavailable'"
    ) == [(5, "network")]
    refused = cli(
        env,
        "replay",
        PAYSTREAM_GATEWAY_MAX_IN_FLIGHT="1",
        PAYSTREAM_GATEWAY_BREAKER_THRESHOLD="1",
        PAYSTREAM_GATEWAY_BREAKER_COOLDOWN_S="600",
    )
    assert 0 == refused.returncode, refused.stderr
    # One payment reached the gateway (and opened the circuit); the four the open circuit
    # refused were not tried, so they keep every attempt of their re-validation budget.
    assert [(0, 4), (1, 1)] == env.query(
        "SELECT replays, count(*) FROM paystream.kept_records GROUP BY 1 ORDER BY 1"
    )
    simulator.faults(gateway_outage=False)
    result = cli(env, "replay", "--type", "network")
    assert result.returncode == 0, result.stderr
    assert env.query("SELECT count(*) FROM payments") == [(6,)]


def test_run_drains_and_exits_zero_on_sigterm(env: Env, simulator: SimulatorClient) -> None:
    """`paystream run` processes the topics; SIGTERM makes it commit and exit 0. Then
    `paystream errors --json` lists the kept duplicate with the documented keys."""
    _produce(env, env.offline_topic, [_offline("dup", 1), _offline("dup", 1), _offline("x", 2)])
    settings = env.settings()
    with subprocess.Popen(
        [sys.executable, "-m", "paystream", "run"],
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as run:
        try:
            wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
            wait_for(lambda: unreported(env) == 0, 60, "the report")
        finally:
            run.send_signal(signal.SIGTERM)
            _, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    assert env.query("SELECT count(*) FROM payments") == [(2,)]

    listing = cli(env, "errors", "--json")
    assert listing.returncode == 0, listing.stderr
    items = orjson.loads(listing.stdout)
    assert len(items) == 1
    item = items[0]
    assert (
        item["payment_id"],
        item["error_type"],
        item["reason"],
        item["reported"],
    ) == ("dup", "other", "duplicate", True)
    assert env.offline_topic == item["topic"]
    assert {"partition", "offset", "error_description"} <= set(item)
    assert orjson.loads(cli(env, "errors", "--json", "--type", "database").stdout) == []


def test_run_with_a_database_that_refuses_us_fails_in_one_sentence(env: Env) -> None:
    """A database URL the server answers and refuses (here: no such database) ends `paystream
    run` with exit 2 and one clear sentence, without the password."""
    parts = urlsplit(env.database_url)
    url = f"postgresql://tech:pw-Secret@{parts.hostname}:{parts.port}/nope"
    result = cli(env, "run", PAYSTREAM_DATABASE_URL=url)
    assert result.returncode == 2
    assert "Cannot connect to the database at postgresql://" in result.stderr
    assert 'database "nope" does not exist' in result.stderr
    assert "pw-Secret" not in result.stderr


def test_run_with_a_database_nobody_answers_at_waits_for_it(env: Env, tmp_path: Path) -> None:
    """A database nobody answers at (yet) is waited for: `paystream run` stays up, says so, and
    exits 0 on SIGTERM."""
    settings = env.settings(database_url="postgresql://tech:pw@127.0.0.1:9/payments")
    log = tmp_path / "run.log"
    with log.open("w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "paystream", "run"],
            env=settings_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    def said_twice() -> bool:
        return log.read_text().count("does not answer") >= 2

    try:
        wait_for(said_twice, 60, "the waiting to be said twice")
        assert run.poll() is None
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
    assert 0 == run.returncode
    assert "pw" not in log.read_text().replace("payments", "")


async def test_concurrent_migrations_apply_once(env: Env) -> None:
    """Several instances starting at once apply each migration exactly once."""

    async def one() -> list[str]:
        async with await psycopg.AsyncConnection.connect(env.database_url) as conn:
            return await migrate(conn)

    results = await asyncio.gather(*(one() for _ in range(4)))
    assert sum(1 for applied in results if applied) == 1
    versions = env.query("SELECT version FROM paystream.schema_migrations")
    assert len(versions) == len({v for (v,) in versions})
    async with open_pool(env.settings()) as pool, pool.connection() as conn:
        assert await migrate(conn) == []


def test_run_with_taken_web_port_fails_in_one_sentence(env: Env) -> None:
    """A dashboard port already in use ends `paystream run` with exit 2 and says what to set."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = cli(env, "run", PAYSTREAM_WEB_PORT=str(port))
    assert 2 == result.returncode
    assert f"Port {port} on 127.0.0.1 is taken" in result.stderr
    assert "PAYSTREAM_WEB_PORT" in result.stderr
