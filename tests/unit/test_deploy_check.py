"""`make deploy-check` as a test: every overlay renders and validates; the checks do catch mistakes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))
import check  # noqa: E402


@pytest.fixture(scope="module")
def prod() -> list[dict[str, Any]]:
    return check.render(check.OVERLAYS / "prod")


def test_deploy_check_passes():
    assert check.check() == []


def test_every_overlay_is_checked():
    assert {"dev", "prod"} <= {p.name for p in check.OVERLAYS.iterdir() if p.is_dir()}


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_kubernetes_schemas_reject_an_unknown_field_and_a_wrong_type(prod):
    docs = copy.deepcopy(prod)
    dep = _find(docs, "Deployment", "agent")
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in check.validate_schemas([dep]))
    dep = copy.deepcopy(_find(prod, "Deployment", "gateway"))
    dep["spec"]["replicas"] = "two"
    assert check.validate_schemas([dep])


def test_scaled_objects_are_validated_and_unknown_kinds_fail(prod):
    scaled = copy.deepcopy(_find(prod, "ScaledObject", "agent"))
    assert check.validate_schemas([scaled]) == []
    del scaled["spec"]["triggers"][0]["metadata"]["consumer"]
    assert any("consumer" in e for e in check.validate_schemas([scaled]))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("no schema" in e for e in check.validate_schemas([unknown]))


@pytest.mark.parametrize(
    "break_it",
    [
        lambda pod: pod["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
        lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        lambda pod: pod["securityContext"].pop("runAsNonRoot"),
        lambda pod: pod.update(automountServiceAccountToken=True),
        lambda pod: pod["containers"][0].pop("livenessProbe"),
        lambda pod: pod["containers"][0].pop("resources"),
    ],
)
def test_hardening_rules_catch_a_weakened_pod(prod, break_it):
    docs = copy.deepcopy(prod)
    break_it(_find(docs, "Deployment", "sandbox")["spec"]["template"]["spec"])
    assert check.check_hardening(docs, "prod")


def test_probes_must_ask_the_health_endpoints_not_the_metrics(prod):
    assert check.check_hardening(prod, "prod") == []
    docs = copy.deepcopy(prod)
    agent = _find(docs, "Deployment", "agent")["spec"]["template"]["spec"]["containers"][0]
    agent["livenessProbe"]["httpGet"]["path"] = "/metrics"
    agent["readinessProbe"]["httpGet"]["port"] = 8080
    gateway = _find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    gateway["readinessProbe"]["httpGet"]["path"] = "/healthz"
    assert check.check_hardening(docs, "prod") == [
        "prod/gateway: readinessProbe must ask /readyz, not /healthz",
        "prod/agent: livenessProbe must ask /livez, not /metrics",
        "prod/agent: readinessProbe must ask port KILN_HEALTH_PORT (9090), not 8080",
    ]


def test_prod_needs_two_replicas_and_json_logs(prod):
    docs = copy.deepcopy(prod)
    _find(docs, "Deployment", "budget")["spec"]["replicas"] = 1
    _find(docs, "ScaledObject", "snapshot")["spec"]["minReplicaCount"] = 1
    errors = check.check_hardening(docs, "prod")
    assert any("prod/budget" in e for e in errors) and any("prod/snapshot" in e for e in errors)


def test_a_committed_secret_is_refused(prod):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {}}
    assert any("Secret/s" in e for e in check.check_hardening([*prod, secret], "prod"))


def test_compose_check_catches_root_and_a_second_image(tmp_path):
    doc = yaml.safe_load(check.COMPOSE.read_text())
    assert check.check_compose() == []
    doc["services"]["budget"]["user"] = "0:0"
    doc["services"]["agent"]["image"] = "other:1"
    doc["services"]["nats"]["image"] = "nats:2.10.0"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    errors = check.check_compose(bad)
    assert any("compose/budget" in e for e in errors)
    assert any("one image" in e for e in errors)
    assert any("compose/nats" in e for e in errors)


def test_the_config_map_ships_the_runtime_tiers_and_prices():
    runtime = ROOT / "libs" / "kiln-runtime" / "src" / "kiln_runtime" / "kiln.yaml"
    assert (check.K8S / "base" / "kiln.yaml").read_text() == runtime.read_text()
