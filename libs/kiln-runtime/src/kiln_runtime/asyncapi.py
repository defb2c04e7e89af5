"""The AsyncAPI document of Kiln's services, generated from ``kiln_contracts.routes``.

``python -m kiln_runtime.asyncapi`` writes contracts/schemas/asyncapi.json; a test fails when it is
stale. Each operation is named ``<service>:<kind>`` and its payload is the message's JSON Schema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from kiln_contracts import subjects
from kiln_contracts.routes import CONSUMES, PUBLISHES
from kiln_contracts.schemas import SCHEMA_DIR

TITLE = "Kiln"
VERSION = "1"


def _handler(model: type[Any]) -> Any:
    async def handle(message: Any) -> None:  # pragma: no cover - never called
        return None

    handle.__annotations__["message"] = model
    return handle


def document() -> dict[str, Any]:
    broker = NatsBroker()
    for service, models in CONSUMES.items():
        for model in models:
            broker.subscriber(
                subjects.kind_filter(model.kind),
                stream=subjects.STREAM,
                title=f"{service}:{model.kind}",
                description=f"{service} consumes {model.__name__}.",
            )(_handler(model))
    for service, models in PUBLISHES.items():
        for model in models:
            broker.publisher(
                subjects.subject("{build_id}", model.kind),
                title=f"{service}:publishes:{model.kind}",
                description=f"{service} publishes {model.__name__}.",
                schema=model,
            )
    spec = AsyncAPI(
        broker,
        title=TITLE,
        version=VERSION,
        description="Kiln's services and the messages they exchange over NATS JetStream.",
    )
    doc: dict[str, Any] = json.loads(spec.to_specification().to_json())
    return doc


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def write(path: Path = SCHEMA_DIR / "asyncapi.json") -> Path:
    path.write_text(render())
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR / "asyncapi.json"))
