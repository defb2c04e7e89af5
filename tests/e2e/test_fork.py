"""Fork and rollback end to end (every service a process, the scripted model, driven over HTTP like
a user): a completed build forked at an iteration k gives a new build whose files are the
snapshot of iteration k (the newest taken at k or before) byte for byte, whose conversation is
the original's up to k, and which goes on from there to completion, though it was asked for while
the agent and the snapshot service were down (SIGKILLed) and the agent was SIGKILLed again with
its first call out; the original is untouched; the fork's
BuildRequested delivered twice makes one fork."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import nats
import pytest
from typer.testing import CliRunner

from kiln_cli import main
from kiln_contracts import bucket
from kiln_devstack.host import wait_for
from kiln_devstack.stack import DEV_API_KEY, Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_build_end_to_end import BRIEF, _settled, stream_history
from tests.e2e.test_conversation import events, files, of, summary

pytestmark = pytest.mark.e2e

HEADERS = {"Authorization": f"Bearer {DEV_API_KEY}"}


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_SANDBOX_EXEC_LOG": str(data_dir / "exec.jsonl"),
            "KILN_SCRIPTED_LATENCY_S": "0.3",
            "KILN_S3_BUCKET": f"kiln-fork-{uuid.uuid4().hex[:8]}",
            "KILN_SNAPSHOT_KEEP": "20",  # every snapshot of the short build stays
            # a SIGKILLed replica's messages come back after 5 s
            "KILN_ACK_WAIT_S": "5",
            "KILN_SANDBOX_LEASE_S": "5",
        }

    with own_stack(infra, "fork", env) as s:
        yield s


def wait_status(client: httpx.Client, stack: Stack, build_id: str, status: str) -> dict:
    deadline = time.monotonic() + 240
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(f"/v1/builds/{build_id}").json()
        if body.get("status") == status:
            return body
        if body.get("status") in ("failed", "cancelled", "rejected") and status == "completed":
            raise AssertionError(
                f"build {build_id} ended: {body}\n" + "\n".join(summary(events(stack, build_id)))
            )
        time.sleep(0.25)
    raise AssertionError(f"build {build_id} did not reach {status}: {body}")


def manifests(s3: Any, name: str, build_id: str) -> dict[str, dict[str, Any]]:
    """The build's manifests in S3: snapshot id -> the manifest document."""
    listed = s3.list_objects_v2(Bucket=name, Prefix=bucket.manifests_prefix(build_id))
    out = {}
    for obj in listed.get("Contents", []):
        doc = json.loads(s3.get_object(Bucket=name, Key=obj["Key"])["Body"].read())
        out[doc["snapshot_id"]] = doc
    return out


def final_snapshot(client: httpx.Client, stack: Stack, build_id: str) -> None:
    def saved() -> bool:
        ends = of(events(stack, build_id), "build_completed")
        last = client.get(f"/v1/builds/{build_id}").json().get("last_snapshot_id")
        return bool(ends) and last == ends[-1]["final_checkpoint_id"]

    wait_for(saved, "the final snapshot in the read model", 60)


def test_a_fork_at_iteration_k_has_its_files_and_goes_on_to_completion(stack: Stack) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["S3_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    name = stack.env["KILN_S3_BUCKET"]
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        created = client.post("/v1/builds", json={"idea_brief": BRIEF})
        assert created.status_code == 201, created.text
        source = created.json()["build_id"]
        done = wait_status(client, stack, source, "completed")
        final_snapshot(client, stack, source)
        source_history = events(stack, source)
        _, source_files = files(client, source)

        # k: the iteration after the package was written (its tests then ran and failed): the
        # newest snapshot at k or before is the one of the writes, whose code still has the bug
        snaps = manifests(s3, name, source)
        first = min(snaps.values(), key=lambda d: d["iteration"])
        k = first["iteration"] + 1
        assert k < done["iteration"]
        assert not [d for d in snaps.values() if first["iteration"] < d["iteration"] <= k]

        # fork it while the agent and the snapshot service are down (SIGKILLed); the agent comes
        # back first and is SIGKILLed again once the fork's first call is out, which the sandbox
        # cannot run until the snapshot service is back (it never gives a fork an empty sandbox)
        for victim in ("agent", "snapshot"):
            stack.kill(victim, signal.SIGKILL)
        forked = client.post(
            f"/v1/builds/{source}/fork",
            json={"iteration": k},
            headers={"Idempotency-Key": f"fork-{uuid.uuid4().hex}"},
        )
        assert forked.status_code == 201, forked.text
        fork = forked.json()["build_id"]
        assert forked.headers["location"] == f"/v1/builds/{fork}"
        assert forked.json()["forked_from"] == {
            "build_id": source,
            "iteration": k,
            "snapshot_id": first["snapshot_id"],
        }
        assert forked.json()["iteration"] in (0, k)  # projected at k once its request is read
        stack.start_service("agent")
        wait_for(lambda: of(events(stack, fork), "tool_call"), "the fork's first call", 60)
        assert not of(events(stack, fork), "tool_result")  # no files without the snapshot service
        stack.kill("agent", signal.SIGKILL)
        stack.start_service("agent")
        stack.start_service("snapshot")

        finished = wait_status(client, stack, fork, "completed")
        assert "all tests pass" in finished["summary"]
        final_snapshot(client, stack, fork)
        history = events(stack, fork)
        trail = "\n".join(summary(history))

        # the fork's first snapshot: iteration k's files, byte for byte (the same manifest,
        # naming the same blobs, whose bytes are those files)
        [seeded] = [e for e in of(history, "snapshot_saved") if e["reason"] == "fork"]
        copy = manifests(s3, name, fork)[seeded["snapshot_id"]]
        assert copy["iteration"] == k
        assert copy["forked_from"] == {"build_id": source, "snapshot_id": first["snapshot_id"]}
        for part in ("entries", "dirs", "symlinks"):
            assert copy[part] == first[part], part
        for entry in copy["entries"]:
            blob = s3.get_object(Bucket=name, Key=bucket.blob_key(entry["sha256"]))["Body"].read()
            assert (
                hashlib.sha256(blob).hexdigest() == entry["sha256"] and len(blob) == entry["size"]
            )
        # ... the fork's sandbox was restored from it before its first call ran
        restored = of(history, "sandbox_restored")
        assert [r["from_snapshot"] for r in restored] == [seeded["snapshot_id"]], trail
        assert not of(history, "sandbox_started"), trail
        calls = of(history, "tool_call")
        assert calls[0]["iteration"] == k + 1 and calls[0]["tool"] == "read_file", trail
        assert calls[0]["restore_from"]["build_id"] == source
        # it went on from k: iterations k+1, k+2, ... each once, though the agent was killed
        numbers = [e["iteration"] for e in of(history, "iteration_completed")]
        assert numbers == list(range(k + 1, finished["iteration"] + 1)), trail
        assert len(of(history, "build_completed")) == 1
        # no call ran twice (the sandbox's execution log)
        log = stack.data_dir / "exec.jsonl"
        runs = Counter(
            (x["build_id"], x["call_id"]) for x in map(json.loads, log.read_text().splitlines())
        )
        assert all(n == 1 for n in runs.values()), runs.most_common(3)
        assert {c["call_id"] for c in calls if c["tool"] != "narrate"} <= {
            c for b, c in runs if b == fork
        }
        # its final files: the original's (the same fix on the same code), the original untouched
        _, fork_files = files(client, fork)
        assert fork_files == source_files
        assert events(stack, source) == source_history
        after = client.get(f"/v1/builds/{source}").json()
        assert (after["status"], after["iteration"]) == ("completed", done["iteration"])

    fork_delivered_twice(stack, fork, source)


def test_rolling_a_working_build_back_goes_on_in_a_fork_and_cancels_it(stack: Stack) -> None:
    """``kiln rollback`` while the build works: a fork at the iteration that wrote the package
    (its snapshot waited for if still being written), the build cancelled; the fork completes."""
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        created = client.post("/v1/builds", json={"idea_brief": BRIEF})
        build_id = created.json()["build_id"]
        wait_for(
            lambda: client.get(f"/v1/builds/{build_id}").json()["iteration"] >= 3,
            "the build's third iteration",
            120,
        )
        env = {"KILN_URL": stack.gateway_url, "KILN_API_KEY": DEV_API_KEY}
        env["KILN_CONFIG_FILE"] = str(stack.data_dir / "no-config.toml")
        rolled = CliRunner().invoke(main.app, ["rollback", build_id, "--to", "2"], env=env)
        assert rolled.exit_code == 0, rolled.output
        new_id = rolled.stdout.split()[1]
        assert f"continue in build {new_id} (was {build_id}, now at iteration 2)" in rolled.stdout
        ended = client.get(f"/v1/builds/{build_id}").json()
        assert ended["status"] in ("running", "cancelled", "completed")  # cancelled, or done first
        if f"build {build_id} cancelled" in rolled.stdout:
            wait_status(client, stack, build_id, "cancelled")
        finished = wait_status(client, stack, new_id, "completed")
        assert "all tests pass" in finished["summary"]
        assert finished["forked_from"]["build_id"] == build_id
        assert finished["forked_from"]["iteration"] == 2
        history = events(stack, new_id)
        calls = of(history, "tool_call")
        # it goes on from the package written at iteration 2: its tests run next
        assert (calls[0]["iteration"], calls[0]["tool"]) == (3, "bash"), "\n".join(summary(history))
        numbers = [e["iteration"] for e in of(history, "iteration_completed")]
        assert numbers == list(range(3, finished["iteration"] + 1))


def fork_delivered_twice(stack: Stack, fork: str, source: str) -> None:
    """The fork's BuildRequested again with a fresh message id: one fork still (no new turn, no
    model call, no snapshot, nothing for the source)."""
    nats_url = stack.env["NATS_URL"]
    before = asyncio.run(stream_history(nats_url, fork))
    source_before = asyncio.run(stream_history(nats_url, source))
    [(subject, data, headers)] = [b for b in before if b[0].endswith(".build_requested")]

    async def replay() -> None:
        nc = await nats.connect(nats_url)
        try:
            headers["Nats-Msg-Id"] = f"replay-{uuid.uuid4()}"
            await nc.jetstream().publish(subject, data, headers=headers)
        finally:
            await nc.close()

    asyncio.run(replay())
    wait_for(lambda: asyncio.run(_settled(nats_url)), "consumers to drain the replay", 60)
    after = asyncio.run(stream_history(nats_url, fork))
    assert len(after) == len(before) + 1, [s for s, _, _ in after[len(before) :]]
    assert len(asyncio.run(stream_history(nats_url, source))) == len(source_before)
