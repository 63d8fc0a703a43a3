"""Composition root: open resources, run the consumer and the outbox relay in one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg
import psycopg_pool
from aiohttp import web
from pyreqwest.client import Client

from paystream import store
from paystream.access import Access
from paystream.backoff import Backoff, pause
from paystream.brokers import check_access, choose_group_protocol
from paystream.config import Settings
from paystream.consumer import BatchConsumer, Membership
from paystream.dashboard import Dashboard
from paystream.errors import ConfigurationError, DatabaseUnavailable, Interrupted, ReportFailed
from paystream.gateway import CircuitBreaker, Gateway
from paystream.kafka import KafkaConsumer
from paystream.metrics import BROKER_UP, CIRCUIT_OPEN, RECORDS_EXPIRED, REWINDS
from paystream.migrations import latest as latest_migration
from paystream.migrations import migrate, schema_version
from paystream.model import ErrorType, PaymentType
from paystream.monitor import Checks, Instruments, Monitor
from paystream.outbox import REPORTS_IN_FLIGHT, LogClient, OutboxRelay
from paystream.pipeline import BatchResult, Pipeline
from paystream.replay import replay, revalidate
from paystream.sealing import KeptCipher
from paystream.stalls import Stalls
from paystream.text import visible
from paystream.thirdparty import third_party_client
from paystream.web import SERVER_LOG, make_app

log = logging.getLogger(__name__)


def redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2] or "localhost"  # several for a failover: h1,h2:5433
    return f"{parts.scheme}://{parts.username or ''}@{hosts}{parts.path}"


# libpq's side of every connection. A partition drops packets without a reset, and a query sent
# into one is retransmitted by TCP for ~15 minutes (tcp_retries2) before libpq hears of it.
DATABASE_LINK: dict[str, Any] = {
    "connect_timeout": 5,  # seconds for a connection attempt whose SYN goes unanswered
    # Data sent and unacknowledged for 10 s: the link is gone. The batch fails with
    # DatabaseUnavailable and is retried on a new connection (our statements run in
    # milliseconds; this is network silence, not a slow query).
    "tcp_user_timeout": 10_000,
    # An idle pooled connection that died: found after 5 s idle + 3 probes 2 s apart.
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


_POOL_WAIT_S = 5.0
"""How long a batch waits for a pooled connection before it counts as the database being away:
the pool holds one per batch in flight and a few more, so a wait this long means none comes."""
_POOL_OPEN_S = 15.0
"""Start-up: the first connections, after one direct attempt already succeeded."""
_POOL_RETRY_FIRST_S = 0.5
"""Start-up: the first pause while the database does not answer, doubling to _WAITING_LINE_S."""
_SPARE_CONNECTIONS = 5
"""Database connections beyond one per batch in flight: the stamping pass, the outbox relay,
re-validation, the dashboard's replay button and the readiness probe, none of which should wait
on a batch. (The monitor has a connection of its own: monitor_pool.)"""
_SPARE_HTTP_CONNECTIONS = REPORTS_IN_FLIGHT
"""Third-party connections beyond the gateway's in-flight limit: the outbox relay's reports."""
_IDLE_CONNECTION_S = 10.0
"""A web connection that has sent no whole request for this long is closed: between requests,
and while a request's head trickles in (slowloris). A response being streamed (the dashboard's
feed) is not idle."""
_READY_PROBE_S = 2.0
"""A readiness probe of the database that takes longer says "not ready"."""


async def configure_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's hook for each new connection: the server's side of our sessions (keepalives
    and timeouts, explained in store/session.sql), committed."""
    await conn.execute(store.query("configure_session"))
    await conn.commit()


_NOT_ANSWERING = (
    "is the server running",
    "connection refused",
    "timeout expired",
    "timed out",
    "failed to resolve host",
    "could not translate host name",
    "no route to host",
    "network is unreachable",
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "connection slots are reserved",
)
"""What libpq says (it gives no SQLSTATE for a failed connection) when no server answers yet, or
one answers that it cannot take us yet: a database still starting, restarting or failing over.
Anything else it says of a connection is a server that answered and refused us (credentials, no
such database, TLS), or a URL it cannot read: a setting to fix."""

_WAITING_LINE_S = 5.0
"""While the database does not answer at start, a line this often at most."""


def not_answering(exc: psycopg.Error) -> bool:
    """Whether a failed connection means the database is not there yet, as against refusing."""
    text = str(exc).lower()
    return isinstance(exc, psycopg.OperationalError) and any(w in text for w in _NOT_ANSWERING)


@contextlib.asynccontextmanager
async def open_pool(
    settings: Settings, max_size: int = 10, *, until: asyncio.Event | None = None
) -> AsyncIterator[psycopg_pool.AsyncConnectionPool]:
    """A connection pool that is up to date with our migrations, or a one-sentence error.

    With `until` (the processor's stop event), a database that does not answer yet (refused,
    timed out, not resolved, starting up) is waited for with back-off, a line every few seconds,
    until it answers; Interrupted if `until` is set first. A database that answers and refuses
    us, or a URL that cannot be read, fails at once either way: waiting would not fix it."""

    def unreachable(reason: str) -> ConfigurationError:
        return ConfigurationError(
            f"Cannot connect to the database at {redacted(settings.database_url)}{reason}; "
            "check PAYSTREAM_DATABASE_URL and that the server is running."
        )

    backoff = Backoff(initial_s=_POOL_RETRY_FIRST_S, max_s=_WAITING_LINE_S)
    while True:
        try:
            pool = await _opened(settings, max_size)
            break
        except psycopg.Error as exc:
            # libpq's last line says why (refused, certificate, password), never the password.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = f" ({visible(lines[-1])[:200]})" if lines else ""
            if until is None or not not_answering(exc):
                raise unreachable(reason) from exc
            log.warning(
                "the database at %s does not answer%s; waiting for it",
                redacted(settings.database_url),
                reason,
            )
        except psycopg_pool.PoolTimeout as exc:
            if until is None:
                raise unreachable("") from exc
            log.warning(
                "the database at %s does not answer; waiting for it",
                redacted(settings.database_url),
            )
        await pause(backoff.next_s(), until)
        if until.is_set():
            raise Interrupted("stopped while waiting for the database")
    try:
        await _at_schema(pool, settings, until)
        yield pool
    finally:
        await pool.close()


async def _at_schema(
    pool: psycopg_pool.AsyncConnectionPool, settings: Settings, until: asyncio.Event | None
) -> None:
    """The database at this version's schema: migrated here (PAYSTREAM_MIGRATE), or, with
    migrations left to `paystream migrate`, waited for (with `until`; without it, a
    ConfigurationError). A newer schema is a newer version rolling out beside this one: said in
    one line, and left as it is."""
    backoff = Backoff(initial_s=_POOL_RETRY_FIRST_S, max_s=_WAITING_LINE_S)
    wanted = latest_migration()
    while True:
        try:
            async with pool.connection() as conn:
                if settings.migrate and (applied := await migrate(conn)):
                    log.info("applied migrations %s", applied)
                found = await schema_version(conn)
        except store.DATABASE_ERRORS as exc:
            if until is None:
                raise
            # Gone again, or refusing the migration (a read-only server): tried again.
            log.warning(
                "preparing the schema: %s; trying again", DatabaseUnavailable.caused_by(exc)
            )
            await pause(backoff.next_s(), until)
            if until.is_set():
                raise Interrupted("stopped while waiting for the schema") from exc
            continue
        if found > wanted:
            log.warning(
                "the database's schema is at migration %d, newer than this version knows (%d): "
                "running beside a newer version, without migrating",
                found,
                wanted,
            )
        if found >= wanted:
            return
        behind = (
            f"the database's schema is at migration {found} and this version needs {wanted}; "
            "run `paystream migrate` (PAYSTREAM_MIGRATE is off)"
        )
        if until is None:
            raise ConfigurationError(behind[0].upper() + behind[1:] + ".")
        log.warning("%s; waiting for it", behind)
        await pause(backoff.next_s(), until)
        if until.is_set():
            raise Interrupted("stopped while waiting for the schema")


async def _opened(settings: Settings, max_size: int) -> psycopg_pool.AsyncConnectionPool:
    """A pool whose first connections are open. Raises what a connection raises."""
    # One direct attempt first: a refused connection fails at once, not after pool retries.
    first = await psycopg.AsyncConnection.connect(settings.database_dsn, **DATABASE_LINK)
    await first.close()
    pool = psycopg_pool.AsyncConnectionPool(
        settings.database_dsn,
        min_size=1,
        max_size=max_size,
        timeout=_POOL_WAIT_S,
        open=False,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        kwargs={"application_name": "paystream", **DATABASE_LINK},
        configure=configure_session,
    )
    try:
        await pool.open(wait=True, timeout=_POOL_OPEN_S)
    except BaseException:
        await pool.close()
        raise
    return pool


def topic_types(settings: Settings) -> dict[str, PaymentType]:
    return {settings.online_topic: PaymentType.ONLINE, settings.offline_topic: PaymentType.OFFLINE}


def kept_cipher(settings: Settings) -> KeptCipher | None:
    """The keys that seal kept records, if configured; a bad key file is a ConfigurationError."""
    if settings.kept_key_file is None:
        return None
    return KeptCipher.from_file(settings.kept_key_file)


def third_party(settings: Settings, connections: int) -> Client:
    """The client for the gateway and the log API, with the deployment's credentials and CA."""
    return third_party_client(
        connections, settings.third_party_headers(), settings.third_party_ca_file
    )


def make_gateway(settings: Settings, client: Client) -> Gateway:
    return Gateway(
        client,
        settings.gateway_url,
        max_in_flight=settings.gateway_max_in_flight,
        timeout_s=settings.gateway_timeout_s,
        attempts=settings.gateway_attempts,
        budget_s=settings.gateway_budget_s,
        breaker=CircuitBreaker(
            threshold=settings.gateway_breaker_threshold,
            cooldown_s=settings.gateway_breaker_cooldown_s,
            max_cooldown_s=settings.gateway_breaker_max_cooldown_s,
            open_gauge=CIRCUIT_OPEN,
        ),
    )


@dataclass(slots=True)
class Totals:
    """Running counts for progress displays."""

    batches: int = 0
    stored: int = 0
    kept: int = 0
    redelivered: int = 0

    def add(self, result: BatchResult) -> None:
        self.batches += 1
        self.stored += result.stored
        self.kept += result.kept
        self.redelivered += result.redelivered


class Serving:
    """What the web server serves, which listens from the start: live at once, and not ready
    while the processor waits for its database or starts (the dashboard's routes answer 503
    meanwhile), so that an orchestrator neither restarts it nor counts on it."""

    def __init__(self) -> None:
        self.database = False
        self._checks: Checks | None = None
        self._dashboard: Dashboard | None = None

    def started(self, checks: Checks, dashboard: Dashboard) -> None:
        self._checks, self._dashboard = checks, dashboard

    async def ready(self) -> dict[str, bool]:
        if self._checks is None:
            return {"database": self.database, "started": False}
        return await self._checks()

    def current(self) -> Dashboard | None:
        return self._dashboard


async def run_processor(
    settings: Settings,
    stop: asyncio.Event,
    *,
    totals: Totals | None = None,
    serve_web: bool = True,
) -> None:
    """Run until `stop` is set; then finish in-flight batches, commit, and return."""
    totals = totals or Totals()
    serving = Serving()
    async with contextlib.AsyncExitStack() as resources:
        if serve_web:
            warn_if_exposed(settings)
            app = make_app(serving.ready, Access.of(settings), serving.current)
            runner = await serve_dashboard(settings, app)
            resources.push_async_callback(runner.cleanup)
        size = settings.batches_in_flight + _SPARE_CONNECTIONS
        try:
            pool = await resources.enter_async_context(open_pool(settings, size, until=stop))
        except Interrupted:
            return  # stopped before the database answered: nothing was begun
        serving.database = True
        connections = settings.gateway_max_in_flight + _SPARE_HTTP_CONNECTIONS
        client = await resources.enter_async_context(third_party(settings, connections))
        watch_pool = await resources.enter_async_context(monitor_pool(settings))
        gateway = make_gateway(settings, client)
        log_client = LogClient(client, settings.log_url, settings.log_timeout_s)
        relay = OutboxRelay(
            pool, log_client, claim_batch=settings.outbox_batch, idle_s=settings.outbox_idle_s
        )
        pipeline = Pipeline(
            pool,
            gateway,
            topic_types(settings),
            on_kept=relay.wake,
            cipher=kept_cipher(settings),
            stamp_interval_s=settings.stamp_interval_s,
        )

        async def report_database_error(description: str) -> None:
            try:
                await log_client.send(None, ErrorType.DATABASE, description)
            except ReportFailed as exc:
                log.warning("direct database-error report failed: %s", exc)

        stalls = Stalls(settings.stall_after_s)
        kafka_client = settings.kafka_client()
        await asyncio.gather(
            asyncio.to_thread(check_access, kafka_client), gateway.check_credentials()
        )
        membership = Membership()
        monitor, dashboard = watch(
            settings, kafka_client, pool, watch_pool, pipeline, gateway, membership, stalls
        )
        kafka = await kafka_consumer(settings, kafka_client, membership)
        consumer = BatchConsumer(
            kafka,
            membership,
            pipeline,
            pool,
            batch_size=settings.batch_size,
            batches_in_flight=settings.batches_in_flight,
            db_retry_max_s=settings.db_retry_max_s,
            report_database_error=report_database_error,
            stalls=stalls,
            on_batch=totals.add,
        )
        await kafka.start()
        # Bound to this processor's membership (in tests, the last processor started wins).
        BROKER_UP.set_function(lambda: 1.0 if membership.broker_up else 0.0)
        # Counted from 0, so that an alert on their increase fires on the first one.
        for topic in (settings.online_topic, settings.offline_topic):
            RECORDS_EXPIRED.labels(topic=topic)
            for cause in ("database_behind", "beyond_end", "recreated"):
                REWINDS.labels(topic=topic, cause=cause)
        serving.started(monitor.checks, dashboard)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(monitor.run(stop))
                group.create_task(consumer.run(stop))
                group.create_task(relay.run(stop))
                group.create_task(
                    revalidate(
                        pool,
                        pipeline,
                        gateway,
                        set(topic_types(settings)),
                        stop,
                        every_s=settings.revalidate_every_s,
                        max_attempts=settings.revalidate_max_attempts,
                    )
                )
        finally:
            await kafka.close()


def monitor_pool(settings: Settings) -> psycopg_pool.AsyncConnectionPool:
    """The monitor's one connection, apart from the batches' pool. Opened by `async with`
    without waiting: the monitor reports the database away until it connects."""
    return psycopg_pool.AsyncConnectionPool(
        settings.database_dsn,
        min_size=1,
        max_size=1,
        timeout=_POOL_WAIT_S,
        open=False,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        kwargs={"application_name": "paystream-monitor", **DATABASE_LINK},
        configure=configure_session,
    )


def watch(
    settings: Settings,
    kafka_client: dict[str, str],
    pool: psycopg_pool.AsyncConnectionPool,
    watch_pool: psycopg_pool.AsyncConnectionPool,
    pipeline: Pipeline,
    gateway: Gateway,
    membership: Membership,
    stalls: Stalls,
) -> tuple[Monitor, Dashboard]:
    """The monitor (on `watch_pool`), and the dashboard: the monitor's snapshot and the replay
    its button runs. Readiness says not ready while the database or every broker is away, and
    while intake at a partition is stalled. The database counts as away while it answers but
    refuses the batches' writes (read-only, say)."""

    async def ready() -> dict[str, bool]:
        return {
            "database": not stalls.failing_now() and await database_answers(pool),
            "broker": membership.broker_up,
            "intake": not stalls.stalled(),
        }

    async def replay_one(kept_id: int) -> dict[str, int]:
        where = store.KeptFilter(ids=[kept_id])
        result = await replay(pool, pipeline, set(topic_types(settings)), where)
        return {"stored": result.stored, "kept": result.kept}

    monitor = Monitor(
        group_id=settings.group_id,
        topics=[settings.online_topic, settings.offline_topic],
        kafka=kafka_client,
        pool=watch_pool,
        tally=pipeline.tally,
        checks=ready,
        circuit=lambda: gateway.breaker.state,
        stalls=stalls,
        can_replay=settings.operator_token is not None,
        instruments=Instruments.of_process(),
    )
    return monitor, Dashboard(monitor, replay_one)


async def kafka_consumer(
    settings: Settings, kafka_client: dict[str, str], membership: Membership
) -> KafkaConsumer:
    """The bridge to the group, speaking the protocol the brokers take (or the one set); it
    hands `membership` what the Kafka thread sees."""
    protocol = await asyncio.to_thread(
        choose_group_protocol,
        kafka_client,
        settings.online_topic,
        settings.group_protocol,
    )
    log.info("consumer group protocol: %s", protocol)
    return KafkaConsumer(
        kafka_client,
        settings.group_id,
        [settings.online_topic, settings.offline_topic],
        group_protocol=protocol,
        listener=membership.apply,
    )


async def serve_dashboard(settings: Settings, app: web.Application) -> web.AppRunner:
    """The dashboard, metrics and health endpoints listening; a taken port is a setting to fix."""
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=2.0,
        keepalive_timeout=_IDLE_CONNECTION_S,
        logger=SERVER_LOG,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.web_host, settings.web_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigurationError(
            f"Port {settings.web_port} on {settings.web_host} is taken, so the "
            "dashboard cannot listen there; set PAYSTREAM_WEB_PORT to a free port."
        ) from exc
    log.info("dashboard, metrics and health on http://%s:%d", settings.web_host, settings.web_port)
    return runner


def warn_if_exposed(settings: Settings) -> None:
    """Say at start what an exposed dashboard without a token serves: health and metrics only."""
    if settings.web_exposed and settings.operator_token is None:
        log.warning(
            "the dashboard listens on %s:%d, beyond loopback, without PAYSTREAM_OPERATOR_TOKEN: "
            "it is read-only and serves health and metrics only (no payment data, no replay). "
            "Set a token to read and replay with it, or bind to 127.0.0.1.",
            settings.web_host,
            settings.web_port,
        )


async def database_answers(pool: psycopg_pool.AsyncConnectionPool) -> bool:
    """Whether the database answers and takes writes (readiness). One that answers and takes
    none has the pool's connections renewed: an idle instance finds the promoted host too."""
    try:
        async with asyncio.timeout(_READY_PROBE_S), pool.connection(timeout=_READY_PROBE_S) as conn:
            row = await (await conn.execute(store.query("answers"))).fetchone()
    except (TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout):
        return False
    writable = bool(row and row[0])
    if not writable:
        await store.leave_refusing_server(pool)
    return writable
