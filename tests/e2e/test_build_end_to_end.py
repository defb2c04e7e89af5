"""A user's view: all five services as processes, a build posted over HTTP, followed to the end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import nats
import pytest
import redis
from nats.js.api import ConsumerConfig, DeliverPolicy

from kiln_contracts import BY_KIND, subjects
from kiln_contracts.routes import CONSUMES
from kiln_devstack.host import wait_for
from kiln_devstack.stack import DEV_API_KEY, Stack
from tests.e2e.stacks import own_stack

pytestmark = pytest.mark.e2e

BRIEF = """A tiny Python package `textstats` that counts words, lines and characters in a text and
lists the most frequent words, with unit tests."""


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_TRACE_DIR": str(data_dir / "traces"),
            "KILN_SANDBOX_EXEC_LOG": str(data_dir / "exec.jsonl"),
        }

    with own_stack(infra, "e2e", env) as s:
        yield s


def wait_for_status(
    client: httpx.Client,
    stack: Stack,
    build_id: str,
    statuses: set[str],
    timeout: float = 240,
    waits: list[dict] | None = None,
) -> dict:
    """The build once its status is one of ``statuses``; ``waits``: each ``waiting_on`` seen."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        stack.check_alive()
        body = client.get(f"/v1/builds/{build_id}").json()
        if waits is not None and body.get("waiting_on"):
            waits.append(body["waiting_on"])
        if body.get("status") in statuses:
            return body
        time.sleep(0.25)
    raise AssertionError(f"build {build_id} did not reach {statuses}: {body}")


async def _publish_poison(nats_url: str, build_id: str) -> str:
    """Bad messages on every subject a service consumes; returns the server's oversize error."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for kind in BY_KIND:
            subject = subjects.subject(build_id, kind)
            await js.publish(subject, b"{not json")
            envelope = {"build_id": build_id, "user_id": "u", "schema_version": 99}
            await js.publish(subject, json.dumps(envelope).encode())
        await js.publish(subjects.subject(build_id, "no_such_kind"), b"{}")
        try:
            await js.publish(subjects.subject(build_id, "tool_call"), b"x" * (2 * 1024 * 1024))
        except Exception as err:  # the stream refuses it: it never reaches a consumer
            return str(err) or type(err).__name__
        return ""
    finally:
        await nc.close()


async def _dead_letters(nats_url: str, build_id: str) -> Counter[str]:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(
            "kiln.dlq.>",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        seen: Counter[str] = Counter()
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except Exception:
                break
            headers = msg.headers or {}
            if f".{build_id}." in headers.get("Kiln-Original-Subject", ""):
                assert headers.get("Kiln-Dlq-Reason"), msg.subject
                seen[msg.subject] += 1
        return seen
    finally:
        await nc.close()


def test_poison_is_dead_lettered_with_a_reason_and_counted(stack: Stack) -> None:
    """Runs first: the build below then shows every consumer kept serving."""
    nats_url = stack.env["NATS_URL"]
    poisoned = f"poison{uuid.uuid4().hex[:8]}"
    refused = asyncio.run(_publish_poison(nats_url, poisoned))
    assert refused, "a 2 MiB message was accepted by the stream"
    expected: Counter[str] = Counter()
    for service, models in CONSUMES.items():
        for model in models:
            expected[subjects.dlq_subject(service, model.kind)] = 2
    expected[subjects.dlq_subject("gateway", "no_such_kind")] = 1
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and seen != expected:
        seen = asyncio.run(_dead_letters(nats_url, poisoned))
    assert seen == expected
    for service, models in CONSUMES.items():
        text = httpx.get(stack.metrics_url(service), timeout=5).text
        for model in models:
            assert metric(text, "kiln_dead_letters_total", service=service, kind=model.kind) >= 2


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
        waits: list[dict] = []
        final = wait_for_status(
            client, stack, build, {"completed", "failed", "cancelled"}, waits=waits
        )
        assert final["status"] == "completed", final
        # while it ran, the API said what it was waiting on (which of the model and the calls a
        # poll catches depends on timing: the projection itself is tests/unit/test_gateway_waiting)
        assert waits and {w["service"] for w in waits} <= {"agent", "sandbox", "snapshot"}, waits
        assert all(w["what"] and w["seconds"] >= 0 for w in waits), waits
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
            "sandbox_started",
            "build_completed",
        ):  # snapshot_saved may come only after the build's end, where the stream stops: below
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

    # The final snapshot is taken after the build completed: wait for its SnapshotSaved.
    def final_snapshot() -> str | None:
        stored = asyncio.run(stream_history(stack.env["NATS_URL"], build_id))
        saved = [
            json.loads(data) for subject, data, _ in stored if subject.endswith(".snapshot_saved")
        ]
        return next((b["snapshot_id"] for b in saved if b["reason"] == "final"), None)

    wait_for(lambda: final_snapshot() is not None, "the final snapshot saved", timeout=60)
    final_id = final_snapshot()

    # The files are in S3: a manifest for the build whose blobs all exist.
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    bucket = stack.env.get("KILN_S3_BUCKET", "kiln-snapshots")
    manifest_key = f"builds/{build_id}/manifests/{final_id}.json"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    paths = {e["path"] for e in manifest["entries"]}
    assert "textstats/__init__.py" in paths
    for entry in manifest["entries"]:
        s3.head_object(Bucket=bucket, Key=f"blobs/{entry['sha256']}")

    # The API names the build's final snapshot.
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        wait_for(
            lambda: client.get(f"/v1/builds/{build_id}").json().get("last_snapshot_id") == final_id,
            "the final snapshot in the read model",
            timeout=30,
        )


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
    "webhooks": "build_completed",  # whether or not an endpoint wants it
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
    budget = httpx.get(stack.metrics_url("budget"), timeout=5).text
    assert metric(budget, "kiln_model_tokens_total", type="input") > 0
    assert metric(budget, "kiln_model_tokens_total", type="output") > 0
    assert metric(budget, "kiln_model_cost_micro_usd_total") > 0
    gateway = httpx.get(stack.metrics_url("gateway"), timeout=5).text
    assert "kiln_builds_sleeping 0.0" in gateway


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


async def stream_history(nats_url: str, build_id: str) -> list[tuple[str, bytes, dict]]:
    nc = await nats.connect(nats_url.split(","))  # one URL, or a cluster's comma-separated
    try:
        sub = await nc.jetstream().subscribe(
            subjects.build_filter(build_id),
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        out = []
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except Exception:
                break
            out.append((msg.subject, msg.data, dict(msg.headers or {})))
        return out
    finally:
        await nc.close()


async def _settled(nats_url: str) -> bool:
    """Every durable consumer has nothing pending and nothing unacknowledged."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        consumers = await js.consumers_info(subjects.STREAM)
        return all(c.num_pending == 0 and c.num_ack_pending == 0 for c in consumers)
    finally:
        await nc.close()


def test_every_message_delivered_twice_has_one_effect(stack: Stack, build_id: str) -> None:
    """Replay the build's whole history with fresh message ids: the server keeps the copies,
    every consumer gets each message a second time, and nothing changes."""
    replay_changes_nothing(stack, build_id)


def replay_changes_nothing(
    stack: Stack,
    build_id: str,
    fields: tuple[str, ...] = ("status", "iteration", "cost_micro_usd", "summary"),
) -> None:
    """The build's whole history published again with fresh message ids: the stream holds the
    copies and not one message more, and the spend, the tool runs and the read model's
    ``fields`` are as they were."""
    nats_url = stack.env["NATS_URL"]
    spend_key = f"kiln:spend:build:{build_id}"
    store = redis.Redis.from_url(stack.env["REDIS_URL"])
    exec_log = stack.data_dir / "exec.jsonl"
    before = asyncio.run(stream_history(nats_url, build_id))
    spend_before = store.get(spend_key)
    runs_before = exec_log.read_text() if exec_log.exists() else ""
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        status_before = client.get(f"/v1/builds/{build_id}").json()

    async def replay() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for subject, data, headers in before:
                headers["Nats-Msg-Id"] = f"replay-{uuid.uuid4()}"
                await js.publish(subject, data, headers=headers)
        finally:
            await nc.close()

    asyncio.run(replay())
    wait_for(lambda: asyncio.run(_settled(nats_url)), "consumers to drain the replay", 60)

    after = asyncio.run(stream_history(nats_url, build_id))
    # The copies are there, and not one message more: every reaction was a duplicate.
    assert len(after) == 2 * len(before), [s for s, _, _ in after[len(before) * 2 :]]
    assert store.get(spend_key) == spend_before
    assert (exec_log.read_text() if exec_log.exists() else "") == runs_before
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        status_after = client.get(f"/v1/builds/{build_id}").json()
    for field in fields:
        assert status_after.get(field) == status_before.get(field), field
