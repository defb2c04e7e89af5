"""OpenTelemetry traces that follow one build across services through message headers.

Every publish injects the current trace context (W3C ``traceparent``) into the message's headers:
the span of the handler that publishes, or else a span of the publish itself; every consumer
continues the trace from its message in a span of its handling. A build's trace therefore starts at whoever
published its ``BuildRequested`` (the gateway's HTTP request) and spans every service it reaches.

Exporters, chosen by the environment in ``configure`` (called by entrypoints only):
``OTEL_EXPORTER_OTLP_ENDPOINT`` → OTLP over HTTP (a collector, Tempo, Jaeger ...);
``KILN_TRACE_DIR`` → JSON lines in ``<dir>/<service>-<pid>.jsonl`` (development and tests).
Without either, spans are created (their trace ids go into the logs) but not exported.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind

tracer = trace.get_tracer("kiln")


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line (trace id, span id, parent, service, name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            if ctx is None:
                continue
            lines.append(
                json.dumps(
                    {
                        "trace_id": f"{ctx.trace_id:032x}",
                        "span_id": f"{ctx.span_id:016x}",
                        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                        "service": span.resource.attributes.get("service.name"),
                        "name": span.name,
                        "kind": span.kind.name,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "attributes": dict(span.attributes or {}),
                    },
                    default=str,
                )
            )
        with self._lock, self.path.open("a") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def configure(service: str) -> None:
    """Install a tracer provider for this process (entrypoints only)."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"kiln-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_dir := os.environ.get("KILN_TRACE_DIR"):
        path = Path(trace_dir) / f"{service}-{os.getpid()}.jsonl"
        provider.add_span_processor(
            BatchSpanProcessor(JsonLinesExporter(path), schedule_delay_millis=200)
        )
    trace.set_tracer_provider(provider)


def inject(headers: MutableMapping[str, str]) -> None:
    propagate.inject(headers)


def extract(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


@contextmanager
def consuming(
    service: str, kind: str, headers: Mapping[str, str] | None, **attributes: str
) -> Iterator[Span]:
    """The span of one message's handling, continuing the publisher's trace."""
    with tracer.start_as_current_span(
        f"{service} handle {kind}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "nats", "kiln.kind": kind, **attributes},
    ) as span:
        yield span


def publishing(kind: str, subject: str, **attributes: str) -> AbstractContextManager[object]:
    """A span for a publish that no span is current for (an HTTP request's, a timer's: the
    trace starts there); inside a handler's span, nothing: the trace goes on from that span, and
    a span per publish would cost every handler that publishes."""
    if trace.get_current_span().get_span_context().is_valid:
        return nullcontext()
    return tracer.start_as_current_span(
        f"publish {kind}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "kiln.kind": kind,
            **attributes,
        },
    )
