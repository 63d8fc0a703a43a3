"""OpenTelemetry tracing: the spans of a batch and of each gateway and log call, their parents,
the W3C traceparent read from Kafka headers and sent to the third party, and OTLP export."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import orjson
from confluent_kafka import Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from paystream import tracing
from paystream_tooling.devenv.processes import ChildProcess
from paystream_tooling.simulator.streams import is_declined
from tests.conftest import (
    Env,
    SimulatorClient,
    caught_up,
    drain,
    settings_env,
    wait_for,
)

# A producer's span, as a shop's till would send it: trace id, span id, sampled.
SHOP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SHOP_SPAN = "00f067aa0ba902b7"
SHOP_TRACEPARENT = f"00-{SHOP_TRACE}-{SHOP_SPAN}-01"
BAD_TRACE = "0af7651916cd43dd8448eb211c80319c"
BAD_TRACEPARENT = f"00-{BAD_TRACE}-b7ad6b7169203331-01"


def _approved_id(prefix: str) -> str:
    """A payment_id the simulator's gateway approves (it declines a fixed share by id)."""
    return next(pid for i in itertools.count() if not is_declined(pid := f"{prefix}-{i}", 0.1))


def _produce(env: Env) -> str:
    """An approved online payment carrying the shop's traceparent, an offline one without, and
    a malformed record carrying another; returns the online payment's id."""
    account = env.query("SELECT min(account_id) FROM accounts")[0][0]
    online_id = _approved_id("traced")
    online = {
        "payment_id": online_id,
        "account_id": account,
        "payment_type": "online",
        "credit_card": "4111111111111111",
        "amount": 10,
    }
    offline = {**online, "payment_id": "untraced-offline", "payment_type": "offline"}
    producer = Producer({"bootstrap.servers": env.bootstrap})
    producer.produce(
        env.online_topic, orjson.dumps(online), headers=[("traceparent", SHOP_TRACEPARENT)]
    )
    producer.produce(env.offline_topic, orjson.dumps(offline))
    producer.produce(env.offline_topic, b"{not json", headers=[("traceparent", BAD_TRACEPARENT)])
    assert producer.flush(10) == 0
    return online_id


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


@contextlib.contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


async def test_spans_follow_a_payment_from_the_shop_to_the_gateway_and_the_log(
    env: Env, simulator: SimulatorClient
) -> None:
    settings = env.settings()
    _produce(env)
    with traced() as exporter:
        await drain(env, settings)
        spans = exporter.get_finished_spans()

    # Each batch: decode, validate and transaction as its children; a commit after it.
    batches = _by_name(spans, "paystream.batch")
    assert batches
    for batch in batches:
        children = {s.name for s in spans if s.parent and s.parent.span_id == batch.context.span_id}
        assert {"paystream.decode", "paystream.validate", "paystream.transaction"} <= children
    assert _by_name(spans, "paystream.commit")
    linked = [
        b for b in batches if any(_hex(k.context.trace_id, 32) == SHOP_TRACE for k in b.links)
    ]
    assert len(linked) == 1, "the batch holding the shop's record links to the shop's span"

    # The gateway call for the shop's record continues the shop's trace.
    (validate,) = _by_name(spans, "paystream.gateway.validate")
    assert validate.parent is not None
    assert _hex(validate.parent.span_id, 16) == SHOP_SPAN
    assert _hex(validate.context.trace_id, 32) == SHOP_TRACE
    posts = _by_name(spans, "POST /payment")
    assert len(posts) == 1
    assert posts[0].kind == SpanKind.CLIENT
    assert posts[0].parent is not None
    assert posts[0].parent.span_id == validate.context.span_id
    assert posts[0].attributes is not None
    status = posts[0].attributes["http.response.status_code"]
    assert isinstance(status, int)
    assert 200 <= status < 300  # approved

    # The gateway received that call's context.
    received = simulator.traceparents()
    sent = f"00-{SHOP_TRACE}-{_hex(posts[0].context.span_id, 16)}-01"
    assert received["payment"] == [sent]

    # The malformed record's report to the log API continues its producer's trace.
    (log_call,) = _by_name(spans, "POST /log")
    assert _hex(log_call.context.trace_id, 32) == BAD_TRACE
    assert received["log"] == [f"00-{BAD_TRACE}-{_hex(log_call.context.span_id, 16)}-01"]


async def test_without_tracing_nothing_is_sent(env: Env, simulator: SimulatorClient) -> None:
    """Tracing off (the default): no traceparent goes to the gateway or the log API, even for a
    record that carries one."""
    assert not tracing.enabled()
    _produce(env)
    await drain(env, env.settings())
    assert simulator.traceparents() == {"payment": [], "log": []}
    assert env.query("SELECT count(*) FROM paystream.kept_records WHERE traceparent IS NOT NULL")[
        0
    ] == (0,)


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace collector that keeps what it is sent."""

    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            self.received.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def test_spans_are_exported_over_otlp(env: Env, simulator: SimulatorClient, tmp_path: Any) -> None:
    """`paystream run` with PAYSTREAM_OTLP_ENDPOINT sends its spans to that collector."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    settings = env.settings(otlp_endpoint=endpoint)
    _produce(env)
    variables = {**os.environ, **settings_env(settings)}
    proc = ChildProcess(
        "processor", [sys.executable, "-m", "paystream", "run"], tmp_path / "run.log", env=variables
    )
    try:
        wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")

        def exported() -> set[tuple[str, str]]:
            names = set()
            for body in list(_Collector.received):
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        names |= {(s.name, s.trace_id.hex()) for s in scope.spans}
            return names

        wait_for(
            lambda: ("paystream.gateway.validate", SHOP_TRACE) in exported(),
            30,
            "the gateway call's span at the collector",
        )
        assert "paystream.batch" in {name for name, _ in exported()}
    finally:
        proc.stop()
        server.shutdown()
        server.server_close()
