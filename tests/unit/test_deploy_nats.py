"""deploy/nats: the per-service users agree with the contracts, and the generated files are fresh."""

from __future__ import annotations

import sys
from pathlib import Path

from kiln_contracts import BY_KIND, subjects, webhooks
from kiln_contracts.routes import CONSUMES, PUBLISHES

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "nats"))
import render  # noqa: E402

DOC = render.load()
WEBHOOK_RPC = (
    webhooks.CREATE,
    webhooks.LIST,
    webhooks.GET,
    webhooks.UPDATE,
    webhooks.DELETE,
    webhooks.ROTATE,
    webhooks.DELIVERIES,
    webhooks.REDELIVER,
)
SERVICES = DOC["services"]


def consumed_by(spec: dict) -> set[str]:
    """The kinds a service's durable consumers of named kinds take."""
    kinds = set(spec.get("consumes", []))
    for listed in spec.get("consumes_kinds", {}).values():
        kinds |= set(listed)
    return kinds


def test_generated_files_are_up_to_date():
    stale = [
        str(path.relative_to(ROOT))
        for path, text in render.outputs().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `uv run --frozen python deploy/nats/render.py`: stale {stale}"


def test_permissions_name_real_kinds_streams_and_rpc_subjects():
    assert (DOC["stream"], DOC["dlq_stream"]) == (subjects.STREAM, subjects.DLQ_STREAM)
    rpc = {
        subjects.SANDBOX_MANIFEST,
        subjects.SANDBOX_UPLOAD,
        subjects.SNAPSHOT_RESTORE_PLAN,
        subjects.BUDGET_STATUS,
        *WEBHOOK_RPC,
    }
    assert DOC["gates_bucket"] == subjects.BUDGET_GATES
    assert set(SERVICES) == {"gateway", "agent", "sandbox", "budget", "snapshot", "webhooks"}
    assert set(SERVICES["webhooks"]["serves"]) == set(WEBHOOK_RPC)
    assert set(WEBHOOK_RPC) <= set(SERVICES["gateway"]["requests"])
    for name, spec in SERVICES.items():
        for kind in [*spec.get("publishes", []), *consumed_by(spec)]:
            assert kind in BY_KIND, f"{name}: unknown kind {kind}"
        assert set(spec.get("requests", [])) <= rpc
        assert set(spec.get("serves", [])) <= rpc


def test_only_the_budget_writes_the_gates_and_the_agent_watches_them():
    bucket = DOC["gates_bucket"]
    access = {name: spec.get("gates") for name, spec in SERVICES.items()}
    assert access == {
        "gateway": "read",
        "agent": "watch",
        "sandbox": None,
        "budget": "write",
        "snapshot": None,
        "webhooks": None,
    }
    for name, spec in SERVICES.items():
        allowed = render.permissions(name, spec, DOC)["publish"]["allow"]
        assert (f"$KV.{bucket}.>" in allowed) == (name == "budget"), name
        assert (f"$JS.API.STREAM.MSG.GET.KV_{bucket}" in allowed) == (access[name] is not None)


def test_every_consumed_kind_has_a_publisher_and_every_rpc_a_server():
    published = {k for spec in SERVICES.values() for k in spec.get("publishes", [])}
    consumed = {k for spec in SERVICES.values() for k in consumed_by(spec)}
    assert consumed <= published
    served = {s for spec in SERVICES.values() for s in spec.get("serves", [])}
    requested = {s for spec in SERVICES.values() for s in spec.get("requests", [])}
    assert requested <= served


def test_each_service_publishes_and_consumes_what_the_routes_say():
    for name, spec in SERVICES.items():
        assert set(spec["publishes"]) == {m.kind for m in PUBLISHES[name]}, name
        if spec.get("consumes_all"):
            continue  # one consumer for every kind (the gateway's projection)
        assert consumed_by(spec) == {m.kind for m in CONSUMES[name]}, name


def test_durables_follow_the_bus_naming():
    assert render.durable("agent", "tool_result") == "agent-tool-result"
    assert "sandbox-tool-call" in render.durables("sandbox", SERVICES["sandbox"])
    assert "gateway-projection" in render.durables("gateway", SERVICES["gateway"])


def test_no_password_is_committed():
    for text in render.outputs().values():
        for line in text.splitlines():
            if "password:" in line:
                assert "$KILN_NATS_PASSWORD_" in line, line


def test_only_responders_may_reply_and_only_the_budget_schedules():
    for name, spec in SERVICES.items():
        perms = render.permissions(name, spec, DOC)
        assert perms.get("allow_responses", False) == bool(spec.get("serves"))
        scheduled = "kiln.schedule.>" in perms["publish"]["allow"]
        assert scheduled == (name == "budget")
        assert f"kiln.dlq.{name}.>" in perms["publish"]["allow"]
        assert not any(s in ("kiln.>", "kiln.build.>", ">") for s in perms["publish"]["allow"])


def test_helm_values_pin_a_server_with_message_schedules_in_a_cluster_of_three():
    import yaml

    values = yaml.safe_load((ROOT / "deploy" / "nats" / "values.yaml").read_text())
    major, minor = (
        int(x) for x in values["container"]["image"]["tag"].split("-")[0].split(".")[:2]
    )
    assert (major, minor) >= (2, 12)
    assert values["config"]["cluster"]["replicas"] == 3
    assert values["config"]["jetstream"]["fileStore"]["enabled"] is True
    users = yaml.safe_load(render.VALUES.read_text())
    assert set(users["config"]["merge"]["accounts"]) == {DOC["account"]}
