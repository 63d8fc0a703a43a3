"""OpenTelemetry tracing: a span for each batch and its steps (decode, load, validate,
transaction, commit) and for each gateway and log-API call, with W3C `traceparent` sent to the
third party and read from a Kafka record's headers when its producer set one.

Off unless PAYSTREAM_OTLP_ENDPOINT is set (or a test installs a provider): then nothing here runs
but the check of one flag, no header is read or sent, and the SDK is not even imported.

A payment is followed from the shop to the database like this: a gateway call for a record whose
producer sent a `traceparent` is a child of the producer's span (the gateway sees the shop's trace
id) and links to the batch; the batch span links to every such record; a kept record's report to
the log API continues the trace of the batch (or the producer) that kept it, whenever it is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"


_tracer: trace.Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def install(provider: TracerProvider | None) -> None:
    """Trace into `provider` from now on (None: stop tracing)."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("paystream")


def configure_otlp(endpoint: str, service_name: str = "paystream") -> TracerProvider:
    """A provider that batches spans to an OTLP/HTTP collector at `endpoint` (its base URL, as
    OTEL_EXPORTER_OTLP_ENDPOINT takes it: /v1/traces is added), installed. Shut it down to flush."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    return provider


def _remote(traceparent: str | None) -> SpanContext | None:
    """The remote span a `traceparent` value names, or None if it names none (or is bad)."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({TRACEPARENT: traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def current_traceparent() -> str | None:
    """The current span's `traceparent`, to send or to store; None while tracing is off."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT)


def headers() -> dict[str, str]:
    """The header that carries the current span to the third party ({} while tracing is off)."""
    value = current_traceparent()
    return {} if value is None else {TRACEPARENT: value}


def annotate(key: str, value: str | int) -> None:
    """Set an attribute on the current span, if tracing."""
    if _tracer is not None:
        trace.get_current_span().set_attribute(key, value)


def _links(traceparents: Sequence[str | None]) -> list[Link]:
    remotes = (_remote(t) for t in dict.fromkeys(t for t in traceparents if t))
    return [Link(remote) for remote in remotes if remote is not None]


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    links_to: Sequence[str | None] = (),
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[None]:
    """A span around the block, child of the current one (or of the remote span `parent`
    names, linked then to the current one); linked to every span `links_to` names. Nothing at
    all while tracing is off."""
    tracer = _tracer
    if tracer is None:
        yield
        return
    links = _links(links_to)
    context = None
    remote = _remote(parent)
    if remote is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        here = trace.get_current_span().get_span_context()
        if here.is_valid:
            links.append(Link(here))
    with tracer.start_as_current_span(
        name, context=context, kind=kind, links=links, attributes=attributes
    ):
        yield
