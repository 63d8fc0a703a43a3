"""The live dashboard: a snapshot of this instance and the shared database, every second.

Reading needs no credentials. Replaying needs the operator token (PAYSTREAM_OPERATOR_TOKEN) in an
`X-Paystream-Token` header: a custom header cannot be sent cross-site without a CORS preflight,
which we never grant, and a foreign Origin is refused outright. Without a token, read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
import psycopg
import psycopg_pool
from aiohttp import web
from prometheus_client import Counter, Histogram

from paystream import store
from paystream.backoff import pause
from paystream.config import Settings
from paystream.errors import DatabaseUnavailable, SealedRecordUnreadable
from paystream.lag import partition_lag
from paystream.metrics import (
    CONSUMER_LAG,
    DATABASE_UP,
    DB_FAILURES,
    GATEWAY_CALLS,
    GATEWAY_SECONDS,
    KEPT,
    KEPT_OLDEST_AGE,
    KEPT_UNRESOLVED,
    KEPT_UNRESOLVED_AMOUNT,
    OUTBOX_DEPTH,
    OUTBOX_OLDEST_AGE,
    RECORDS,
    REDELIVERED,
    REPORTS,
    REPORTS_UNDELIVERABLE,
    STORED,
)
from paystream.model import Reason

_LAG_EVERY_S = 2.0
"""How often the consumer lag is read for the page and its gauge: one committed-offsets and one
watermark request per partition each time, cheap at this pace, fresh enough to watch a drain."""

_WAITING_REASONS = frozenset(r.value for r in Reason if r.waits)

Replay = Callable[[int], Awaitable[dict[str, int]]]
Checks = Callable[[], Awaitable[dict[str, bool]]]


def _by_label(metric: Counter, label: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                values[key] = values.get(key, 0) + sample.value
    return values


def _total(metric: Counter) -> float:
    return sum(_by_label(metric, "").values())


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


@dataclass(slots=True)
class DashboardState:
    """What the page shows; `lag` is refreshed in the background (it asks the broker)."""

    settings: Settings
    kafka: Mapping[str, str]
    """The librdkafka client properties (Settings.kafka_client), read once."""
    pool: psycopg_pool.AsyncConnectionPool
    checks: Checks
    circuit: Callable[[], str]
    replay: Replay
    started: float = field(default_factory=time.time)
    lag: dict[str, int] = field(default_factory=dict)

    async def refresh_lag(self, stop: asyncio.Event) -> None:
        topics = [self.settings.online_topic, self.settings.offline_topic]
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a broker outage shows as stale lag, not a crash
                self.lag = await asyncio.to_thread(
                    partition_lag,
                    self.kafka,
                    self.settings.group_id,
                    topics,
                )
                for name, lag in self.lag.items():
                    topic, partition = name.rsplit("/", 1)
                    CONSUMER_LAG.labels(topic=topic, partition=partition).set(lag)
            await pause(_LAG_EVERY_S, stop)

    async def watch_kept(self, stop: asyncio.Event, every_s: float = 5.0) -> None:
        """Keep the at-risk gauges current: unresolved kept records, their amount and the age of
        the oldest, by reason. Runs whether or not anything flows, so the numbers never freeze
        at their last value when the stream stops."""
        while not stop.is_set():
            answered = False
            with contextlib.suppress(TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout):
                async with asyncio.timeout(every_s), self.pool.connection(timeout=every_s) as conn:
                    summaries = {k.reason: k for k in await store.kept_by_reason(conn)}
                    OUTBOX_OLDEST_AGE.set(await store.oldest_unreported_age_s(conn))
                    OUTBOX_DEPTH.set(await store.outbox_depth(conn))
                    REPORTS_UNDELIVERABLE.set(await store.undeliverable_reports(conn))
                answered = True
                now = time.time()
                for reason in Reason:
                    found = summaries.get(reason)
                    age_s = None if found is None else found.oldest_age_s(now)
                    KEPT_UNRESOLVED.labels(reason=reason).set(found.unresolved if found else 0)
                    KEPT_UNRESOLVED_AMOUNT.labels(reason=reason).set(
                        float(found.unresolved_amount) if found else 0
                    )
                    KEPT_OLDEST_AGE.labels(reason=reason).set(age_s or 0)
            DATABASE_UP.set(1 if answered else 0)
            await pause(every_s, stop)

    async def snapshot(self) -> dict[str, Any]:
        calls = _by_label(GATEWAY_CALLS, "outcome")
        answered = sum(v for k, v in calls.items() if k.isdigit() and not k.startswith("5"))
        database: dict[str, Any] = {"available": True}
        try:
            async with asyncio.timeout(3), self.pool.connection(timeout=3) as conn:
                database["outbox_depth"] = await store.outbox_depth(conn)
                now = time.time()
                database["kept"] = [
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
                    for k in await store.kept_by_reason(conn)
                ]
                database["latest"] = [row.as_json() for row in await store.latest_kept(conn, 12)]
        except (TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout):
            database = {"available": False}
        return {
            "at": time.time(),
            "uptime_s": time.time() - self.started,
            "group": self.settings.group_id,
            "health": await self.checks(),
            "circuit": self.circuit(),
            "records": _by_label(RECORDS, "topic"),
            "stored": _by_label(STORED, "payment_type"),
            "kept": _by_label(KEPT, "reason"),
            "redelivered": _total(REDELIVERED),
            "reports": _by_label(REPORTS, "outcome"),
            "database_failures": _total(DB_FAILURES),
            "gateway": {
                "calls": calls,
                "error_rate": 1 - answered / sum(calls.values()) if calls else 0.0,
                "latency_ms": _latency_ms(GATEWAY_SECONDS),
            },
            "lag": self.lag,
            "database": database,
            "can_replay": self.settings.operator_token is not None,
        }


def _static(name: str) -> bytes:
    return (resources.files("paystream") / "static" / name).read_bytes()


_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def add_routes(app: web.Application, state: DashboardState) -> None:
    async def page(_: web.Request) -> web.Response:
        return web.Response(body=_static("dashboard.html"), content_type="text/html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ("dashboard.js", "dashboard.css"):
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=_TYPES["." + name.rsplit(".")[-1]])

    async def api_state(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(await state.snapshot()), content_type="application/json"
        )

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while True:
                await response.write(b"data: " + orjson.dumps(await state.snapshot()) + b"\n\n")
                await asyncio.sleep(1.0)  # the feed's refresh period
        return response

    async def replay(request: web.Request) -> web.Response:
        token = state.settings.operator_token
        if token is None:
            return web.json_response(
                {"error": "read-only: set PAYSTREAM_OPERATOR_TOKEN to enable replay"}, status=403
            )
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return web.json_response({"error": "cross-site request refused"}, status=403)
        given = request.headers.get("X-Paystream-Token", "")
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return web.json_response({"error": "missing or wrong operator token"}, status=401)
        try:
            kept_id = int(request.match_info["id"])
        except ValueError:
            raise web.HTTPBadRequest() from None
        try:
            return web.json_response(await state.replay(kept_id))
        except SealedRecordUnreadable as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except DatabaseUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/events", events)
    app.router.add_post("/api/replay/{id}", replay)
