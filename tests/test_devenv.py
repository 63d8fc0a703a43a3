"""The local infrastructure is real: a Kafka broker and PostgreSQL with the original schema."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from paystream.app import open_pool
from paystream.config import Settings
from paystream.errors import ConfigurationError, DevenvError
from paystream_tooling.devenv.processes import ensure_port_free
from paystream_tooling.devenv.stack import Stack
from tests.conftest import Env

EXPECTED_COLUMNS = {
    ("accounts", "account_id", "integer", None, "NO"),
    ("accounts", "name", "character varying", 150, "YES"),
    ("accounts", "email", "character varying", 100, "NO"),
    ("accounts", "birthdate", "date", None, "YES"),
    ("accounts", "last_payment_date", "timestamp without time zone", None, "YES"),
    ("accounts", "created_on", "timestamp without time zone", None, "YES"),
    ("payments", "payment_id", "character varying", 100, "NO"),
    ("payments", "account_id", "integer", None, "YES"),
    ("payments", "payment_type", "character varying", 150, "NO"),
    ("payments", "credit_card", "character varying", 100, "YES"),
    ("payments", "amount", "numeric", None, "NO"),
    ("payments", "created_on", "timestamp without time zone", None, "YES"),
}


def test_kafka_round_trip_on_both_topics(env: Env) -> None:
    """A record produced to each topic is consumed back unchanged from the real broker."""
    producer = Producer({"bootstrap.servers": env.stack.kafka.bootstrap})
    for topic in (env.online_topic, env.offline_topic):
        producer.produce(topic, f"hello {topic}".encode())
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": env.stack.kafka.bootstrap,
            "group.id": f"roundtrip-{env.name}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([env.online_topic, env.offline_topic])
    seen: dict[str | None, bytes | None] = {}
    try:
        for _ in range(200):
            message = consumer.poll(0.1)
            if message is not None and message.error() is None:
                seen[message.topic()] = message.value()
            if len(seen) == 2:
                break
    finally:
        consumer.close()
    assert {
        env.online_topic: f"hello {env.online_topic}".encode(),
        env.offline_topic: f"hello {env.offline_topic}".encode(),
    } == seen


def test_topics_have_the_configured_partitions(env: Env) -> None:
    """Topics are created with the stack's partition count (3 by default)."""
    from confluent_kafka.admin import AdminClient

    topics = (
        AdminClient({"bootstrap.servers": env.stack.kafka.bootstrap}).list_topics(timeout=10).topics
    )
    assert len(topics[env.online_topic].partitions) == 3
    assert len(topics[env.offline_topic].partitions) == 3


def test_schema_is_exactly_the_original(env: Env) -> None:
    """The two tables match the retailer's original schema column for column."""
    rows = env.query(
        """
        SELECT table_name, column_name, data_type, character_maximum_length, is_nullable
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name IN ('accounts', 'payments')
        """
    )
    assert set(rows) == EXPECTED_COLUMNS
    fks = env.query(
        """
        SELECT tc.table_name, ccu.table_name FROM information_schema.table_constraints tc
        JOIN information_schema.constraint_column_usage ccu USING (constraint_name)
        WHERE tc.constraint_type = 'FOREIGN KEY' AND tc.table_schema = 'public'
        """
    )
    assert fks == [("payments", "accounts")]


def test_two_thousand_deterministic_accounts(env: Env) -> None:
    """Accounts 1..2000 exist with unique emails and no last payment date yet."""
    count, low, high, emails, dated = env.query(
        "SELECT count(*), min(account_id), max(account_id), count(DISTINCT email),"
        " count(last_payment_date) FROM accounts"
    )[0]
    assert (count, low, high, emails, dated) == (2000, 1, 2000, 2000, 0)
    first = env.query("SELECT name, email FROM accounts WHERE account_id = 1")[0]
    again = env.stack.fresh_database(f"again_{env.name}")
    import psycopg

    with psycopg.connect(again) as conn:
        assert (
            first
            == conn.execute("SELECT name, email FROM accounts WHERE account_id = 1").fetchone()
        )


def test_taken_port_fails_fast_with_one_sentence() -> None:
    """Starting on a port in use names the port and what to do."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(DevenvError, match=f"Port {port} on 127.0.0.1 is taken"):
            ensure_port_free("127.0.0.1", port, "the simulator", "pass another port")


def test_missing_java_fails_fast(tmp_path: Path) -> None:
    """Without java on PATH the broker refuses to start and says how to fix it."""
    code = (
        "from pathlib import Path; from paystream_tooling.devenv.kafka import KafkaBroker;"
        f"KafkaBroker(Path({str(tmp_path)!r}) / 'k', Path({str(tmp_path)!r}) / 'c').start()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PATH": "/nonexistent"}, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "'mvn' is not on PATH" in result.stderr or "'java' is not on PATH" in result.stderr


def test_unreachable_database_fails_fast() -> None:
    """A database URL nobody answers at gives one sentence naming it (without the password)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(database_url=f"postgresql://tech:secret@127.0.0.1:{port}/payments")

    async def open_it() -> None:
        async with open_pool(settings):
            pass

    with pytest.raises(ConfigurationError) as info:
        asyncio.run(open_it())
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "secret" not in str(info.value)


def test_stack_stops_without_leaving_processes(tmp_path: Path, stack: Stack) -> None:
    """A second stack starts on free ports and, once stopped, leaves no broker or server behind."""
    home = tmp_path / "home"
    (tmp_path / "cache").symlink_to(stack.home.parent / "cache")
    second = Stack(home)
    with second:
        pids = [second.kafka._process.pid, second.postgres._process.pid]  # type: ignore[union-attr]
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_children_die_with_their_parent(tmp_path: Path) -> None:
    """kill -9 of the process that started PostgreSQL leaves no server behind."""
    code = (
        "import sys, time; from pathlib import Path;"
        "from paystream_tooling.devenv.postgres import EmbeddedPostgres;"
        f"pg = EmbeddedPostgres(Path({str(tmp_path)!r}) / 'pg'); pg.start();"
        "print(pg._process.pid, flush=True); time.sleep(600)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{child_pid}").exists()
        parent.kill()
    from tests.conftest import wait_for

    def gone() -> bool:
        status = Path(f"/proc/{child_pid}/status")
        return not status.exists() or "zombie" in status.read_text()

    wait_for(gone, 15, "the orphaned server to exit")
