"""The third-party HTTP service: gateway (`POST /payment`), log API (`POST /log`, `GET /logs`),
and the producer behind `GET /start`. FastAPI documents it all at /docs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import html
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import psycopg
from confluent_kafka import KafkaException, Producer
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from paystream.simulator.streams import Planned, Profile, is_declined, plan

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
            await conn.execute("DELETE FROM payments")
            await conn.execute("UPDATE accounts SET last_payment_date = NULL")

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


class _Gateway:
    """ASGI middleware that answers `POST /payment` itself, outside the framework, whose routing
    and middleware took two thirds of the simulator's CPU a call: its one thread served at most
    2 900 calls a second, and at a 100 ms latency 256 callers got answers in 114-124 ms (now
    9 000 a second, and 104 ms).

    It also aborts the connection of a share of gateway calls, like a network drop.
    """

    def __init__(self, app: ASGIApp, simulator: Simulator) -> None:
        self.app = app
        self.simulator = simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (scope["type"] == "http" and scope["path"] == "/payment"):
            await self.app(scope, receive, send)
            return
        if self.simulator.roll(self.simulator.faults.drop_rate):
            # `send` is still uvicorn's own here, bound to the connection's transport.
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                transport.abort()
                return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # one pass over the request's headers
        given = headers.get(self.simulator.config.auth_header.lower().encode())
        if not self.simulator.authorized(None if given is None else given.decode()):
            await _answer(send, 401, {"error": "missing or wrong credentials"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        key = headers.get(b"idempotency-key")
        traceparent = headers.get(b"traceparent")
        if traceparent is not None:
            self.simulator.traceparents["payment"].append(traceparent.decode("latin-1"))
        status, document = await self.simulator.validate(
            body, None if key is None else key.decode()
        )
        await _answer(send, status, document)


async def _answer(send: Send, status: int, document: dict[str, str]) -> None:
    answer = orjson.dumps(document)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


_PAGE = """<!doctype html><html><head><title>paystream simulator</title>
<style>body{{font-family:system-ui,sans-serif;max-width:48rem;margin:3rem auto;color:#222}}
a.button{{display:inline-block;padding:.6rem 1.2rem;margin-right:1rem;border-radius:.4rem;
background:#2557a7;color:#fff;text-decoration:none}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.3rem;text-align:left;font-size:.9rem}}</style></head>
<body><h1>Technical Test Inc. — third-party service</h1>
<p>Gateway <code>POST /payment</code>, log API <code>POST /log</code>.
API docs: <a href="/docs">/docs</a>.</p>
<p><a class="button" href="/start">Start</a><a class="button" href="/logs">Logs</a></p>
{body}</body></html>"""


def create_app(simulator: Simulator) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await simulator.stop_production()

    app = FastAPI(
        title="paystream simulator",
        description="The retailer's third-party service: payment gateway, error log API, producer.",
        lifespan=lifespan,
    )

    @app.get("/", response_class=HTMLResponse, summary="Home page with Start and Logs buttons")
    async def home() -> str:
        return _PAGE.format(body="")

    @app.get("/start", summary="Clear payments and logs, then produce the stream to Kafka")
    async def start(
        request: Request,
        profile: Profile | None = None,
        records: Annotated[int | None, Query(ge=1, le=10_000_000)] = None,
        rate: Annotated[
            float | None, Query(ge=0, description="records/s; 0 = as fast as possible")
        ] = None,
        seed: int | None = None,
    ) -> Response:
        production = await simulator.start(
            profile=profile or simulator.config.profile,
            records=records or simulator.config.records,
            rate=simulator.config.rate if rate is None else rate,
            seed=simulator.config.seed if seed is None else seed,
        )
        body = {"started": True, "records": len(production.entries), "profile": production.profile}
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(
                _PAGE.format(body=f"<p>Started: {len(production.entries)} records.</p>")
            )
        return JSONResponse(body)

    @app.get("/status", summary="Progress of the producer")
    async def status() -> dict[str, Any]:
        return simulator.status()

    @app.get("/ledger", summary="Every record produced and the outcome it must have")
    async def ledger() -> Response:
        production = simulator.production
        entries = [] if production is None else [e.as_json() for e in production.entries]
        return Response(
            orjson.dumps({"status": simulator.status(), "records": entries}),
            media_type="application/json",
        )

    @app.post("/payment", summary="Validate a payment: 2XX approves, 4xx declines")
    async def payment(request: Request) -> Response:
        # Documents the call; as the simulator runs, `_Gateway` answers it before this route.
        key = request.headers.get("idempotency-key")
        status, document = await simulator.validate(await request.body(), key)
        return Response(orjson.dumps(document), status, media_type="application/json")

    @app.get("/calls", summary="Gateway calls of one payment, counted by their Idempotency-Key")
    async def calls(payment_id: str) -> dict[str, int]:
        return {
            "" if key is None else key: n
            for (pid, key), n in simulator.gateway_calls.items()
            if pid == payment_id
        }

    @app.get("/traceparents", summary="W3C traceparent headers received, by endpoint")
    async def traceparents() -> dict[str, list[str]]:
        return {name: list(values) for name, values in simulator.traceparents.items()}

    @app.post("/log", status_code=201, summary="Store an error report")
    async def post_log(request: Request) -> Response:
        if not simulator.authorized(request.headers.get(simulator.config.auth_header)):
            return JSONResponse({"error": "missing or wrong credentials"}, status_code=401)
        if simulator.faults.log_outage:
            return JSONResponse({"error": "service unavailable"}, status_code=503)
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            simulator.traceparents["log"].append(traceparent)
        try:
            document = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return JSONResponse({"error": "expected JSON"}, status_code=400)
        if not isinstance(document, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        error_type = document.get("error_type") or document.get("error")
        if error_type not in ("database", "network", "other"):
            return JSONResponse(
                {"error": "error_type (or error) must be database, network or other"},
                status_code=422,
            )
        entry = {
            "payment_id": document.get("payment_id"),
            "error_type": error_type,
            "error": error_type,
            "error_description": document.get("error_description"),
            "created_at": datetime.now(UTC).isoformat(),
        }
        simulator.logs.append(entry)
        return JSONResponse(entry, status_code=201)

    @app.get("/logs", summary="Received error reports: HTML, or JSON with Accept: application/json")
    async def logs(request: Request) -> Response:
        if "application/json" in request.headers.get("accept", ""):
            return Response(orjson.dumps(simulator.logs), media_type="application/json")
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(e.get(k)))}</td>"
                for k in ("created_at", "payment_id", "error_type", "error_description")
            )
            + "</tr>"
            for e in simulator.logs[-500:]
        )
        table = (
            f"<h2>{len(simulator.logs)} error reports</h2><table><tr><th>at</th><th>payment</th>"
            f"<th>type</th><th>description</th></tr>{rows}</table>"
        )
        return HTMLResponse(_PAGE.format(body=table))

    @app.get("/faults", summary="Current fault knobs")
    async def get_faults() -> Faults:
        return simulator.faults

    @app.post("/faults", summary="Change fault knobs at run time")
    async def set_faults(update: FaultUpdate) -> Faults:
        changes = update.model_dump(exclude_unset=True)
        simulator.faults = simulator.faults.model_copy(update=changes)
        return simulator.faults

    return app


def create_asgi_app(simulator: Simulator) -> ASGIApp:
    """The service as uvicorn runs it: the gateway's calls answered outermost."""
    return _Gateway(create_app(simulator), simulator)
