"""What the processor watches whether or not anyone looks, and the one snapshot its pages show.

Three loops, run by every processor (with or without its web server):
- the database's side (kept records by reason, the outbox, the latest kept rows), on a
  connection of its own, so that watching never takes a connection or a turn from the batches:
  every second while a page watches, every 5 s otherwise;
- the consumer lag, from one Kafka client opened once;
- the snapshot: once a second, whatever the number of pages, from what the other two last read
  and this process's own counts, with the last minutes of throughput for a page that opens late.

They keep their gauges current (passed in, so that a test can hand in its own) and say in the
log when what they watch goes away and when it is back; an unexpected error is logged with its
traceback and the loop goes on, since a fault in watching must never stop the payments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import psycopg_pool
from confluent_kafka import KafkaException
from prometheus_client import Counter, Gauge, Histogram

from paystream import metrics, store
from paystream.backoff import pause
from paystream.lag import GroupLag
from paystream.model import Reason
from paystream.pipeline import BatchResult
from paystream.stalls import Stalls

log = logging.getLogger(__name__)

Checks = Callable[[], Awaitable[dict[str, bool]]]
"""The readiness checks: each dependency's name and whether it answers."""

WATCHED_EVERY_S = 1.0
"""The snapshot's period, and the database side's while a page watches."""
UNWATCHED_EVERY_S = 5.0
"""The database side's period while no page watches: the gauges' freshness."""
LAG_EVERY_S = 2.0
"""One committed-offsets request and one watermark request per partition: cheap at this pace,
fresh enough to watch a drain."""
HISTORY_S = 600
"""How much throughput history a page receives when it opens."""
_LATEST_KEPT = 12

_WAITING_REASONS = frozenset(r for r in Reason if r.waits)


@dataclass(frozen=True, slots=True, kw_only=True)
class Instruments:
    """The metrics the monitor sets (gauges) and reads for the page (counters, a histogram)."""

    database_up: Gauge
    consumer_lag: Gauge
    outbox_depth: Gauge
    outbox_oldest_age: Gauge
    reports_undeliverable: Gauge
    kept_unresolved: Gauge
    kept_unresolved_amount: Gauge
    kept_oldest_age: Gauge
    gateway_calls: Counter
    gateway_seconds: Histogram
    reports: Counter
    database_failures: Counter
    partition_stalled: Gauge

    @classmethod
    def of_process(cls) -> Instruments:
        """The process's own, which /metrics exports."""
        return cls(
            database_up=metrics.DATABASE_UP,
            consumer_lag=metrics.CONSUMER_LAG,
            outbox_depth=metrics.OUTBOX_DEPTH,
            outbox_oldest_age=metrics.OUTBOX_OLDEST_AGE,
            reports_undeliverable=metrics.REPORTS_UNDELIVERABLE,
            kept_unresolved=metrics.KEPT_UNRESOLVED,
            kept_unresolved_amount=metrics.KEPT_UNRESOLVED_AMOUNT,
            kept_oldest_age=metrics.KEPT_OLDEST_AGE,
            gateway_calls=metrics.GATEWAY_CALLS,
            gateway_seconds=metrics.GATEWAY_SECONDS,
            reports=metrics.REPORTS,
            database_failures=metrics.DB_FAILURES,
            partition_stalled=metrics.PARTITION_STALLED,
        )


class _Outage:
    """Says once in the log that a watched dependency went away, and once that it is back."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            log.warning("monitor: %s unavailable (%s); retrying", self._what, _one_line(exc))

    def answered(self) -> None:
        if self._since is not None:
            log.info(
                "monitor: %s answers again after %.0f s",
                self._what,
                time.monotonic() - self._since,
            )
            self._since = None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class Monitor:
    """Watches the database and the group's lag, and makes the page's snapshot once a second."""

    def __init__(
        self,
        *,
        group_id: str,
        topics: list[str],
        kafka: Mapping[str, str],
        pool: psycopg_pool.AsyncConnectionPool,
        tally: BatchResult,
        checks: Checks,
        circuit: Callable[[], str],
        stalls: Stalls,
        can_replay: bool,
        instruments: Instruments,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`pool`: the monitor's own (one connection); `kafka`: the librdkafka client
        properties; `tally`: what the processor decided since it started (Pipeline.tally)."""
        self._tally = tally
        self._group_id = group_id
        self._topics = topics
        self._kafka = dict(kafka)
        self._pool = pool
        self.checks = checks
        self._circuit = circuit
        self._stalls = stalls
        self._can_replay = can_replay
        self._m = instruments
        self._clock = clock
        self._started = clock()
        self._lag: dict[str, int] = {}
        self._database: dict[str, Any] = {"available": False}
        self._summaries: dict[Reason, store.KeptSummary] = {}
        self._undeliverable = 0
        self._summarised_at = -UNWATCHED_EVERY_S
        self._history: deque[dict[str, float]] = deque(maxlen=int(HISTORY_S / WATCHED_EVERY_S))
        self._snapshot: dict[str, Any] | None = None
        self._fresh = asyncio.Event()  # set when a snapshot is made, then replaced
        self._closed = False
        self._watchers = 0
        self._watched = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watch_database(stop))
                group.create_task(self._watch_lag(stop))
                group.create_task(self._make_snapshots(stop))
        finally:
            self._closed = True  # the pages' feeds end
            self._fresh.set()

    # -- the database ------------------------------------------------------------------------

    async def _watch_database(self, stop: asyncio.Event) -> None:
        outage = _Outage("the database (dashboard and at-risk gauges)")
        while not stop.is_set():
            try:
                async with asyncio.timeout(UNWATCHED_EVERY_S):
                    await self._read_database()
            except (TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                outage.failed(exc)
                self._database = {"available": False}
                self._m.database_up.set(0)
            except Exception:
                log.exception("monitor: reading the database failed unexpectedly")
                self._database = {"available": False}
            else:
                outage.answered()
                self._m.database_up.set(1)
            every_s = WATCHED_EVERY_S if self._watchers else UNWATCHED_EVERY_S
            await pause(every_s, stop, self._watched)
            self._watched.clear()

    async def _read_database(self) -> None:
        """The outbox (two index scans) and the latest kept rows, each time; the kept records by
        reason and the undeliverable reports, two scans of the whole kept table (240-300 ms and
        60 ms of the database's time for a million kept records), at most every
        UNWATCHED_EVERY_S however often a page asks."""
        now = self._clock()
        async with self._pool.connection() as conn:
            if now - self._summarised_at >= UNWATCHED_EVERY_S:
                self._summaries = {k.reason: k for k in await store.kept_by_reason(conn)}
                self._undeliverable = await store.undeliverable_reports(conn)
                self._summarised_at = now
            summaries, undeliverable = self._summaries, self._undeliverable
            depth = await store.outbox_depth(conn)
            oldest_s = await store.oldest_unreported_age_s(conn)
            latest = await store.latest_kept(conn, _LATEST_KEPT) if self._watchers else []
        self._m.outbox_depth.set(depth)
        self._m.outbox_oldest_age.set(oldest_s)
        self._m.reports_undeliverable.set(undeliverable)
        for reason in Reason:
            found = summaries.get(reason)
            self._m.kept_unresolved.labels(reason=reason).set(found.unresolved if found else 0)
            self._m.kept_unresolved_amount.labels(reason=reason).set(
                float(found.unresolved_amount) if found else 0
            )
            self._m.kept_oldest_age.labels(reason=reason).set(
                (found.oldest_age_s(now) if found else None) or 0
            )
        self._database = {
            "available": True,
            "outbox_depth": depth,
            "kept": [
                {
                    "reason": k.reason,
                    "error_type": k.error_type,
                    "count": k.kept,
                    "resolved": k.resolved,
                    "unresolved": k.unresolved,
                    "unresolved_amount": int(k.unresolved_amount),
                    "oldest_unresolved_s": k.oldest_age_s(now),
                    "waits": k.reason in _WAITING_REASONS,
                }
                for k in summaries.values()
            ],
            "latest": [row.as_json() for row in latest],
        }

    # -- the lag -----------------------------------------------------------------------------

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        outage = _Outage("the consumer lag (the brokers)")
        reader = await asyncio.to_thread(GroupLag, self._kafka, self._group_id, self._topics)
        try:
            while not stop.is_set():
                try:
                    behind = await asyncio.to_thread(reader.behind)
                except KafkaException as exc:
                    outage.failed(exc)
                except Exception:
                    log.exception("monitor: reading the consumer lag failed unexpectedly")
                else:
                    outage.answered()
                    self._lag = {f"{t}/{p}": n for (t, p), n in sorted(behind.items())}
                    for (topic, partition), n in behind.items():
                        self._m.consumer_lag.labels(topic=topic, partition=str(partition)).set(n)
                await pause(LAG_EVERY_S, stop)
        finally:
            await asyncio.to_thread(reader.close)

    # -- the snapshot ------------------------------------------------------------------------

    async def _make_snapshots(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                snapshot = await self._make_snapshot()
            except Exception:
                log.exception("monitor: making the dashboard's snapshot failed unexpectedly")
            else:
                self._snapshot = snapshot
                self._fresh.set()
                self._fresh = asyncio.Event()
            await pause(WATCHED_EVERY_S, stop)

    async def _make_snapshot(self) -> dict[str, Any]:
        now = self._clock()
        self._stalls.export(self._m.partition_stalled)
        tally = self._tally
        processed = tally.stored + tally.kept + tally.redelivered
        self._history.append(
            {"at": now, "processed": processed, "stored": tally.stored, "kept": tally.kept}
        )
        calls = _by_label(self._m.gateway_calls, "outcome")
        answered = sum(v for k, v in calls.items() if k.isdigit() and not k.startswith("5"))
        return {
            "at": now,
            "uptime_s": now - self._started,
            "group": self._group_id,
            # Asked only while a page shows them: the readiness endpoint asks on its own.
            "health": await self.checks() if self._watchers else None,
            "circuit": self._circuit(),
            "processed": processed,
            "stored": tally.stored,
            "kept": {reason.value: n for reason, n in tally.kept_reasons.items()},
            "redelivered": tally.redelivered,
            "reports": _by_label(self._m.reports, "outcome"),
            "database_failures": sum(_by_label(self._m.database_failures, "").values()),
            "gateway": {
                "calls": calls,
                "error_rate": 1 - answered / sum(calls.values()) if calls else 0.0,
                "latency_ms": _latency_ms(self._m.gateway_seconds),
            },
            "lag": self._lag,
            "stalls": self._stalls.as_json(),
            "database": self._database,
            "can_replay": self._can_replay,
        }

    def latest(self) -> bytes:
        """The last snapshot, as JSON, with the throughput history."""
        return orjson.dumps({**(self._snapshot or {}), "history": list(self._history)})

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """A page is watching: the database's side is read every second meanwhile."""
        self._watchers += 1
        self._watched.set()
        try:
            yield
        finally:
            self._watchers -= 1

    async def feed(self) -> AsyncGenerator[bytes, None]:
        """The snapshots as JSON, one a second, the first with the throughput history, until
        the monitor stops."""
        async with self.watching():
            if self._snapshot is not None:
                yield self.latest()
            while not self._closed:
                await self._fresh.wait()
                if not self._closed:
                    yield orjson.dumps(self._snapshot)


def _by_label(metric: Counter, label: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                values[key] = values.get(key, 0) + sample.value
    return values


def _latency_ms(histogram: Histogram) -> dict[str, float]:
    """Mean and an upper bound of the 95th percentile, from the histogram's buckets."""
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    p95 = 0.0
    for bound, cumulative in sorted(buckets):
        if count and cumulative >= 0.95 * count:
            p95 = bound
            break
    return {"mean": 1000 * total / count if count else 0.0, "p95_le": 1000 * p95}
