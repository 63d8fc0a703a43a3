"""Real infrastructure for the tests: one Kafka broker and one PostgreSQL for the session; each
test gets its own database (cloned from the original schema), its own topics and consumer group."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import psycopg
import pytest

from paystream.app import Totals, run_processor
from paystream.config import Settings
from paystream_tooling import polling
from paystream_tooling.devenv.certs import ServerCertificate
from paystream_tooling.devenv.kafka import KafkaCluster, create_topics
from paystream_tooling.devenv.postgres import EmbeddedPostgres
from paystream_tooling.devenv.stack import (
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    SimulatorProcess,
    Stack,
    create_database,
    load_original_schema,
)

_counter = itertools.count()

# Hypothesis times itself (a deadline per example, a health check on slow generation): timed
# assertions that fail when the shared machine is busy, as one did in a full run here. Examples
# are derived from each test, so every run tries the same ones.
hypothesis.settings.register_profile(
    "paystream",
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    derandomize=True,
)
hypothesis.settings.load_profile("paystream")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts the local infrastructure (the `stack` fixture: Kafka, PostgreSQL, the
    Go tools) is marked `infra`, as are the few that start their own or need the network;
    `make unit` runs the others, in seconds."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.infra)


@pytest.fixture(scope="session", autouse=True)
def write_chaos_report() -> Iterator[None]:
    """chaos-report.json for the chaos rounds of this session, if any ran."""
    yield
    from tests.chaos_report import ROUNDS, write

    if ROUNDS:
        write(ROUNDS)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cache = Path(os.environ.get("PAYSTREAM_CACHE", Path.home() / ".cache" / "paystream"))
    home = tmp_path_factory.mktemp("stack") / "home"
    # Jars are cached outside the temporary folder so that only the first run downloads them.
    cache.mkdir(parents=True, exist_ok=True)
    (home.parent / "cache").symlink_to(cache, target_is_directory=True)
    with Stack(home, partitions=3) as running:
        yield running


@dataclass
class Env:
    """One test's private slice of the infrastructure."""

    stack: Stack
    name: str
    database_url: str
    online_topic: str
    offline_topic: str
    service_url: str = "http://127.0.0.1:9"  # set by the simulator fixture
    bootstrap: str = ""

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": self.bootstrap,
            "database_url": self.database_url,
            "online_topic": self.online_topic,
            "offline_topic": self.offline_topic,
            "group_id": f"group-{self.name}",
            "gateway_url": self.service_url,
            "log_url": self.service_url,
            "web_port": 0,
            "outbox_idle_s": 0.2,
            "gateway_timeout_s": 2.0,
            "gateway_budget_s": 3.0,
        }
        values.update(overrides)
        return Settings(**values)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True)

    def execute(self, sql: str, params: Any = None) -> None:
        with self.connect() as conn:
            conn.execute(sql, params)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(sql, params).fetchall()


def new_env(
    stack: Stack,
    database_url: str | None = None,
    bootstrap: str | None = None,
    cluster: KafkaCluster | None = None,
    leader: int | None = None,
) -> Env:
    """Fresh topics, database (cloned from the original schema) and consumer group; the topics
    on another broker with `bootstrap`, or replicated on a `cluster` (with every partition led
    by the node `leader`, if given)."""
    name = f"t{next(_counter)}_{int(time.time() * 1000) % 10**8}"
    online, offline = f"online_{name}", f"offline_{name}"
    if cluster is not None:
        cluster.create_topics([online, offline], stack.partitions, leader)
        bootstrap = cluster.bootstrap
    elif bootstrap is not None:
        create_topics(bootstrap, [online, offline], stack.partitions)
    else:
        stack.create_topics([online, offline])
    return Env(
        stack=stack,
        name=name,
        database_url=database_url or stack.fresh_database(f"db_{name}"),
        online_topic=online,
        offline_topic=offline,
        bootstrap=bootstrap or stack.kafka.bootstrap,
    )


@pytest.fixture
def env(stack: Stack) -> Env:
    return new_env(stack)


class SimulatorClient:
    def __init__(self, simulator: SimulatorProcess) -> None:
        self.simulator = simulator
        self.url = simulator.url

    def request(
        self, method: str, path: str, body: Any = None, accept: str = "application/json"
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": accept},
        )
        with urllib.request.urlopen(
            request, timeout=30, context=self.simulator.ssl_context()
        ) as response:
            return json.loads(response.read())

    def start(self, **params: Any) -> Any:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.request("GET", f"/start?{query}")

    def faults(self, **changes: Any) -> Any:
        return self.request("POST", "/faults", changes)

    def status(self) -> Any:
        return self.request("GET", "/status")

    def ledger(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.request("GET", "/ledger")["records"]
        return records

    def gateway_calls(self, payment_id: str) -> dict[str, int]:
        """The gateway calls made for one payment, counted by their Idempotency-Key."""
        query = urllib.parse.urlencode({"payment_id": payment_id})
        calls: dict[str, int] = self.request("GET", f"/calls?{query}")
        return calls

    def logs(self) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = self.request("GET", "/logs")
        return logs

    def traceparents(self) -> dict[str, list[str]]:
        """The W3C traceparent headers the gateway and the log API received."""
        received: dict[str, list[str]] = self.request("GET", "/traceparents")
        return received

    def wait_produced(self, timeout_s: float = 60) -> None:
        wait_for(lambda: self.status().get("done") is True, timeout_s, "the producer to finish")
        assert self.status()["failed"] == 0


@contextlib.contextmanager
def running_simulator(
    env: Env, *args: str, tls: ServerCertificate | None = None
) -> Iterator[SimulatorClient]:
    """The third-party service for this env, producing to its topics and database (over HTTPS
    with `tls`). Gateway latency is at most 20 ms so tests run quickly."""
    sim = SimulatorProcess(env.stack.home / env.name, env.settings(), tls=tls)
    sim.start("--max-delay-ms", "20", "--rate", "0", *args)
    env.service_url = sim.url
    try:
        yield SimulatorClient(sim)
    finally:
        sim.stop()


@pytest.fixture
def simulator(env: Env) -> Iterator[SimulatorClient]:
    with running_simulator(env) as client:
        yield client


wait_for = polling.until
async_wait_for = polling.until_async


@contextlib.asynccontextmanager
async def processor(settings: Settings, *, serve_web: bool = False) -> AsyncIterator[Totals]:
    """Run the processor in this event loop; stop it (gracefully) on exit."""
    stop = asyncio.Event()
    totals = Totals()
    task = asyncio.create_task(run_processor(settings, stop, totals=totals, serve_web=serve_web))
    try:
        yield totals
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


def produce(env: Env, topic: str, values: Iterable[tuple[bytes, int | None]]) -> None:
    """Produce each value to its partition (None: any) of `topic`; every one delivered."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": env.bootstrap})
    for value, partition in values:
        if partition is None:
            producer.produce(topic, value)
        else:
            producer.produce(topic, value, partition=partition)
    assert 0 == producer.flush(10)


def migrated(env: Env) -> bool:
    """Whether the processor's migrations have brought the database to this version's schema."""
    from paystream.migrations import latest

    if not env.query("SELECT to_regclass('paystream.schema_migrations') IS NOT NULL")[0][0]:
        return False
    return bool(env.query("SELECT max(version) FROM paystream.schema_migrations")[0][0] == latest())


def unreported(env: Env) -> int:
    return int(
        env.query("SELECT count(*) FROM paystream.kept_records WHERE reported_at IS NULL")[0][0]
    )


def caught_up(env: Env, settings: Settings) -> bool:
    from paystream.lag import committed_lag

    topics = [settings.online_topic, settings.offline_topic]
    return committed_lag(settings.kafka_bootstrap_servers, settings.group_id, topics) == 0


async def settle(
    env: Env, simulator: SimulatorClient, settings: Settings, timeout_s: float = 90
) -> Totals:
    """Run the processor until the producer is done, offsets reach the end and every kept record
    is reported; then stop it gracefully."""
    async with processor(settings) as totals:
        await async_wait_for(lambda: simulator.status().get("done") is True, timeout_s, "producer")
        await async_wait_for(lambda: caught_up(env, settings), timeout_s, "offsets at the end")
        await async_wait_for(lambda: unreported(env) == 0, timeout_s, "every report delivered")
    return totals


async def drain(env: Env, settings: Settings) -> None:
    """Run the processor until offsets reach the end and every report is delivered; then stop
    it (for records produced before)."""
    async with processor(settings):
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        await async_wait_for(lambda: unreported(env) == 0, 60, "every report delivered")


def reconcile_now(env: Env, simulator: SimulatorClient, settings: Settings) -> Any:
    from paystream.lag import committed_lag
    from paystream_tooling.reconcile import reconcile

    topics = [settings.online_topic, settings.offline_topic]
    lag = committed_lag(settings.kafka_bootstrap_servers, settings.group_id, topics)
    with env.connect() as conn:
        return reconcile(conn, simulator.ledger(), simulator.logs(), lag)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `paystream` subprocess these settings."""
    return {"PATH": os.environ["PATH"], **settings.as_env()}


def cli(env: Env, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`paystream ARGS` as a user runs it, with this env's settings and `extra` variables."""
    return subprocess.run(
        [sys.executable, "-m", "paystream", *args],
        env={**settings_env(env.settings()), **extra},
        capture_output=True,
        text=True,
        timeout=120,
    )


def unresolved_gateway_failures(env: Env) -> int:
    return int(
        env.query(
            "SELECT count(*) FROM paystream.kept_records"
            " WHERE reason = 'gateway_unavailable' AND resolved_at IS NULL"
        )[0][0]
    )


def settled(env: Env, simulator: SimulatorClient, settings: Settings) -> bool:
    """The producer is done, offsets are at the end, every report is out, and nothing waits for
    re-validation."""
    return (
        simulator.status().get("done") is True
        and caught_up(env, settings)
        and unreported(env) == 0
        and unresolved_gateway_failures(env) == 0
    )


@contextlib.contextmanager
def private_postgres(
    folder: Path, tls: ServerCertificate | None = None
) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL server of the test's own (serving TLS too, with `tls`) with the original
    schema; yields it and the URL of its payments database."""
    server = EmbeddedPostgres(folder / "pg", tls=tls)
    server.start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PASSWORD}'")
        create_database(server.url(), DB_NAME)
        url = server.url(DB_NAME, DB_USER, DB_PASSWORD)
        load_original_schema(url)
        yield server, url
    finally:
        server.stop()


@contextlib.contextmanager
def streaming_standby(primary: EmbeddedPostgres, folder: Path) -> Iterator[EmbeddedPostgres]:
    """A streaming standby of `primary` (from a base backup of it now), started; stopped on
    exit."""
    standby = EmbeddedPostgres(folder)
    primary.base_backup(standby.data_dir / "pgdata", standby=True)
    standby.start()
    try:
        yield standby
    finally:
        standby.stop()


def at_hosts(url: str, *servers: EmbeddedPostgres, **query: str) -> str:
    """`url`, of one of `servers`' databases, naming `servers` in its place, in order (libpq
    tries each), with `query` as its parameters."""
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    hosts = ",".join(f"{server.host}:{server.port}" for server in servers)
    netloc = f"{credentials}@{hosts}" if credentials else hosts
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), "")
    )


async def http_status(url: str) -> int | None:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return None


async def wait_http_status(url: str, expected: int, timeout_s: float = 30) -> None:
    """Poll a URL until it answers `expected` (connection refused counts as not yet)."""

    async def answers() -> bool:
        return await http_status(url) == expected

    await polling.until_async(answers, timeout_s, f"{url} to answer {expected}")
