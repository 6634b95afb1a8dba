"""Distributed tracing: W3C trace context carried on each event (`traceparent`, the CloudEvents
distributed tracing extension) from the API through the bus and the router to the function, and
OpenTelemetry spans exported over OTLP when [tracing] otlp_endpoint is set. When it is not, the
routing path tests `enabled` once per step and OpenTelemetry is not even imported."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from router.config import Config, ConfigError
from router.events import Event
from router.log import current_trace_id

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the CloudEvents extension and the W3C header share the name
_NULL = contextlib.nullcontext()
_state: dict[str, Any] = {}  # provider, tracer, propagator, kinds: set by configure()
enabled = False


def configure(config: Config) -> None:
    """Start exporting spans if [tracing] otlp_endpoint is set; a missing extra is a ConfigError."""
    global enabled
    endpoint = config.tracing.otlp_endpoint
    if not endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise ConfigError(f"[tracing] otlp_endpoint is set but OpenTelemetry is not installed ({exc}): "
                          "pip install 'headwater[tracing]'") from None
    traces_url = endpoint.rstrip("/") + "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": config.tracing.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
    # Runtime processes started from here export their spans to the same collector.
    os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces_url)
    _state.update(provider=provider, tracer=provider.get_tracer("headwater"), propagator=TraceContextTextMapPropagator(),
                  kinds={"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "producer": SpanKind.PRODUCER,
                         "consumer": SpanKind.CONSUMER, "internal": SpanKind.INTERNAL})
    enabled = True
    log.info("tracing to %s", traces_url)


def shutdown() -> None:
    """Export what is buffered and stop (the next configure() starts again)."""
    global enabled
    if enabled:
        enabled = False
        _state.pop("provider").shutdown()
        _state.clear()


def span(name: str, *, event: Event | None = None, headers: Mapping[str, str] | None = None, kind: str = "internal",
         attributes: dict[str, Any] | None = None):
    """A context manager: a span named `name`, child of the event's traceparent (or of an incoming
    request's `traceparent` header, or of the current span). A no-op when tracing is off."""
    if not enabled:
        return _NULL
    return _span(name, event, headers, kind, attributes)


@contextlib.contextmanager
def _span(name, event, headers, kind, attributes) -> Iterator[Any]:
    parent = None
    carrier = {TRACEPARENT: event.extensions[TRACEPARENT]} if event is not None and TRACEPARENT in event.extensions else headers
    if carrier:
        parent = _state["propagator"].extract(carrier)
    with _state["tracer"].start_as_current_span(name, context=parent, kind=_state["kinds"][kind],
                                                attributes=attributes) as current:
        token = current_trace_id.set(format(current.get_span_context().trace_id, "032x"))
        try:
            yield current
        finally:
            current_trace_id.reset(token)


def traceparent() -> str | None:
    """The current span's W3C traceparent, or None (tracing off, or no span)."""
    if not enabled:
        return None
    carrier: dict[str, str] = {}
    _state["propagator"].inject(carrier)
    return carrier.get(TRACEPARENT)


def stamp(event: Event) -> None:
    """Carry the current span on the event (the CloudEvents `traceparent` extension)."""
    if enabled and (value := traceparent()):
        event.extensions[TRACEPARENT] = value
