"""The webhooks service's own figures (beside kiln_runtime.metrics, on the same /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "kiln_webhook_attempts_total",
    "Webhook delivery attempts, by outcome (delivered, retry, failed: no retry left, refused: "
    "the target resolved to a refused address)",
    ["outcome"],
)
LATENCY = Histogram(
    "kiln_webhook_attempt_seconds",
    "Time one delivery attempt took (connect, send, response)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30),
)
BACKLOG = Gauge("kiln_webhook_backlog", "Deliveries pending (due now or waiting for a retry)")
DISABLED = Counter(
    "kiln_webhook_endpoints_disabled_total", "Endpoints disabled because they kept failing"
)
QUEUED = Counter(
    "kiln_webhook_deliveries_queued_total", "Deliveries queued (one per endpoint and event)"
)
