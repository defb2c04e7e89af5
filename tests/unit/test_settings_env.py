"""Every environment variable the docs and deploy/ name still sets a service's setting: the
names users set are read through pydantic-settings itself, with nothing else in the environment."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from kiln_agent.settings import AgentSettings
from kiln_budget.settings import BudgetSettings
from kiln_gateway.settings import GatewaySettings
from kiln_sandbox.settings import SandboxSettings
from kiln_snapshot.settings import SnapshotSettings
from kiln_webhooks.settings import WebhooksSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "agent": AgentSettings,
    "sandbox": SandboxSettings,
    "budget": BudgetSettings,
    "snapshot": SnapshotSettings,
    "webhooks": WebhooksSettings,
}

# Named in the docs or deploy/, and read by something other than the services' settings.
NOT_SETTINGS = {
    "KILN_CONFIG": "kiln_runtime.config: tiers and prices",
    "KILN_TRACE_DIR": "kiln_runtime.tracing",
    "KILN_API_KEY": "the kiln CLI",
    "KILN_UPDATE_DOCS_SCREENSHOT": "the dashboard's e2e test",
    "AWS_ACCESS_KEY_ID": "botocore's credentials",
    "AWS_SECRET_ACCESS_KEY": "botocore's credentials",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "OpenTelemetry's exporter",
    "KILN_DLQ": "not a variable: the dead-letter stream",
    "KILN_BUDGET_GATES": "not a variable: the budget gates' key-value bucket",
    "KV_KILN_BUDGET_GATES": "not a variable: the stream of the budget gates' bucket",
    "MAX_AGE_S": "not a variable: the streams' retention in kiln_contracts",
    "CLOCK_SLACK_S": "not a variable: a constant of the snapshot's collector",
    "PREFIX_OR_ID": "not a variable: an argument of `kiln keys revoke`",
    "KILN_SETUP_NATS_USER": "the set-up step's NATS user (kiln up, kiln_runtime.setup)",
    "KILN_SETUP_NATS_PASSWORD": "the set-up step's NATS password (kiln up, kiln_runtime.setup)",
    "CHAOS_BUILDS": "not a variable: `make chaos-cluster CHAOS_BUILDS=…`",
    "CHAOS_KILLS": "not a variable: `make chaos-cluster CHAOS_KILLS=…`",
    "OUTAGE_S": "not a variable: `make outages OUTAGE_S=…`",
    "TEST_WORKERS": "not a variable: `make test TEST_WORKERS=…`",
}
# Every variable each service reads, documented or not; none may stop setting its field.
COMMON = {
    *("NATS_URL", "KILN_NATS_URL", "NATS_USER", "NATS_PASSWORD", "KILN_LOG_LEVEL", "LOG_LEVEL"),
    *("KILN_LOG_JSON", "KILN_ACK_WAIT_S", "KILN_MAX_DELIVER", "KILN_HEALTH_PORT"),
    *("KILN_SHUTDOWN_GRACE_S", "KILN_MEMORY_TRIM", "KILN_STREAM_REPLICAS", "KILN_HEALTH_STALL_S"),
    *("KILN_NATS_PING_INTERVAL_S", "KILN_GC_THRESHOLDS"),
}
DATABASE = {"DATABASE_URL", "KILN_DATABASE_URL"}
S3 = {
    "S3_ENDPOINT_URL",
    "KILN_S3_ENDPOINT_URL",
    "KILN_S3_BUCKET",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
}
READ = {
    "gateway": COMMON
    | DATABASE
    | S3
    | {
        *("KILN_GATEWAY_HOST", "KILN_GATEWAY_PORT", "KILN_GATEWAY_DB_SCHEMA", "KILN_DEV_API_KEY"),
        *("KILN_DEV_USER", "KILN_DEV_TIER", "KILN_GATEWAY_PROJECTION_DURABLE"),
        *("KILN_SSE_HEARTBEAT_S", "KILN_MAX_BODY_BYTES", "KILN_REPUBLISH_EVERY_S"),
        *("KILN_GATEWAY_BUDGET_TIMEOUT_S", "KILN_S3_TIMEOUT_S", "KILN_ADMIN_API_KEY"),
        *("KILN_TOKEN_SECRET", "KILN_STREAM_TOKEN_TTL_S", "KILN_ASYNCAPI_PATH"),
        *("KILN_SNAPSHOT_FILE_MAX_BYTES", "KILN_SNAPSHOT_DIFF_MAX_BYTES"),
        "KILN_SNAPSHOT_MANIFEST_CACHE",
        "KILN_GATEWAY_WEBHOOKS_TIMEOUT_S",
        *("KILN_PREVIEW_TOKEN_TTL_S", "KILN_PREVIEW_REFUSED_PORTS"),
    },
    "agent": COMMON
    | DATABASE
    | {
        *("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "KILN_MODEL_TIMEOUT_S", "KILN_AGENT_CONFIG"),
        *("KILN_AGENT_WORKERS", "KILN_AGENT_LEASE_S", "KILN_AGENT_DB_POOL"),
        *("KILN_AGENT_TURN_CACHE_MB", "KILN_AGENT_TURN_CACHE_BUILDS", "KILN_AGENT_GATES_TIMEOUT_S"),
        *("KILN_AGENT_WATCHDOG_IDLE_S", "KILN_AGENT_WATCHDOG_RETRIES"),
        "KILN_AGENT_WATCHDOG_INTERVAL_S",
        "KILN_AGENT_UVLOOP",
    },
    "sandbox": COMMON
    | DATABASE
    | {
        *("KILN_SANDBOX_ROOT", "KILN_SANDBOX_PROVIDER", "KILN_SANDBOX_MAX_WORKERS"),
        "KILN_SANDBOX_UVLOOP",
        *("KILN_SANDBOX_EXEC_LOG", "KILN_SANDBOX_LEASE_S", "E2B_API_KEY", "KILN_E2B_TEMPLATE"),
        *("KILN_E2B_WORKDIR", "KILN_E2B_IDLE_TIMEOUT_S", "KILN_E2B_REQUEST_TIMEOUT_S"),
        "KILN_E2B_REUSE_S",
        *("KILN_E2B_MAX_LIFETIME_S", "E2B_API_URL", "E2B_SANDBOX_URL"),
    },
    "budget": COMMON
    | {
        *("REDIS_URL", "KILN_REDIS_URL", "KILN_REDIS_TIMEOUT_S", "KILN_BUDGET_WORKERS"),
        *("KILN_BUDGET_PERIOD_S", "KILN_BUDGET_PERIODS_PER_CYCLE"),
        "KILN_BUDGET_DEMO_ALLOWANCE_USD",
    },
    "snapshot": COMMON
    | S3
    | {
        *("KILN_SNAPSHOT_EXCLUDES", "KILN_S3_CONNECT_TIMEOUT_S", "KILN_S3_READ_TIMEOUT_S"),
        *("KILN_S3_MAX_ATTEMPTS", "KILN_PRESIGN_EXPIRY_S", "KILN_MANIFEST_TIMEOUT_S"),
        *("KILN_UPLOAD_TIMEOUT_S", "KILN_UPLOAD_BATCH", "KILN_SNAPSHOT_WORKERS"),
        *("KILN_SNAPSHOT_KEEP", "KILN_SNAPSHOT_MAX_S", "KILN_SNAPSHOT_GC_GRACE_S"),
        *("KILN_SNAPSHOT_GC_SWEEP_S", "KILN_SNAPSHOT_GC_INTERVAL_S"),
    },
    "webhooks": COMMON
    | DATABASE
    | {
        *("KILN_WEBHOOKS_DB_SCHEMA", "KILN_WEBHOOKS_DURABLE", "KILN_WEBHOOKS_RETRY_SCHEDULE_S"),
        *("KILN_WEBHOOKS_DISABLE_AFTER_S", "KILN_WEBHOOKS_CONCURRENCY", "KILN_WEBHOOKS_POLL_S"),
        *("KILN_WEBHOOKS_LEASE_S", "KILN_WEBHOOKS_CONNECT_TIMEOUT_S"),
        *("KILN_WEBHOOKS_RESPONSE_TIMEOUT_S", "KILN_WEBHOOKS_MAX_RESPONSE_BYTES"),
        *("KILN_WEBHOOKS_ALLOWED_NETWORKS", "KILN_WEBHOOKS_ALLOW_HTTP"),
        *("KILN_WEBHOOKS_RESOLVE_TIMEOUT_S", "KILN_WEBHOOKS_MAX_ENDPOINTS"),
    },
}
NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
# One of these suits every field: a string, a bool either way, a provider, numbers in range, three numbers.
PROBES = ("sample-value", "true", "false", "e2b", "2", "100", "1,2,3")


def names_in(text: str) -> set[str]:
    return set(NAME.findall(text))


def in_service_readme(service: str) -> set[str]:
    return names_in((ROOT / "services" / service / "README.md").read_text())


@functools.cache
def in_docs() -> set[str]:
    return names_in((ROOT / "README.md").read_text()) | names_in(
        (ROOT / "docs" / "OPERATIONS.md").read_text()
    )


@functools.cache
def in_deploy() -> set[str]:
    """What deploy/ sets in the services' environment (compose, the manifests, kiln-env)."""
    found: set[str] = set()
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for spec in compose["services"].values():
        if "kiln_" in " ".join(spec.get("command", [])):
            found |= set(spec["environment"])
    for path in (ROOT / "deploy" / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Deployment" and path.parent.name == "base":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    found |= {e["name"] for e in container.get("env", [])}
            for generator in doc.get("configMapGenerator", []):
                if generator["name"] == "kiln-env":
                    found |= {literal.split("=", 1)[0] for literal in generator["literals"]}
            for patch in doc.get("patches", []):
                found |= set(re.findall(r"name: ([A-Z][A-Z0-9_]+)", patch.get("patch", "")))
    return found


@pytest.fixture(autouse=True)
def bare_environment(monkeypatch):
    """Nothing from the test run's environment (the suite sets AWS_DEFAULT_REGION, for one)."""
    for name in list(os.environ):
        if name.startswith("KILN_") or name in in_docs() | in_deploy() | COMMON | DATABASE | S3:
            monkeypatch.delenv(name)


def fields_set_by(name: str, cls: type[BaseSettings], monkeypatch) -> set[str]:
    base = cls()
    changed: set[str] = set()
    for probe in PROBES:
        monkeypatch.setenv(name, probe)
        try:
            settings = cls()
        except ValidationError:
            continue  # read, but not a value this field takes: another probe is
        changed |= {f for f in cls.model_fields if getattr(settings, f) != getattr(base, f)}
    monkeypatch.delenv(name)
    return changed


@pytest.mark.parametrize(
    ("service", "name"),
    sorted(
        (service, name)
        for service in SETTINGS
        for name in in_service_readme(service) - set(NOT_SETTINGS)
    ),
)
def test_each_variable_of_a_service_readme_sets_a_field_of_that_service(service, name, monkeypatch):
    assert fields_set_by(name, SETTINGS[service], monkeypatch), f"{name} sets nothing in {service}"


@pytest.mark.parametrize("name", sorted((in_docs() | in_deploy()) - set(NOT_SETTINGS)))
def test_each_variable_of_the_docs_and_deploy_sets_a_field(name, monkeypatch):
    assert any(fields_set_by(name, cls, monkeypatch) for cls in SETTINGS.values()), (
        f"{name} is documented or deployed but sets no service's settings"
    )


def test_a_variable_sets_only_its_own_field(monkeypatch):
    assert fields_set_by("KILN_AGENT_WORKERS", AgentSettings, monkeypatch) == {"agent_workers"}
    assert fields_set_by("NATS_URL", GatewaySettings, monkeypatch) == {"nats_url"}
    assert fields_set_by("KILN_NATS_URL", GatewaySettings, monkeypatch) == {"nats_url"}
    assert fields_set_by("KILN_SANDBOX_PROVIDER", SandboxSettings, monkeypatch) == {
        "sandbox_provider"
    }
    assert fields_set_by("KILN_NOT_A_SETTING", GatewaySettings, monkeypatch) == set()
    # A bare field name is no variable (a platform's PORT or a shell's HOST moves nothing).
    for cls, bare in [
        (GatewaySettings, "PORT"),
        (GatewaySettings, "HOST"),
        (GatewaySettings, "GATEWAY_PORT"),
        (AgentSettings, "WORKERS"),
        (SnapshotSettings, "KEEP"),
        (SandboxSettings, "PROVIDER"),
        (BudgetSettings, "ACK_WAIT_S"),
    ]:
        assert fields_set_by(bare, cls, monkeypatch) == set(), bare


def test_a_field_is_its_variable_less_the_prefix_unless_it_names_another():
    for cls in SETTINGS.values():
        for name, field in cls.model_fields.items():
            if field.validation_alias is None:
                assert f"KILN_{name.upper()}" in set().union(*READ.values()), name


@pytest.mark.parametrize(
    ("service", "name"), sorted((service, name) for service in READ for name in READ[service])
)
def test_each_variable_a_service_reads_sets_one_of_its_fields(service, name, monkeypatch):
    assert len(fields_set_by(name, SETTINGS[service], monkeypatch)) == 1


@pytest.mark.parametrize(
    ("first", "second", "field"),
    [
        ("NATS_URL", "KILN_NATS_URL", "nats_url"),
        ("DATABASE_URL", "KILN_DATABASE_URL", "database_url"),
        ("S3_ENDPOINT_URL", "KILN_S3_ENDPOINT_URL", "s3_endpoint_url"),
        ("AWS_REGION", "AWS_DEFAULT_REGION", "region"),
        ("KILN_LOG_LEVEL", "LOG_LEVEL", "log_level"),
    ],
)
def test_of_two_names_for_one_field_the_first_wins(first, second, field, monkeypatch):
    monkeypatch.setenv(first, "first")
    monkeypatch.setenv(second, "second")
    assert getattr(GatewaySettings(), field) == "first"
    monkeypatch.delenv(first)
    assert getattr(GatewaySettings(), field) == "second"


def test_redis_url_and_its_kiln_name(monkeypatch):
    monkeypatch.setenv("KILN_REDIS_URL", "redis://second")
    assert BudgetSettings().redis_url == "redis://second"
    monkeypatch.setenv("REDIS_URL", "redis://first")
    assert BudgetSettings().redis_url == "redis://first"
