"""The database owns the stream position: a database that comes back older than Kafka's
committed offsets (restored from a backup, failed over with commits missing) is filled again
from Kafka, and records that left Kafka unread are kept as a gap, never skipped in silence. On
real servers: a PostgreSQL of the test's own, backed up with pg_basebackup and restored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY

from paystream import store
from paystream_tooling.devenv.postgres import EmbeddedPostgres
from paystream_tooling.devenv.stack import Stack
from tests.conftest import (
    Env,
    async_wait_for,
    at_hosts,
    caught_up,
    new_env,
    private_postgres,
    processor,
    produce,
    running_simulator,
    streaming_standby,
    unreported,
)

pytestmark = pytest.mark.chaos


def _produce(env: Env, first: int, count: int, *, partition: int | None = None) -> None:
    """Offline payments first … first + count - 1 (every tenth an invalid one, kept)."""
    payments = (
        {
            "payment_id": f"p-{i}",
            "account_id": 1 + i % 2000,
            "payment_type": "offline",
            "credit_card": "",
            "amount": -1 if i % 10 == 0 else 1 + i,
        }
        for i in range(first, first + count)
    )
    produce(env, env.offline_topic, ((orjson.dumps(p), partition) for p in payments))


def _outcomes(env: Env) -> tuple[int, int, int]:
    """Stored payments, kept records and kept records reported."""
    ((stored,),) = env.query("SELECT count(*) FROM payments")
    ((kept, reported),) = env.query(
        "SELECT count(*), count(reported_at) FROM paystream.kept_records"
    )
    return stored, kept, reported


def _rewinds(topic: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "paystream_position_rewinds_total", {"topic": topic, "cause": "database_behind"}
        )
        or 0.0
    )


async def _until_done(env: Env, settings: Any, stored: int, kept: int) -> None:
    await async_wait_for(lambda: caught_up(env, settings), 90, "offsets at the end")
    await async_wait_for(lambda: _outcomes(env)[:2] == (stored, kept), 90, "every outcome")
    await async_wait_for(lambda: unreported(env) == 0, 90, "every report")


@pytest.mark.parametrize("running", [True, False], ids=["while-running", "then-restarted"])
async def test_a_database_restored_from_a_backup_is_filled_again_from_kafka(
    stack: Stack, tmp_path: Path, running: bool
) -> None:
    """A base backup taken mid-stream, the server crashed later and brought back from it: every
    payment and kept record written since the backup is gone from the database, though Kafka's
    committed offsets are past them. Whether the processor kept running (its pool reconnects)
    or was restarted, it reads them again from the database's position: 0 lost, 0 doubled,
    every kept record listed again."""
    with private_postgres(tmp_path) as (server, url):
        env = new_env(stack, database_url=url)
        with running_simulator(env):
            settings = env.settings(batch_size=50)
            before = _rewinds(env.offline_topic)
            async with processor(settings):
                _produce(env, 0, 300)
                await _until_done(env, settings, 270, 30)
                await asyncio.to_thread(server.base_backup, tmp_path / "backup")
                _produce(env, 300, 300)
                await _until_done(env, settings, 540, 60)
                server.kill()
                await asyncio.to_thread(server.restore, tmp_path / "backup")
                if running:
                    await asyncio.to_thread(server.start)
                    assert (270, 30) == _outcomes(env)[:2]  # what the backup held
                    await _until_done(env, settings, 540, 60)
            if not running:
                await asyncio.to_thread(server.start)
                assert (270, 30) == _outcomes(env)[:2]
                async with processor(settings):
                    await _until_done(env, settings, 540, 60)
            assert _rewinds(env.offline_topic) > before
            ids = env.query("SELECT payment_id FROM payments")
            assert len(ids) == len(set(ids)) == 540
            assert [(0,)] == env.query(
                "SELECT count(*) FROM accounts a WHERE last_payment_date IS DISTINCT FROM"
                " (SELECT max(created_on) FROM payments p WHERE p.account_id = a.account_id)"
            )


def _bounds(env: Env, partition: int) -> tuple[int, int]:
    from confluent_kafka import Consumer

    reader = Consumer({"bootstrap.servers": env.bootstrap, "group.id": f"b-{env.name}"})
    try:
        low, high = reader.get_watermark_offsets(
            TopicPartition(env.offline_topic, partition), timeout=10, cached=False
        )
        return int(low), int(high)
    finally:
        reader.close()


@pytest.mark.parametrize("protocol", ["consumer", "classic"])
async def test_records_deleted_unread_are_kept_as_a_gap_and_reported_once(
    env: Env, protocol: str
) -> None:
    """The processors stopped, more records produced, then deleted from Kafka before any
    processor read them: on restart the missing range is kept (reason `expired`, its first and
    last offsets), reported once, counted; the records after it are stored. Aborted transactions
    on another partition leave offsets without records: those are no gap. (The fetch finds the
    position gone from the log, and the partition is assigned again past the gap: incrementally
    under KIP-848, the whole assignment anew under the classic protocol.)"""
    with running_simulator(env) as simulator:
        settings = env.settings(group_protocol=protocol)
        _produce(env, 0, 10, partition=0)
        transactional = Producer(
            {"bootstrap.servers": env.bootstrap, "transactional.id": f"tx-{env.name}"}
        )
        transactional.init_transactions(10)
        for n, commit in enumerate((False, True, False, True)):
            transactional.begin_transaction()
            for i in range(5):
                payment = {
                    "payment_id": f"tx-{n}-{i}",
                    "account_id": 7,
                    "payment_type": "offline",
                    "credit_card": "",
                    "amount": 3,
                }
                transactional.produce(env.offline_topic, orjson.dumps(payment), partition=1)
            transactional.flush(10)  # an abort drops what is still unsent: send it, then abort
            (transactional.commit_transaction if commit else transactional.abort_transaction)(10)
        async with processor(settings):
            await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        _produce(env, 10, 40, partition=0)
        admin = AdminClient({"bootstrap.servers": env.bootstrap})
        (deleted,) = admin.delete_records([TopicPartition(env.offline_topic, 0, 30)]).values()
        deleted.result(timeout=30)
        assert (30, 50) == _bounds(env, 0)
        async with processor(settings):
            await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
            await async_wait_for(lambda: unreported(env) == 0, 60, "every report")
        gaps = env.query(
            'SELECT "partition", "offset", last_offset, error_type, raw, payment_id, description'
            " FROM paystream.kept_records WHERE reason = 'expired'"
        )
        assert 1 == len(gaps)
        ((partition, first, last, error_type, raw, payment_id, description),) = gaps
        assert (0, 10, 29, "other", None, None) == (
            partition,
            first,
            last,
            error_type,
            raw,
            payment_id,
        )
        assert f"20 records of {env.offline_topic}/0 (offsets 10 to 29)" in description
        reports = [r for r in simulator.logs() if r["error_description"] == description]
        assert [(None, "other")] == [(r["payment_id"], r["error_type"]) for r in reports]
        # Stored: 9 valid of the first ten, 18 of offsets 30-49, 10 committed in transactions.
        assert [(9 + 18 + 10,)] == env.query("SELECT count(*) FROM payments")
        positions = await _recorded(env)
        assert _bounds(env, 0)[1] == positions[(env.offline_topic, 0)]
        # Past every transaction marker and aborted record.
        assert _bounds(env, 1)[1] == positions[(env.offline_topic, 1)]


async def _recorded(env: Env) -> dict[tuple[str, int], int]:
    """The database's position of each partition (its done spans folded in)."""
    keys = [(topic, p) for topic in (env.online_topic, env.offline_topic) for p in range(3)]
    conn = await psycopg.AsyncConnection.connect(env.database_url)
    async with conn, conn.transaction():
        return await store.fold_positions(conn, keys)


def _receiving(standby: EmbeddedPostgres) -> bool:
    with psycopg.connect(standby.url(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_wal_receiver").fetchone()
    return bool(row and row[0])


def _replicated(primary_url: str) -> bool:
    """The standby has replayed everything the primary wrote."""
    with psycopg.connect(primary_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT bool_and(replay_lsn >= pg_current_wal_lsn()) FROM pg_stat_replication"
        ).fetchone()
    return bool(row and row[0])


async def test_a_failover_to_a_standby_that_missed_commits_loses_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """A primary with a streaming standby, the processor given both in a multi-host URL
    (target_session_attrs=read-write); the standby's replication held back, the primary killed
    under load and the standby promoted — an asynchronous failover that loses the last
    commits. The processor, never restarted, reconnects to the new primary, notices it is behind
    and reads the lost records again: 0 lost, 0 doubled."""
    with (
        private_postgres(tmp_path) as (primary, url),
        streaming_standby(primary, tmp_path / "standby") as standby,
    ):
        both = at_hosts(url, primary, standby, target_session_attrs="read-write")
        env = new_env(stack, database_url=both)
        with running_simulator(env):
            settings = env.settings(batch_size=50)
            before = _rewinds(env.offline_topic)
            async with processor(settings):
                _produce(env, 0, 300)
                await _until_done(env, settings, 270, 30)
                await async_wait_for(lambda: _replicated(primary.url()), 30, "the standby")
                with psycopg.connect(standby.url(), autocommit=True) as conn:
                    conn.execute("ALTER SYSTEM SET primary_conninfo = ''")  # held back
                    conn.execute("SELECT pg_reload_conf()")
                await async_wait_for(lambda: not _receiving(standby), 30, "the hold-back")
                _produce(env, 300, 300)
                await _until_done(env, settings, 540, 60)
                primary.kill()
                with psycopg.connect(standby.url(), autocommit=True) as conn:
                    conn.execute("SELECT pg_promote(true, 30)")
                await _until_done(env, settings, 540, 60)
            assert _rewinds(env.offline_topic) > before
            ids = env.query("SELECT payment_id FROM payments")
            assert len(ids) == len(set(ids)) == 540
