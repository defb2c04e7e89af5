"""Generate the JSON Schema of every message, and of the snapshot manifest S3 keeps, into
contracts/schemas/ (``python -m kiln_contracts.schemas``).

Non-Python producers validate against these files; a test fails when they are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import subjects
from .bucket import manifest_key
from .gates import BudgetGate
from .manifest import Manifest
from .messages import MESSAGES
from .rpc import RPC_MODELS
from .subjects import subject
from .webhooks import WEBHOOK_MODELS, WebhookPayload

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def render() -> dict[str, str]:
    out: dict[str, str] = {}
    for model in MESSAGES:
        schema = model.model_json_schema()
        schema["$id"] = f"https://kiln.dev/schemas/{model.kind}.json"
        schema["x-kiln-subject"] = subject("{build_id}", model.kind)
        out[f"{model.kind}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    for rpc in RPC_MODELS:
        schema = rpc.model_json_schema()
        out[f"rpc/{rpc.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    schema = Manifest.model_json_schema()
    schema["$id"] = "https://kiln.dev/schemas/s3/Manifest.json"
    schema["x-kiln-key"] = manifest_key("{build_id}", "{snapshot_id}")
    out["s3/Manifest.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    # Key-value values: the budget gates (one per user in bucket KILN_BUDGET_GATES).
    schema = BudgetGate.model_json_schema()
    schema["$id"] = "https://kiln.dev/schemas/kv/budget_gate.json"
    schema["x-kiln-bucket"] = subjects.BUDGET_GATES
    out["kv/budget_gate.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    # Webhooks: the body of a delivery (HTTP, outward) and the gateway's requests and replies.
    for hook_model in WEBHOOK_MODELS:
        schema = hook_model.model_json_schema()
        schema["$id"] = f"https://kiln.dev/schemas/webhooks/{hook_model.__name__}.json"
        if hook_model is WebhookPayload:
            schema["x-kiln-http"] = "POST to a registered endpoint, Standard Webhooks signed"
        out[f"webhooks/{hook_model.__name__}.json"] = (
            json.dumps(schema, indent=2, sort_keys=True) + "\n"
        )
    return out


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for name, text in render().items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(p)
