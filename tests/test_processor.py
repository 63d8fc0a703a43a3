"""The processor end to end, through the real broker, database and simulator (what happens to each
payment, and the guarantees of the README)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from uuid import uuid4

import orjson
import pytest
from confluent_kafka import Producer

from paystream import store
from paystream.app import open_pool, topic_types
from paystream.config import Settings
from paystream.consumer import Membership
from paystream.gateway import CircuitBreaker, Gateway
from paystream.kafka import KafkaConsumer
from paystream.model import Record
from paystream.pipeline import Pipeline
from paystream.thirdparty import third_party_client
from paystream_tooling.simulator.streams import is_declined
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    caught_up,
    cli,
    processor,
    reconcile_now,
    settle,
    unreported,
)


async def test_original_stream_each_payment_stored_once(
    env: Env, simulator: SimulatorClient
) -> None:
    """The original stream: each valid payment stored once with its fields, every duplicate and
    decline kept and reported, account dates equal to the newest stored payment."""
    settings = env.settings()
    simulator.start(records=1038, seed=11)
    await settle(env, simulator, settings)
    report = reconcile_now(env, simulator, settings)
    assert report.problems == []
    assert report.ok

    ledger = simulator.ledger()
    payments = {e["payment_id"]: e for e in ledger}
    declined = {
        pid
        for pid, e in payments.items()
        if e["topic"] == env.online_topic and is_declined(pid, 0.1)
    }
    valid = payments.keys() - declined
    assert len(valid) == report.stored
    assert len(ledger) - len(valid) == sum(report.kept.values())
    declined_records = sum(1 for e in ledger if e["payment_id"] in declined)
    assert declined_records == report.kept["network"]
    assert len(ledger) - len(valid) - declined_records == report.kept["other"]
    assert report.duplicate_reports == 0

    stored = dict(env.query("SELECT payment_id, amount FROM payments"))
    for pid in valid:
        sent = orjson.loads(base64.b64decode(payments[pid]["value_b64"]))
        assert sent["amount"] == stored[pid]


async def test_hostile_stream_each_outcome_with_its_error_type(
    env: Env, simulator: SimulatorClient
) -> None:
    """Each row of the outcome table, from the hostile stream, gets the right type and reason."""
    settings = env.settings()
    simulator.start(records=1200, seed=12, profile="hostile")
    await settle(env, simulator, settings)
    report = reconcile_now(env, simulator, settings)
    assert report.problems == []

    reasons = {
        (t, p, o): reason
        for t, p, o, reason in env.query(
            'SELECT topic, "partition", "offset", reason FROM paystream.kept_records'
        )
    }
    by_kind: dict[str, Counter[str]] = {}
    for entry in simulator.ledger():
        key = (entry["topic"], entry["partition"], entry["offset"])
        by_kind.setdefault(entry["kind"], Counter())[reasons.get(key, "stored")] += 1
    expected = {
        "malformed-json": {"malformed"},
        "not-utf8": {"malformed"},
        "empty": {"malformed"},
        "not-an-object": {"malformed"},
        "missing-field": {"invalid"},
        "mistyped-field": {"invalid"},
        "non-positive-amount": {"invalid"},
        "fractional-amount": {"invalid"},
        "unknown-payment-type": {"invalid"},
        "overflowing-account": {"invalid"},
        "nul-in-id": {"invalid"},
        "control-in-id": {"invalid"},
        "byte-order-mark": {"malformed"},
        "lone-surrogate": {"malformed"},
        "amount-beyond-64-bits": {"invalid"},
        "duplicate-keys": {"invalid"},
        "wrong-topic": {"wrong_topic"},
        "unknown-account": {"unknown_account", "declined"},
        "conflicting-content": {"stored", "duplicate", "declined"},
        "injection-looking": {"stored", "duplicate", "declined"},
    }
    for kind, allowed in expected.items():
        assert set(by_kind[kind]) <= allowed, kind
    assert by_kind["unknown-account"]["unknown_account"] > 0
    assert by_kind["conflicting-content"]["duplicate"] > 0
    descriptions = [d for (d,) in env.query("SELECT description FROM paystream.kept_records")]
    assert any("different amount" in d for d in descriptions)


async def test_record_redelivered_after_crash_before_offset_commit(
    env: Env, simulator: SimulatorClient
) -> None:
    """A crash between the database commit and the offset commit (before any stamping pass,
    too): on restart every record is redelivered, and that changes nothing and reports nothing
    twice; the stamps the first run left due are applied."""
    settings = env.settings()
    simulator.start(records=300, seed=13)
    simulator.wait_produced()

    # The first run processes everything but "crashes" before committing any offset.
    records = await _all_records(env, settings, 300)
    async with open_pool(settings) as pool, third_party_client(50) as client:
        gateway = Gateway(
            client, simulator.url, max_in_flight=50, timeout_s=2, attempts=2, budget_s=3
        )
        first = await Pipeline(pool, gateway, topic_types(settings)).process(records)
    assert first.stored + first.kept == 300
    before = env.query("SELECT payment_id, created_on FROM payments ORDER BY 1")
    assert env.query("SELECT count(*) FROM accounts WHERE last_payment_date IS NOT NULL") == [(0,)]

    totals = await settle(env, simulator, settings)
    assert totals.redelivered == 300
    assert totals.stored == 0
    assert before == env.query("SELECT payment_id, created_on FROM payments ORDER BY 1")
    assert env.query(
        "SELECT count(*) FROM accounts a WHERE last_payment_date IS DISTINCT FROM"
        " (SELECT max(created_on) FROM payments p WHERE p.account_id = a.account_id)"
    ) == [(0,)]
    report = reconcile_now(env, simulator, settings)
    assert report.problems == []
    assert report.duplicate_reports == 0
    assert first.kept == len(simulator.logs())


async def _all_records(env: Env, settings: Settings, count: int) -> list[Record]:
    """Every record of the test's topics, read once by a consumer that commits nothing."""
    membership = Membership()
    kafka = KafkaConsumer(
        settings.kafka_client(),
        settings.group_id,
        [env.online_topic, env.offline_topic],
        listener=membership.apply,
    )
    await kafka.start()
    records: list[Record] = []
    try:
        for _ in range(200):
            records += (await kafka.consume(500, 0.2)).records
            if membership.unplaced:  # assigned paused: read every partition from its start
                await kafka.place(dict.fromkeys(membership.unplaced, 0), membership.generation)
                membership.unplaced.clear()
            if len(records) >= count:
                break
    finally:
        await kafka.close()
    assert len(records) == count
    return records


async def test_a_partition_changes_writer_only_between_transactions(env: Env) -> None:
    """The transactions of one writer hold a partition side by side; a new writer takes it over
    only once they have all ended, and from then on the old writer no longer holds it."""
    settings = env.settings()
    key = (env.online_topic, 0)
    old, new = uuid4(), uuid4()
    async with (
        open_pool(settings) as pool,
        pool.connection() as a,
        pool.connection() as b,
        pool.connection() as c,
    ):
        async with a.transaction():
            await store.take_partitions(a, old, [key])

        async def take_over() -> None:
            async with c.transaction():
                await store.take_partitions(c, new, [key])

        def taker_waits_for_a_lock() -> bool:
            rows = env.query(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                (c.info.backend_pid,),
            )
            return rows == [("Lock",)]

        async with a.transaction(), b.transaction():
            assert await store.hold_partitions(a, old, [key]) == set()
            assert await store.hold_partitions(b, old, [key]) == set()
            taking = asyncio.create_task(take_over())
            await async_wait_for(taker_waits_for_a_lock, 30, "the take-over to wait")
            assert not taking.done()
        await asyncio.wait_for(taking, 30)
        async with a.transaction():
            assert await store.hold_partitions(a, old, [key]) == {key}
            assert await store.hold_partitions(a, new, [key]) == set()


async def test_two_owners_of_a_partition_at_once_decide_each_record_once(
    env: Env, simulator: SimulatorClient
) -> None:
    """Two owners of the same partitions (a rebalance's overlap) process the same records at the
    same time, against a gateway whose answer changes from call to call (half its calls fail):
    each record still gets one outcome, from one of them, never stored by one and kept by the
    other."""
    settings = env.settings()
    simulator.faults(error_rate=0.5)
    simulator.start(records=300, seed=17)
    simulator.wait_produced()
    records = await _all_records(env, settings, 300)
    async with open_pool(settings) as pool, third_party_client(100) as client:

        def owner() -> Pipeline:
            gateway = Gateway(
                client,
                simulator.url,
                max_in_flight=50,
                timeout_s=2,
                attempts=1,
                budget_s=3,
                breaker=CircuitBreaker(threshold=10_000),
            )
            return Pipeline(pool, gateway, topic_types(settings))

        first, second = await asyncio.gather(owner().process(records), owner().process(records))
    assert first.stored + first.kept + second.stored + second.kept == 300
    assert first.redelivered + second.redelivered == 300
    both = env.query(
        """
        SELECT count(*) FROM paystream.kept_records
        JOIN paystream.payment_origins USING (topic, "partition", "offset", kafka_ts)
        """
    )
    assert both == [(0,)]
    assert env.query("SELECT count(*) FROM payments") == [(first.stored + second.stored,)]


async def test_reprocessing_from_the_start_changes_nothing(
    env: Env, simulator: SimulatorClient
) -> None:
    """`paystream rebuild`, then a second consumer group, re-reading every record: nothing new is
    stored and nothing is reported again. (Without the rebuild the database's positions say
    everything is done: the new group reads nothing.)"""
    settings = env.settings()
    simulator.start(records=200, seed=14)
    await settle(env, simulator, settings)
    logs = len(simulator.logs())
    payments = env.query("SELECT * FROM payments ORDER BY 1")

    again = env.settings(group_id=f"again-{env.name}")
    assert 0 == (await settle(env, simulator, again)).redelivered
    rebuilt = cli(env, "rebuild", "--yes")
    assert 0 == rebuilt.returncode, rebuilt.stderr
    assert "6 partitions will be read again from their start (200 records)" in rebuilt.stdout
    totals = await settle(env, simulator, env.settings(group_id=f"rebuilt-{env.name}"))
    assert totals.redelivered == 200
    assert payments == env.query("SELECT * FROM payments ORDER BY 1")
    assert logs == len(simulator.logs())


async def test_log_outage_delays_reports_but_loses_none(
    env: Env, simulator: SimulatorClient
) -> None:
    """While the log service is down, reports wait in the outbox; when it returns, all arrive."""
    settings = env.settings()
    simulator.faults(log_outage=True)
    simulator.start(records=200, seed=15)
    async with processor(settings):
        await async_wait_for(lambda: simulator.status().get("done") is True, 60, "producer")
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        waiting = unreported(env)
        assert waiting > 0
        assert simulator.logs() == []
        simulator.faults(log_outage=False)
        await async_wait_for(lambda: unreported(env) == 0, 90, "the outbox to drain")
    report = reconcile_now(env, simulator, settings)
    assert report.problems == []
    assert waiting <= len(simulator.logs())


async def test_card_numbers_never_leave_the_payments_table(
    env: Env, simulator: SimulatorClient, caplog: pytest.LogCaptureFixture
) -> None:
    """No card number appears in a log line, an error description, a report or the CLI listing."""
    caplog.set_level(logging.DEBUG)
    settings = env.settings()
    simulator.start(records=400, seed=16, profile="hostile")
    await settle(env, simulator, settings)
    cards = {
        orjson.loads(base64.b64decode(e["value_b64"])).get("credit_card")
        for e in simulator.ledger()
        if e["kind"] in ("valid", "duplicate")
    } - {"", None}
    assert len(cards) > 50

    import subprocess
    import sys

    listing = subprocess.run(  # noqa: ASYNC221 -- the CLI as a user runs it, after processing
        [sys.executable, "-m", "paystream", "errors", "--json", "--limit", "10000"],
        env={"PAYSTREAM_DATABASE_URL": env.database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    items = orjson.loads(listing)
    assert len(items) == sum(1 for _ in env.query("SELECT 1 FROM paystream.kept_records"))
    assert {
        "payment_id",
        "error_type",
        "topic",
        "partition",
        "offset",
        "error_description",
        "reported",
    } <= set(items[0])
    texts = {
        "logs": caplog.text,
        "listing": listing,
        "reports": orjson.dumps(simulator.logs()).decode(),
        "descriptions": " ".join(
            d for (d,) in env.query("SELECT description FROM paystream.kept_records")
        ),
    }
    for where, text in texts.items():
        leaked = [card for card in cards if card in text]
        assert leaked == [], where


async def test_a_record_the_database_refuses_is_isolated(
    env: Env, simulator: SimulatorClient
) -> None:
    """A constraint violation the codec cannot foresee is pinned to its record by bisection:
    that record is kept as `database_rejected`, the rest of its batch is stored, nothing retries
    forever."""
    env.execute("ALTER TABLE payments ADD CONSTRAINT small_amounts CHECK (amount < 1000)")
    documents = [
        {
            "payment_id": f"ok-{i}",
            "account_id": i + 1,
            "payment_type": "offline",
            "credit_card": "",
            "amount": 10,
        }
        for i in range(40)
    ]
    documents.insert(
        17,
        {
            "payment_id": "too-big",
            "account_id": 3,
            "payment_type": "offline",
            "credit_card": "",
            "amount": 5000,
        },
    )
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for document in documents:
        producer.produce(env.offline_topic, orjson.dumps(document), partition=0)
    assert 0 == producer.flush(10)
    settings = env.settings()
    async with processor(settings):
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        await async_wait_for(lambda: unreported(env) == 0, 60, "the report")
    assert [(40,)] == env.query("SELECT count(*) FROM payments")
    assert [("too-big", "database", "database_rejected")] == env.query(
        "SELECT payment_id, error_type, reason FROM paystream.kept_records"
    )
    assert [("too-big", "database")] == [
        (e["payment_id"], e["error_type"]) for e in simulator.logs()
    ]
