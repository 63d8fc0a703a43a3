"""Fault injection against the real broker, database and simulator: a crash or an outage at any
point must leave the system able to finish the job correctly.

Each scenario sends a seeded hostile stream with known expected outcomes, injects its fault while
the processor consumes, lets the system recover, then checks the full oracle: every valid payment
stored exactly once, nothing else stored, account dates exact, every other record kept with the
right type and reported at least once, committed offsets at the end. `make test` runs one seeded
round of each; `make chaos ROUNDS=n` runs n randomized rounds and writes chaos-report.json.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Producer

from paystream_tooling.devenv.kafka import KafkaBroker
from paystream_tooling.devenv.stack import (
    Stack,
)
from tests import chaos_report
from tests.chaos import (
    RATE,
    RECORDS,
    chaos_settings,
    check,
    processes,
    produced_at_least,
    record,
    seeds,
    stream_under_faults,
)
from tests.conftest import (
    Env,
    caught_up,
    new_env,
    private_postgres,
    reconcile_now,
    running_simulator,
    settings_env,
    settled,
    unresolved_gateway_failures,
    wait_for,
)

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize("seed", seeds("gateway-faults"))
def test_gateway_errors_hangs_and_drops(stack: Stack, tmp_path: Path, seed: int) -> None:
    """5xx, hangs past the timeout and dropped connections: retried, kept, re-validated later."""
    faults = {"error_rate": 0.3, "hang_rate": 0.05, "hang_s": 3, "drop_rate": 0.1}
    with stream_under_faults(stack, tmp_path, seed, **faults) as (env, simulator, settings):
        wait_for(produced_at_least(simulator, 1.0), 60, "the stream")
        simulator.faults(error_rate=0, hang_rate=0, drop_rate=0)
        check(env, simulator, settings, "gateway-faults", seed, time.monotonic())


@pytest.mark.parametrize("seed", seeds("gateway-outage"))
def test_gateway_outage_keeps_offline_flowing(stack: Stack, tmp_path: Path, seed: int) -> None:
    """During a full gateway outage the breaker opens, offline payments are still stored, and
    online ones are stored once the gateway is back."""
    with stream_under_faults(stack, tmp_path, seed, gateway_outage=True) as running:
        env, simulator, settings = running

        def offline_stored() -> bool:
            rows = env.query("SELECT count(*) FROM payments WHERE payment_type = 'offline'")
            return int(rows[0][0]) > 20

        wait_for(offline_stored, 60, "offline payments stored during the outage")
        assert env.query("SELECT count(*) FROM payments WHERE payment_type = 'online'") == [(0,)]
        simulator.faults(gateway_outage=False)
        check(env, simulator, settings, "gateway-outage", seed, time.monotonic())


@pytest.mark.parametrize("seed", seeds("late-gateway-flap"))
@pytest.mark.parametrize(
    ("name", "fault"), [("outage", {"drop_rate": 1.0}), ("5xx-burst", {"error_rate": 1.0})]
)
def test_a_gateway_flap_at_the_end_strands_nothing(
    stack: Stack, tmp_path: Path, seed: int, name: str, fault: dict[str, float]
) -> None:
    """The gateway fails (connections dropped, or every call answered 503) for the last part of
    the stream, the circuit opens, and no traffic follows: once the gateway is back, every valid
    payment is stored within max cool-down + re-validation period + the drain, by nobody."""
    env = new_env(stack)
    with running_simulator(env) as simulator:
        settings = chaos_settings(
            env, gateway_breaker_threshold=5, gateway_breaker_max_cooldown_s=4.0
        )
        with processes(settings, tmp_path) as start:
            start()
            simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
            wait_for(produced_at_least(simulator, 0.8), 60, "most of the stream")
            simulator.faults(**fault)
            wait_for(
                lambda: simulator.status().get("done") is True and caught_up(env, settings),
                90,
                "the whole stream consumed during the fault",
            )
            refused = env.query(
                "SELECT count(*) FROM paystream.kept_records"
                " WHERE description LIKE '%%circuit open%%'"
            )
            assert 0 < refused[0][0], "the circuit never opened: the scenario tests nothing"
            simulator.faults(drop_rate=0, error_rate=0)
            recovered = time.monotonic()
            drain_s = 30  # re-validating a few hundred payments, with room for a busy machine
            bound_s = (
                settings.gateway_breaker_max_cooldown_s + settings.revalidate_every_s + drain_s
            )
            wait_for(
                lambda: unresolved_gateway_failures(env) == 0,
                bound_s,
                "every payment kept on the gateway to be re-validated without an operator",
            )
            check(env, simulator, settings, f"late-gateway-{name}", seed, recovered)


@pytest.mark.parametrize("seed", seeds("log-outage"))
def test_log_service_outage(stack: Stack, tmp_path: Path, seed: int) -> None:
    """Reports queue durably while the log service is down and all arrive afterwards."""
    with stream_under_faults(stack, tmp_path, seed, log_outage=True) as (env, simulator, settings):
        wait_for(produced_at_least(simulator, 1.0), 60, "the stream")
        assert simulator.logs() == []
        simulator.faults(log_outage=False)
        check(env, simulator, settings, "log-outage", seed, time.monotonic())


@pytest.mark.parametrize("seed", seeds("crash"))
def test_kill_9_at_random_moments(stack: Stack, tmp_path: Path, seed: int) -> None:
    """The processor is killed with SIGKILL several times mid-stream and restarted."""
    rng = random.Random(seed)
    env = new_env(stack)
    with running_simulator(env) as simulator:
        settings = chaos_settings(env, batch_size=20)
        with processes(settings, tmp_path) as start:
            proc = start()
            simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
            for kill_at in sorted(rng.uniform(0.1, 0.9) for _ in range(3)):
                wait_for(produced_at_least(simulator, kill_at), 60, "the stream")
                wait_for(
                    lambda: env.query("SELECT count(*) FROM payments")[0][0] > 0,
                    60,
                    "some progress",
                )
                proc.kill()
                proc = start()
            check(env, simulator, settings, "crash", seed, time.monotonic())


@pytest.mark.parametrize("seed", seeds("database-outage"))
def test_database_outage_and_restart(stack: Stack, tmp_path: Path, seed: int) -> None:
    """The database stops mid-stream: nothing is committed meanwhile, and when it is back the
    processor resumes with nothing lost and nothing doubled."""
    with private_postgres(tmp_path / str(seed)) as (server, url):
        env = new_env(stack, database_url=url)
        with running_simulator(env) as simulator:
            settings = chaos_settings(env, db_retry_max_s=1.0)
            with processes(settings, tmp_path) as start:
                start()
                simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
                wait_for(produced_at_least(simulator, 0.3), 60, "the stream")
                server.stop()
                wait_for(produced_at_least(simulator, 1.0), 60, "the stream's end")
                server.start()
                check(env, simulator, settings, "database-outage", seed, time.monotonic())


@pytest.mark.parametrize("seed", seeds("broker-restart"))
def test_broker_restart(stack: Stack, tmp_path: Path, seed: int) -> None:
    """The broker restarts while the processor consumes and reports."""
    broker = KafkaBroker(tmp_path / f"kafka-{seed}", stack.home.parent / "cache")
    broker.start()
    try:
        env = new_env(stack, bootstrap=broker.bootstrap)
        with running_simulator(env) as simulator:
            settings = chaos_settings(env)
            with processes(settings, tmp_path) as start:
                start()
                simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
                wait_for(produced_at_least(simulator, 0.4), 60, "the stream")
                broker.stop()
                broker.start()
                check(env, simulator, settings, "broker-restart", seed, time.monotonic())
    finally:
        broker.stop()


@pytest.mark.parametrize("seed", seeds("scale-out"))
def test_scale_out_with_joins_leaves_and_kills(stack: Stack, tmp_path: Path, seed: int) -> None:
    """Three instances in one group; one joins late, one leaves, one is killed: no loss, no
    double effect."""
    env = new_env(stack)
    with running_simulator(env) as simulator:
        settings = chaos_settings(env, batch_size=20)
        with processes(settings, tmp_path) as start:
            first, second = start(), start()
            simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
            wait_for(produced_at_least(simulator, 0.25), 60, "the stream")
            third = start()
            wait_for(produced_at_least(simulator, 0.5), 60, "the stream")
            first.kill()
            wait_for(produced_at_least(simulator, 0.75), 60, "the stream")
            assert second.stop(timeout_s=60) == 0
            check(env, simulator, settings, "scale-out", seed, time.monotonic())
            assert third.running()


@pytest.mark.parametrize("seed", seeds("poison"))
def test_poison_records_are_kept_and_block_nothing(stack: Stack, tmp_path: Path, seed: int) -> None:
    """Huge, deeply nested, non-UTF-8 records and text the database cannot hold, amid a normal
    stream, are each kept as `other`."""
    env = new_env(stack)
    with running_simulator(env) as simulator:
        settings = chaos_settings(env)
        poison = [
            b'{"payment_id": "huge", "pad": "' + b"x" * 3_000_000 + b'"}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"payment_id": "\xc3\x28"}',
            b'{"payment_id": "big", "account_id": 1, "payment_type": "offline",'
            b' "credit_card": "", "amount": 123456789012345678901234567890}',
            # PostgreSQL text cannot hold U+0000: once a crash loop of the whole intake.
            b'{"payment_id": "nul\\u0000id", "account_id": 1, "payment_type": "offline",'
            b' "credit_card": "", "amount": 5}',
            b'\xef\xbb\xbf{"payment_id": "bom"}',
            b'{"payment_id": "\\ud800", "amount": 1}',
        ]
        producer = Producer({"bootstrap.servers": env.bootstrap, "message.max.bytes": 10_000_000})
        for value in poison:  # first in partition 0: offsets 0 … len(poison) - 1
            producer.produce(env.offline_topic, value, partition=0)
        assert producer.flush(10) == 0
        with processes(settings, tmp_path) as start:
            start()
            simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=0)
            started = time.monotonic()
            wait_for(lambda: settled(env, simulator, settings), 120, "poison to settle")
            kept = env.query(
                'SELECT "offset", raw FROM paystream.kept_records WHERE topic = %s'
                ' AND "partition" = 0 AND "offset" < %s AND error_type = \'other\''
                " AND reason IN ('malformed', 'invalid') ORDER BY 1",
                (env.offline_topic, len(poison)),
            )
            assert list(enumerate(poison)) == kept
            report = reconcile_now(env, simulator, settings)
            # The poison records are outside the ledger: the oracle covers the rest.
            report.records += len(poison)
            record("poison", seed, report, time.monotonic() - started)
            assert report.ok, report.problems


@pytest.mark.parametrize("seed", seeds("replay-crash"))
def test_kill_9_during_replay(stack: Stack, tmp_path: Path, seed: int) -> None:
    """`paystream replay` killed mid-way and run again stores each payment exactly once and
    resolves every kept record."""
    rng = random.Random(seed)
    env = new_env(stack)
    with running_simulator(env) as simulator:
        settings = chaos_settings(env)
        accounts = rng.sample(range(3000, 9000), 300)
        producer = Producer({"bootstrap.servers": env.bootstrap})
        for i, account in enumerate(accounts):
            document = {
                "payment_id": f"r{seed}-{i}",
                "account_id": account,
                "payment_type": "offline",
                "credit_card": "",
                "amount": i + 1,
            }
            producer.produce(env.offline_topic, orjson.dumps(document))
        assert 0 == producer.flush(10)
        with processes(settings, tmp_path) as start:
            start()
            wait_for(lambda: kept_count(env) == len(accounts), 60, "the unknown accounts kept")
        for account in accounts:
            env.execute(
                "INSERT INTO accounts (account_id, email) VALUES (%s, %s)",
                (account, f"a{account}@example.com"),
            )
        started = time.monotonic()
        replay_cmd = [sys.executable, "-m", "paystream", "replay", "--batch", "5"]
        with subprocess.Popen(
            replay_cmd,
            env=settings_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as victim:
            wait_for(lambda: resolved_count(env) > 0, 60, "replay to make progress")
            victim.kill()
        assert resolved_count(env) < len(accounts)
        again = subprocess.run(
            replay_cmd, env=settings_env(settings), capture_output=True, text=True, check=False
        )
        assert 0 == again.returncode, again.stderr
        assert [(len(accounts),)] == env.query("SELECT count(*) FROM payments")
        assert len(accounts) == resolved_count(env)
        bad_dates = env.query(
            "SELECT count(*) FROM accounts a WHERE a.last_payment_date IS DISTINCT FROM"
            " (SELECT max(created_on) FROM payments p WHERE p.account_id = a.account_id)"
        )
        assert [(0,)] == bad_dates
        chaos_report.ROUNDS.append(
            {
                "scenario": "replay-crash",
                "seed": seed,
                "records": len(accounts),
                "lost": 0,
                "doubled": 0,
                "duplicate_reports": max(0, len(simulator.logs()) - len(accounts)),
                "recover_s": round(time.monotonic() - started, 2),
                "noticed_s": None,
                "problems": [],
            }
        )


def kept_count(env: Env) -> int:
    try:
        return int(env.query("SELECT count(*) FROM paystream.kept_records")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0  # the processor has not created its tables yet


def resolved_count(env: Env) -> int:
    return int(env.query("SELECT count(resolved_at) FROM paystream.kept_records")[0][0])
