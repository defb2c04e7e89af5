"""Telemetry set-up, called only by entrypoints: logging (JSON lines in production, text in
development) and tracing (see ``kiln_runtime.tracing``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from . import tracing

_EXTRA_KEYS = ("build_id", "event_id", "kind", "call_id", "iteration", "service")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _EXTRA_KEYS:
            if (value := getattr(record, key, None)) is not None:
                doc[key] = str(value)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            doc["trace_id"] = f"{span.trace_id:032x}"
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{k}={getattr(record, k)}" for k in _EXTRA_KEYS if getattr(record, k, None) is not None
        )
        return f"{base} {extras}" if extras else base


def configure(service: str, level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else TextFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    tracing.configure(service)
    quiet_libraries(root.level)


# Libraries that log routine work at INFO: one line per HTTP request (httpx, and httpx2, the
# copy of it the anthropic SDK carries: a line per model call), per connection, per S3 call.
NOISY = ("faststream", "nats", "httpx", "httpx2", "botocore", "aiobotocore", "uvicorn.access")


def quiet_libraries(level: int) -> None:
    """Let the NOISY libraries through only from WARNING (or ``level``, if higher)."""
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))
