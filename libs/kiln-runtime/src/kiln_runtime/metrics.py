"""Prometheus metrics shared by every service (each process exposes its own /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HANDLED = Counter(
    "kiln_messages_handled_total", "Messages handled, by outcome", ["service", "kind", "outcome"]
)
HANDLER_SECONDS = Histogram(
    "kiln_handler_seconds",
    "Time spent handling one message",
    ["service", "kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PUBLISHED = Counter("kiln_messages_published_total", "Messages published", ["service", "kind"])
DEAD_LETTERS = Counter("kiln_dead_letters_total", "Messages dead-lettered", ["service", "kind"])
DEAD_LETTER_CAUSES = Counter(
    "kiln_dead_letter_causes_total",
    "Messages dead-lettered, by the class of their reason (kiln_runtime.dead_letters.cause_of)",
    ["service", "kind", "cause"],
)
DLQ_MESSAGES = Gauge(
    "kiln_dlq_messages",
    "Dead letters in KILN_DLQ at the last full listing (gateway, GET /v1/admin/dlq)",
    ["service", "kind", "cause"],
)
DLQ_REPLAYED = Counter(
    "kiln_dlq_replayed_total", "Dead letters replayed to their subject", ["service", "kind"]
)
GC_PAUSE = Histogram(
    "kiln_gc_pause_seconds",
    "How long each garbage collection stopped the process, by generation (kiln_runtime.collector)",
    ["generation"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

# Service-specific figures, defined here so that every service names them the same way.
TOOL_SECONDS = Histogram(
    "kiln_tool_seconds",
    "Time a tool call took in the sandbox",
    ["tool", "outcome"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600),
)
E2B_CONNECTS = Counter(
    "kiln_e2b_connects_total",
    "Handles to E2B sandboxes a tool call or snapshot asked for: reused, or from E2B's API",
    ["how"],
)
MODEL_TOKENS = Counter(
    "kiln_model_tokens_total", "Model tokens used, by model and token type", ["model", "type"]
)
MODEL_COST = Counter(
    "kiln_model_cost_micro_usd_total", "Model cost charged, in micro-dollars", ["model"]
)
UNPRICED_ITERATIONS = Counter(
    "kiln_unpriced_iterations_total",
    "Iterations of a model with no price in kiln.yaml, charged at the fallback model's prices",
    ["service", "model"],
)
STALLED_BUILDS = Counter(
    "kiln_stalled_builds_total",
    "The watchdog's nudges of builds that stopped moving: retried, or failed (reason stalled)",
    ["outcome"],
)
BUILDS_SLEEPING = Gauge("kiln_builds_sleeping", "Builds asleep waiting for budget or a wake")
