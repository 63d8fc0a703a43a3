"""The database on an operator's ordinary day, through the real processor: down when it starts,
turned read-only mid-stream, or never there. Each is waited for with readiness false and a line
in the log, or refused at once when waiting cannot help."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from paystream.app import run_processor
from paystream.config import Settings
from paystream.errors import ConfigurationError
from paystream.migrations import migrate
from paystream_tooling.devenv.kafka import create_topics, delete_topics
from paystream_tooling.devenv.processes import ChildProcess, free_port, spawn_processor
from paystream_tooling.devenv.stack import Stack
from tests.chaos import RATE, RECORDS, chaos_settings, check, produced_at_least
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    at_hosts,
    caught_up,
    cli,
    migrated,
    new_env,
    private_postgres,
    processor,
    produce,
    running_simulator,
    streaming_standby,
    unreported,
    wait_for,
    wait_http_status,
)


def _produce(env: Env, prefix: str, per_partition: Mapping[int | None, int]) -> None:
    """Offline payments `prefix-partition-i`, so many to each partition (None: any)."""
    payment = {"payment_type": "offline", "credit_card": "", "amount": 5}
    values = (
        (orjson.dumps({**payment, "payment_id": f"{prefix}-{p}-{i}", "account_id": 1 + i}), p)
        for p, count in per_partition.items()
        for i in range(count)
    )
    produce(env, env.offline_topic, values)


async def _ready(base: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(base + "/health/ready") as response:
        return await response.json()


async def _database_away(base: str) -> bool:
    """Whether the processor's readiness says its database is away (False: no answer yet)."""
    with contextlib.suppress(aiohttp.ClientError):
        return (await _ready(base))["checks"]["database"] is False
    return False


def _watched(stack: Stack, url: str, **settings: Any) -> tuple[Env, Settings, str]:
    """A test's env on the database at `url`, its processor's settings with the web server on a
    port of its own, and that server's base URL."""
    env = new_env(stack, database_url=url)
    port = free_port()
    return env, env.settings(web_port=port, **settings), f"http://127.0.0.1:{port}"


async def test_a_database_down_at_start_is_waited_for_not_ready_meanwhile(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A processor started while its database is down stays up, live and not ready, saying so
    every few seconds; once the server starts it migrates, becomes ready and stores what
    waited."""
    caplog.set_level(logging.WARNING, logger="paystream.app")
    with private_postgres(tmp_path) as (server, url):
        env, settings, base = _watched(stack, url)
        server.stop()
        _produce(env, "waited", {None: 30})
        async with processor(settings, serve_web=True):
            await wait_http_status(base + "/health/ready", 503)
            waiting = await _ready(base)
            assert (False, False) == (waiting["ready"], waiting["checks"]["database"])
            await wait_http_status(base + "/health/live", 200)

            def said_twice() -> bool:
                waiting = [r for r in caplog.records if "does not answer" in r.getMessage()]
                return len(waiting) >= 2

            await async_wait_for(said_twice, 30, "the waiting to be said")
            server.start()
            await wait_http_status(base + "/health/ready", 200, timeout_s=60)
            await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        assert [(30,)] == env.query(
            "SELECT count(*) FROM payments WHERE payment_id LIKE 'waited-%'"
        )


async def test_a_database_that_does_not_exist_stops_the_start_at_once(env: Env) -> None:
    """A server that answers and refuses us (here: no such database) is a setting to fix: the
    start fails in one sentence, without waiting."""
    url = env.database_url.rsplit("/", 1)[0] + "/no_such_database"
    stop = asyncio.Event()
    with pytest.raises(ConfigurationError, match="does not exist"):
        await asyncio.wait_for(
            run_processor(env.settings(database_url=url), stop, serve_web=False), 30
        )


async def test_a_database_turned_read_only_mid_stream_is_waited_for(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server turned read-only (as a demoted primary is) while payments arrive: nothing is
    kept or lost, readiness says the database is away and the log says why; once writes are
    taken again every payment is stored."""
    caplog.set_level(logging.WARNING, logger="paystream.consumer")
    with private_postgres(tmp_path) as (server, url):
        env, settings, base = _watched(stack, url, db_retry_max_s=0.5)
        admin = server.url()
        async with processor(settings, serve_web=True):
            await wait_http_status(base + "/health/ready", 200)
            _produce(env, "before", {None: 20})
            await async_wait_for(lambda: caught_up(env, settings), 60, "the first payments")
            _toggle_read_only(admin, True)
            _produce(env, "during", {None: 40})

            away = functools.partial(_database_away, base)
            await async_wait_for(away, 30, "readiness to say the database is away")
            await async_wait_for(
                lambda: any(
                    "ReadOnlySqlTransaction 25006" in r.getMessage() for r in caplog.records
                ),
                30,
                "the consumer to say why it waits",
            )
            assert [(0,)] == env.query("SELECT count(*) FROM paystream.kept_records")
            _toggle_read_only(admin, False)
            await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
            await wait_http_status(base + "/health/ready", 200)
        assert [(60,)] == env.query("SELECT count(*) FROM payments")
        assert [(0,)] == env.query("SELECT count(*) FROM paystream.kept_records")


def _toggle_read_only(admin_url: str, read_only: bool) -> None:
    """default_transaction_read_only for the whole server, reloaded: every session's next
    transaction is read-only, as on a standby or a demoted primary."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        if read_only:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")


async def test_a_topic_deleted_and_created_again_is_read_from_its_start(
    env: Env, simulator: SimulatorClient
) -> None:
    """The processors catch up and stop; both topics are deleted and created again under the
    same names; every partition is refilled past where its old log ended. Every payment of the
    new logs is stored: a position belongs to its topic's id, not to its offsets. The old log's
    records known unread (here: made known by moving one partition's seen end past its
    position) are kept as one `topic_recreated` gap, reported once."""
    first: dict[int | None, int] = {0: 12, 1: 9, 2: 15}
    _produce(env, "old", first)
    settings = env.settings()
    async with processor(settings):
        await async_wait_for(lambda: caught_up(env, settings), 60, "the old logs")
    # The old log of partition 1 seen to reach 4 records past what was processed.
    env.execute(
        'UPDATE paystream.positions SET seen_end = %s WHERE topic = %s AND "partition" = 1',
        (first[1] + 4, env.offline_topic),
    )
    topics = [env.online_topic, env.offline_topic]
    delete_topics(env.bootstrap, topics)
    create_topics(env.bootstrap, topics, env.stack.partitions)
    second: dict[int | None, int] = {p: count + 7 for p, count in first.items()}
    _produce(env, "new", second)
    async with processor(settings):
        await async_wait_for(lambda: caught_up(env, settings), 60, "the new logs")
        await async_wait_for(lambda: unreported(env) == 0, 60, "the gap's report")
    stored = env.query("SELECT count(*) FROM payments WHERE payment_id LIKE 'new-%'")
    assert [(sum(second.values()),)] == stored
    gaps = env.query(
        'SELECT "partition", "offset", last_offset, reason FROM paystream.kept_records'
    )
    assert [(1, 9, 12, "topic_recreated")] == gaps
    reports = [e for e in simulator.logs() if "deleted with its topic" in str(e)]
    assert 1 == len(reports)


async def test_a_reason_a_newer_version_wrote_is_listed_and_reported_raw(
    env: Env, simulator: SimulatorClient
) -> None:
    """A kept row whose reason this version does not know (a newer version beside it wrote it)
    is relayed to the log API and listed by `paystream errors`, its reason shown as it is."""
    settings = env.settings()
    async with processor(settings):
        await async_wait_for(lambda: migrated(env), 30, "the migrations")
        env.execute(
            'INSERT INTO paystream.kept_records (topic, "partition", "offset", kafka_ts, raw,'
            " payment_id, error_type, reason, description) VALUES (%s, 0, 0, 1, '{}',"
            " 'future-1', 'other', 'from_a_newer_version', 'kept by a newer version')",
            (env.offline_topic,),
        )
        await async_wait_for(lambda: unreported(env) == 0, 30, "its report")
    assert ["other"] == [e["error_type"] for e in simulator.logs() if e["payment_id"] == "future-1"]
    listed = await asyncio.to_thread(cli, env, "errors", "--jsonl")
    assert 0 == listed.returncode, listed.stderr
    assert '"reason":"from_a_newer_version"' in listed.stdout.replace(" ", "")


def _previous_version(folder: Path) -> Path:
    """The runtime as it was before the newest migration, from this repository's history: the
    `src` of the parent of the commit that added it."""
    repo = Path(__file__).resolve().parent.parent
    newest = sorted((repo / "src" / "paystream" / "sql").glob("[0-9]*.sql"))[-1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        added = git("log", "--diff-filter=A", "--format=%H", "-1", "--", str(newest))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no git history to build the previous version from: {exc}")
    if not added:
        pytest.skip(f"{newest.name} is not committed yet: no previous version to run")
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", f"{added}^", "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def test_the_previous_version_runs_beside_this_one(stack: Stack, tmp_path: Path) -> None:
    """N-1 beside N: the code from before the newest migration and today's, in one group on one
    database, while records flow; one of each is killed (-9) mid-stream and started again.
    Nothing is lost or doubled, and each version took partitions in the group."""
    old_src = _previous_version(tmp_path)
    env = new_env(stack)
    seed = 37
    with running_simulator(env) as simulator:
        settings = chaos_settings(env)
        logs = tmp_path / "logs"
        logs.mkdir()
        started: list[ChildProcess] = []

        def start(version: str) -> ChildProcess:
            wrap = (lambda argv: argv) if version == "new" else _with_path(old_src)
            proc = spawn_processor(settings, logs / f"{version}-{len(started)}.log", wrap=wrap)
            started.append(proc)
            return proc

        try:
            new, old = start("new"), start("old")
            simulator.start(records=RECORDS, seed=seed, profile="original", rate=RATE)
            wait_for(produced_at_least(simulator, 0.3), 60, "30 % of the stream")
            new.kill()
            new = start("new")
            wait_for(produced_at_least(simulator, 0.6), 60, "60 % of the stream")
            old.kill()
            old = start("old")
            check(env, simulator, settings, "previous-version-beside", seed, time.monotonic())
        finally:
            for proc in started:
                if proc.running():
                    proc.kill()
    for version in ("new", "old"):
        said = "".join(p.read_text() for p in logs.glob(f"{version}-*.log"))
        assert "assigned [" in said, f"the {version} version never took partitions"


def _with_path(src: Path) -> Any:
    return lambda argv: ["env", f"PYTHONPATH={src}", *argv]


async def test_a_lock_held_on_accounts_is_waited_out(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator holds ACCESS EXCLUSIVE on `accounts` for longer than the lock timeout while
    payments arrive: the blocked batches fail on the lock (LockNotAvailable), wait and are
    retried; once it is released every payment is stored. How long settling took after the
    release is printed, not asserted."""
    caplog.set_level(logging.WARNING, logger="paystream.consumer")
    settings = env.settings(db_retry_max_s=0.5)
    async with processor(settings):
        await async_wait_for(lambda: migrated(env), 30, "the migrations")
        with env.connect() as holder:
            holder.autocommit = False
            holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
            _produce(env, "locked", {None: 30})

            def blocked_by_the_lock() -> bool:
                waiting = env.query(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
                return bool(waiting[0][0])

            await async_wait_for(blocked_by_the_lock, 30, "a batch to wait on the lock")

            def timed_out() -> bool:
                return any("LockNotAvailable 55P03" in r.getMessage() for r in caplog.records)

            await async_wait_for(timed_out, 30, "the lock timeout to end a wait")
            holder.rollback()
        released = time.monotonic()
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        print(f"lock-on-accounts: settled {time.monotonic() - released:.1f} s after the release")
    stored = env.query("SELECT count(*) FROM payments WHERE payment_id LIKE 'locked-%'")
    assert [(30,)] == stored


async def test_topics_grown_mid_stream_are_read_in_full(env: Env) -> None:
    """Both topics grown from 3 partitions to 6 while payments flow: the new partitions are
    assigned and read from their start, and every payment is stored. How long settling took
    after the last record is printed, not asserted."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # as devenv's NewTopic
        AdminClient,
        NewPartitions,
    )

    settings = env.settings()
    async with processor(settings):
        _produce(env, "before", {0: 10, 1: 10, 2: 10})
        await async_wait_for(lambda: caught_up(env, settings), 60, "the first payments")
        admin = AdminClient({"bootstrap.servers": env.bootstrap})
        grown = admin.create_partitions(
            [NewPartitions(topic, 6) for topic in (env.online_topic, env.offline_topic)]
        )
        for future in grown.values():
            future.result(timeout=30)
        _produce(env, "after", dict.fromkeys(range(6), 8))
        produced = time.monotonic()
        await async_wait_for(lambda: caught_up(env, settings), 120, "offsets at the end")
        print(
            f"partitions-grown: settled {time.monotonic() - produced:.1f} s after the last record"
        )
    stored = env.query("SELECT count(*) FROM payments WHERE payment_id LIKE 'after-%'")
    assert [(48,)] == stored


async def test_a_url_pointing_at_a_standby_is_waited_on_until_it_is_promoted(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """During a failover the processor's URL names a real streaming standby: it starts, says
    the server is read-only, stays not ready and keeps nothing; once the standby is promoted
    every payment that waited is stored."""
    caplog.set_level(logging.WARNING)
    with private_postgres(tmp_path) as (primary, url):
        async with await psycopg.AsyncConnection.connect(url) as first:
            await migrate(first)
        with streaming_standby(primary, tmp_path / "standby") as standby:
            primary.stop()  # the old primary is gone; the URL names the standby
            at_standby = at_hosts(url, standby)
            env, settings, base = _watched(stack, at_standby, db_retry_max_s=0.5)
            async with processor(settings, serve_web=True):
                _produce(env, "failover", {None: 40})
                away = functools.partial(_database_away, base)
                await async_wait_for(away, 60, "readiness to say the database is away")

                def said_read_only() -> bool:
                    lines = (r.getMessage() for r in caplog.records if r.name.endswith("consumer"))
                    return any("ReadOnlySqlTransaction 25006" in line for line in lines)

                await async_wait_for(said_read_only, 30, "the consumer to say why it waits")
                with psycopg.connect(standby.url(), autocommit=True) as conn:
                    conn.execute("SELECT pg_promote(true, 30)")
                promoted = time.monotonic()
                await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
                await wait_http_status(base + "/health/ready", 200)
                print(f"standby-promoted: settled {time.monotonic() - promoted:.1f} s after")
            assert [(40,)] == env.query("SELECT count(*) FROM payments")
            assert [(0,)] == env.query("SELECT count(*) FROM paystream.kept_records")


async def test_a_primary_turned_read_only_fails_over_to_the_urls_next_host(
    stack: Stack, tmp_path: Path
) -> None:
    """The URL names a primary and its streaming standby (target_session_attrs=read-write). The
    primary turns read-only mid-stream, still answering, and the standby is promoted: the
    processor leaves the connections it holds to the old primary and reaches the new one
    through the URL's next host. Every payment is stored there, none kept."""
    with (
        private_postgres(tmp_path) as (primary, url),
        streaming_standby(primary, tmp_path / "standby") as standby,
    ):
        both = at_hosts(url, primary, standby, target_session_attrs="read-write")
        env, settings, base = _watched(stack, both, db_retry_max_s=0.5)
        async with processor(settings, serve_web=True):
            _produce(env, "before", {None: 30})
            await async_wait_for(lambda: caught_up(env, settings), 60, "the first payments")
            _toggle_read_only(primary.url(), True)
            _produce(env, "during", {None: 40})
            away = functools.partial(_database_away, base)
            await async_wait_for(away, 30, "readiness to say the database is away")
            with psycopg.connect(standby.url(), autocommit=True) as conn:
                conn.execute("SELECT pg_promote(true, 30)")
            promoted = time.monotonic()
            await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
            print(f"read-only-failover: settled {time.monotonic() - promoted:.1f} s after")
        with psycopg.connect(standby.url("payments"), autocommit=True) as conn:
            stored = conn.execute("SELECT count(*) FROM payments").fetchall()
            kept = conn.execute("SELECT count(*) FROM paystream.kept_records").fetchall()
        assert ([(70,)], [(0,)]) == (stored, kept)


async def test_a_full_file_system_under_the_database_loses_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """The database's file system filled to the last byte while payments arrive (the server may
    stop on it): nothing is stored, kept or lost meanwhile; once space is freed (and the server
    started again, if it stopped) every payment is stored, none kept. How long settling took
    after the space was freed is printed, not asserted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for the database needs root (CI runs as root)")
    with (
        _small_file_system(tmp_path / "small") as folder,
        private_postgres(folder) as (server, url),
    ):
        env, settings, base = _watched(stack, url, db_retry_max_s=0.5)
        async with processor(settings, serve_web=True):
            _produce(env, "before", {None: 30})
            await async_wait_for(lambda: caught_up(env, settings), 60, "the first payments")
            filler = folder / "filler"
            _fill(filler)
            _produce(env, "full", {None: 300})

            async def refused() -> bool:
                return not server.running() or await _database_away(base)

            await async_wait_for(refused, 60, "the full disk to stop the writes")
            assert [(0,)] == env.query("SELECT count(*) FROM paystream.kept_records")
            filler.unlink()
            freed = time.monotonic()
            stopped = not server.running()
            if stopped:
                server.stop()
                server.start()
            await async_wait_for(lambda: caught_up(env, settings), 90, "offsets at the end")
            print(
                f"disk-full (server {'stopped' if stopped else 'up'}): settled"
                f" {time.monotonic() - freed:.1f} s after space was freed"
            )
        assert [(330,)] == env.query("SELECT count(*) FROM payments")
        assert [(0,)] == env.query("SELECT count(*) FROM paystream.kept_records")


@contextlib.contextmanager
def _small_file_system(folder: Path) -> Iterator[Path]:
    """A 400 MB file system of its own at `folder` (tmpfs), unmounted on exit."""
    folder.mkdir()
    options = "size=400m,mode=0777"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def _fill(path: Path) -> None:
    """A file taking every free byte of its file system."""
    with path.open("wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(bytes(size))
