"""A user's view: all five services as processes, a build posted over HTTP, followed to the end."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import boto3
import httpx
import pytest

from kiln_devstack.infra import free_port
from kiln_devstack.stack import DEV_API_KEY, Stack

pytestmark = pytest.mark.e2e

BRIEF = """A tiny Python package `textstats` that counts words, lines and characters in a text and
lists the most frequent words, with unit tests."""


def own_database(url: str, name: str) -> str:
    """A fresh database on the session's Postgres, so other tests' rows stay out of this stack."""

    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    """The five services as processes, on their own NATS server and database (Redis and S3 shared)."""
    data_dir = Path(tempfile.mkdtemp(prefix="ke-", dir="/tmp"))
    env = {k: v for k, v in infra.items() if k != "NATS_URL"}
    env["DATABASE_URL"] = own_database(infra["DATABASE_URL"], f"e2e_{uuid.uuid4().hex[:8]}")
    env["ANTHROPIC_API_KEY"] = ""  # always the scripted model in tests
    env["KILN_TRACE_DIR"] = str(data_dir / "traces")
    s = Stack(data_dir, gateway_port=free_port(), extra_env=env)
    s.start()
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def wait_for_status(
    client: httpx.Client, stack: Stack, build_id: str, statuses: set[str], timeout: float = 240
) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        stack.check_alive()
        body = client.get(f"/v1/builds/{build_id}").json()
        if body.get("status") in statuses:
            return body
        time.sleep(0.25)
    raise AssertionError(f"build {build_id} did not reach {statuses}: {body}")


HEADERS = {"Authorization": f"Bearer {DEV_API_KEY}"}


@pytest.fixture(scope="module")
def build_id(stack: Stack) -> str:
    """One build, posted over HTTP and followed until it ends."""
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        created = client.post(
            "/v1/builds",
            json={
                "idea_brief": BRIEF,
                "understanding_qna": [
                    {"question": "Which Python version?", "answer": "3.11, standard library only"}
                ],
            },
        )
        assert created.status_code == 201, created.text
        build: str = created.json()["build_id"]
        final = wait_for_status(client, stack, build, {"completed", "failed", "cancelled"})
        assert final["status"] == "completed", final
        return build


def test_a_build_runs_through_every_service_to_a_working_program(
    stack: Stack, build_id: str
) -> None:
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        # The event history, as a user's SSE client sees it.
        kinds: list[str] = []
        results: list[dict] = []
        with client.stream("GET", f"/v1/builds/{build_id}/events", timeout=30) as events:
            for line in events.iter_lines():
                if line.startswith("event:"):
                    kinds.append(line.split(":", 1)[1].strip())
                elif line.startswith("data:") and kinds and kinds[-1] == "tool_result":
                    results.append(json.loads(line.split(":", 1)[1]))
        for kind in (
            "build_requested",
            "tool_call",
            "tool_result",
            "iteration_completed",
            "agent_narrated",
            "checkpoint_saved",
            "snapshot_saved",
            "sandbox_started",
            "build_completed",
        ):
            assert kind in kinds, f"{kind} missing from {kinds}"
        assert kinds[-1] == "build_completed"

    # The program exists in the workspace and its tests pass there.
    workspace = stack.data_dir / "sandboxes" / build_id
    assert (workspace / "textstats" / "__init__.py").is_file()
    run = subprocess.run(
        [sys.executable, "-m", "unittest", "discover", "-s", "tests"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    # A failing test run, then a passing one after the fix (both came back as tool results).
    test_runs = [r for r in results if "Ran " in r["output"] and " test" in r["output"]]
    assert any(r["exit_code"] not in (0, None) for r in test_runs), "no failing test run"
    first_failure = next(i for i, r in enumerate(test_runs) if r["exit_code"] not in (0, None))
    assert any(r["exit_code"] == 0 for r in test_runs[first_failure:]), "no passing run after it"

    # The files are in S3: a manifest for the build whose blobs all exist.
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    bucket = stack.env.get("KILN_S3_BUCKET", "kiln-snapshots")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"builds/{build_id}/manifests/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert keys, "no snapshot manifest in S3"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=sorted(keys)[-1])["Body"].read())
    paths = {e["path"] for e in manifest["entries"]}
    assert "textstats/__init__.py" in paths
    for entry in manifest["entries"]:
        s3.head_object(Bucket=bucket, Key=f"blobs/{entry['sha256']}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


SERVICE_KINDS = {
    "gateway": "build_completed",  # the projection
    "agent": "tool_result",
    "sandbox": "tool_call",
    "budget": "iteration_completed",
    "snapshot": "checkpoint_saved",
}


def test_every_service_exposes_its_metrics(stack: Stack, build_id: str) -> None:
    for service, kind in SERVICE_KINDS.items():
        text = httpx.get(stack.metrics_url(service), timeout=5).text
        handled = metric(
            text, "kiln_messages_handled_total", service=service, kind=kind, outcome="ok"
        )
        assert handled >= 1, f"{service} handled no {kind}"
        assert metric(text, "kiln_handler_seconds_count", service=service, kind=kind) >= 1
        assert "# TYPE kiln_dead_letters_total counter" in text
    sandbox = httpx.get(stack.metrics_url("sandbox"), timeout=5).text
    assert metric(sandbox, "kiln_tool_seconds_count", tool="bash", outcome="ok") >= 1
    assert metric(sandbox, "kiln_tool_seconds_count", tool="write_file") >= 1


def test_one_trace_follows_the_build_through_all_five_services(stack: Stack, build_id: str) -> None:
    trace_dir = stack.data_dir / "traces"
    deadline = time.monotonic() + 30
    services: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        services = {}
        for path in trace_dir.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                span = json.loads(line)
                if span["attributes"].get("kiln.build_id") == build_id:
                    services.setdefault(span["trace_id"], set()).add(span["service"])
        if any(len(s) == 5 for s in services.values()):
            break
        time.sleep(0.2)
    assert len(services) == 1, f"the build's spans are spread over {len(services)} traces"
    (seen,) = services.values()
    assert seen == {f"kiln-{s}" for s in SERVICE_KINDS}
