"""Trace context through message headers: a publish inside a handler's span carries that span on,
one outside any span starts the trace with a span of its own."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from kiln_runtime import tracing


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    return exporter


def test_a_publish_outside_any_span_starts_the_trace(spans: InMemorySpanExporter) -> None:
    headers: dict[str, str] = {}
    with tracing.publishing(
        "build_requested", "kiln.b1.build_requested", **{"kiln.build_id": "b1"}
    ):
        tracing.inject(headers)
    (span,) = spans.get_finished_spans()
    assert span.kind == SpanKind.PRODUCER and span.attributes["kiln.build_id"] == "b1"  # type: ignore[index]
    ctx = span.get_span_context()
    assert ctx is not None
    assert headers["traceparent"].split("-")[1:3] == [f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"]


def test_a_publish_inside_a_handler_goes_on_from_the_handlers_span(
    spans: InMemorySpanExporter,
) -> None:
    upstream: dict[str, str] = {}
    with tracing.publishing("tool_call", "kiln.b1.tool_call"):
        tracing.inject(upstream)
    headers: dict[str, str] = {}
    with tracing.consuming("agent", "tool_result", upstream, **{"kiln.build_id": "b1"}):
        with tracing.publishing("tool_call", "kiln.b1.tool_call"):
            tracing.inject(headers)
    producer, handler = spans.get_finished_spans()  # no span of the inner publish
    assert handler.kind == SpanKind.CONSUMER
    ctx, up = handler.get_span_context(), producer.get_span_context()
    assert ctx is not None and up is not None
    assert handler.parent is not None and handler.parent.span_id == up.span_id
    assert headers["traceparent"].split("-")[1:3] == [f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"]
    assert ctx.trace_id == up.trace_id
