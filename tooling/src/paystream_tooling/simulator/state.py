"""The simulated third party's state: its fault knobs, the producer's ledger, the gateway's
verdicts and the reports its log API received. `service` serves it over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from confluent_kafka import KafkaException, Producer
from pydantic import BaseModel, Field

from paystream_tooling import queries
from paystream_tooling.simulator.streams import Planned, Profile, is_declined, plan

log = logging.getLogger(__name__)

_CALLS_KEPT = 200_000
"""Gateway calls counted by (payment_id, Idempotency-Key) at most: a long run stays bounded."""


class Faults(BaseModel):
    """Fault knobs of the gateway and the log API, settable at start and at run time."""

    decline_rate: float = Field(0.1, ge=0, le=1, description="share of payments declined (4xx)")
    error_rate: float = Field(0, ge=0, le=1, description="share of gateway calls answered 503")
    hang_rate: float = Field(0, ge=0, le=1, description="share of gateway calls that hang")
    hang_s: float = Field(30, ge=0, description="how long a hanging call hangs")
    drop_rate: float = Field(
        0, ge=0, le=1, description="share of gateway calls whose connection drops"
    )
    gateway_outage: bool = Field(False, description="every gateway call answers 503")
    credentials_revoked: bool = Field(
        False,
        description="every gateway and log call answers 401, as when our API key was revoked",
    )
    log_outage: bool = Field(False, description="every log call answers 503")
    latency_ms: float | None = Field(
        None, ge=0, description="fixed gateway latency; default: the payment's `delay` field"
    )
    max_delay_ms: float = Field(1000, ge=0, description="cap on the latency taken from `delay`")


class FaultUpdate(BaseModel):
    decline_rate: float | None = Field(None, ge=0, le=1)
    error_rate: float | None = Field(None, ge=0, le=1)
    hang_rate: float | None = Field(None, ge=0, le=1)
    hang_s: float | None = Field(None, ge=0)
    drop_rate: float | None = Field(None, ge=0, le=1)
    gateway_outage: bool | None = None
    credentials_revoked: bool | None = None
    log_outage: bool | None = None
    latency_ms: float | None = Field(None, ge=0)
    max_delay_ms: float | None = Field(None, ge=0)


@dataclass(slots=True)
class LedgerEntry:
    planned: Planned
    topic: str
    partition: int | None = None
    offset: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "payment_id": self.planned.payment_id,
            "expect": self.planned.expect.value,
            "kind": self.planned.kind,
            "value_b64": base64.b64encode(self.planned.value).decode(),
        }


@dataclass(slots=True)
class Production:
    profile: Profile
    seed: int
    rate: float
    entries: list[LedgerEntry] = field(default_factory=list)
    produced: int = 0
    delivered: int = 0
    failed: int = 0
    done: bool = False
    started_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class SimulatorConfig:
    kafka_bootstrap_servers: str
    database_url: str | None
    online_topic: str = "online"
    offline_topic: str = "offline"
    records: int = 1038
    rate: float = 11.5  # the original: about 1000 records in 1-2 minutes
    seed: int = 0
    profile: Profile = Profile.ORIGINAL
    # Demand this token on the third-party API (`POST /payment`, `POST /log`), as a production
    # gateway demands an API key: `Authorization: Bearer <token>`, or the bare token in another
    # named header. The simulator's own controls (/start, /faults, /status...) stay open.
    token: str | None = None
    auth_header: str = "Authorization"


class Simulator:
    def __init__(self, config: SimulatorConfig, faults: Faults) -> None:
        self.config = config
        self.faults = faults
        self.logs: list[dict[str, Any]] = []
        # (payment_id, Idempotency-Key) → calls, so tests can see what retries sent. A plain
        # dict of tuples: the simulator shares the benchmark's cores with the processor.
        self.gateway_calls: dict[tuple[str, str | None], int] = {}
        # The W3C traceparent headers received, by endpoint (the last 10 000 of each), so that
        # a test can follow a trace from a producer through the processor to us.
        self.traceparents: dict[str, deque[str]] = {
            "payment": deque(maxlen=10_000),
            "log": deque(maxlen=10_000),
        }
        self.production: Production | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(config.seed)

    def authorized(self, value: str | None) -> bool:
        """Whether the auth header's value (None: absent) carries the demanded token, and our
        key has not been revoked (the `credentials_revoked` fault)."""
        if self.faults.credentials_revoked:
            return False
        token = self.config.token
        if token is None:
            return True
        expected = (
            f"Bearer {token}" if self.config.auth_header.lower() == "authorization" else token
        )
        return value is not None and hmac.compare_digest(value.encode(), expected.encode())

    def roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    async def validate(
        self, body: bytes, idempotency_key: str | None = None
    ) -> tuple[int, dict[str, str]]:
        """The gateway's answer to a payment: its HTTP status and JSON document."""
        faults = self.faults
        try:
            document = orjson.loads(body)
            payment_id = str(document["payment_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return 400, {"error": "expected a JSON payment"}
        call = (payment_id, idempotency_key)
        calls = self.gateway_calls
        calls[call] = calls.get(call, 0) + 1
        if len(calls) > _CALLS_KEPT:  # bounded, as a provider expires its keys: oldest first
            del calls[next(iter(calls))]
        if faults.gateway_outage or self.roll(faults.error_rate):
            return 503, {"error": "service unavailable"}
        if self.roll(faults.hang_rate):
            await asyncio.sleep(faults.hang_s)
            return 504, {"error": "gateway timeout"}
        if faults.latency_ms is not None:
            latency_ms = faults.latency_ms
        else:
            delay = document.get("delay")
            latency_ms = float(delay) if isinstance(delay, int | float) else 0.0
        latency_ms = min(latency_ms, faults.max_delay_ms)
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        if is_declined(payment_id, faults.decline_rate):
            return 402, {"payment_id": payment_id, "status": "declined"}
        return 200, {"payment_id": payment_id, "status": "approved"}

    async def reset_database(self) -> None:
        """Like the original /start: delete every payment (and, so that account dates agree with
        the payments left, clear last_payment_date too)."""
        if not self.config.database_url:
            return
        async with await psycopg.AsyncConnection.connect(self.config.database_url) as conn:
            await conn.execute(queries.query("reset_payments"))

    async def start(self, *, profile: Profile, records: int, rate: float, seed: int) -> Production:
        await self.stop_production()
        await self.reset_database()
        self.logs.clear()
        self.gateway_calls.clear()
        for received in self.traceparents.values():
            received.clear()
        planned = plan(profile, records=records, seed=seed, decline_rate=self.faults.decline_rate)
        topics = {"online": self.config.online_topic, "offline": self.config.offline_topic}
        production = Production(profile=profile, seed=seed, rate=rate)
        production.entries = [LedgerEntry(planned=p, topic=topics[p.topic_type]) for p in planned]
        self.production = production
        self._task = asyncio.create_task(self._produce(production))
        return production

    async def stop_production(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _produce(self, production: Production) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.config.kafka_bootstrap_servers,
                "linger.ms": 5,
                "acks": "all",
                # A retry after a leader's failover must not write a record twice.
                "enable.idempotence": True,
                # A leader cut off by a silent link answers nothing: give up on it after 10 s
                # (the default waits 60) and follow the new leader.
                "socket.timeout.ms": 10_000,
            }
        )

        def delivered(entry: LedgerEntry) -> Any:
            def callback(error: Any, message: Any) -> None:
                if error is not None:
                    production.failed += 1
                    log.error("produce failed: %s", error)
                    return
                entry.partition = message.partition()
                entry.offset = message.offset()
                production.delivered += 1

            return callback

        interval = 1.0 / production.rate if production.rate > 0 else 0.0
        started = time.monotonic()
        try:
            for index, entry in enumerate(production.entries):
                while True:
                    try:
                        # No key, like the original: records spread over the partitions.
                        producer.produce(
                            entry.topic, entry.planned.value, on_delivery=delivered(entry)
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
                production.produced += 1
                producer.poll(0)
                if interval:
                    wait = started + (index + 1) * interval - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                elif index % 1000 == 999:
                    await asyncio.sleep(0)
            remaining = await asyncio.to_thread(producer.flush, 30)
            if remaining:
                log.error("%d records not delivered", remaining)
        except KafkaException as exc:
            log.error("producer failed: %s", exc)
        finally:
            production.done = True

    def status(self) -> dict[str, Any]:
        production = self.production
        if production is None:
            return {"started": False}
        return {
            "started": True,
            "profile": production.profile.value,
            "seed": production.seed,
            "rate": production.rate,
            "records": len(production.entries),
            "produced": production.produced,
            "delivered": production.delivered,
            "failed": production.failed,
            "done": production.done,
            "logs": len(self.logs),
        }
