"""A build with sandbox provider ``e2b``: the real ``e2b`` SDK against the local E2B-compatible
server the stack starts (no E2B key), every service a process. The tools run in E2B sandboxes,
snapshots go sandbox -> S3 through presigned URLs, the build sleeps (its sandbox paused) and wakes
(resumed), and a sandbox killed mid-build through E2B's API is replaced by one restored from the
latest snapshot, byte for byte; the build completes and leaves no sandbox on E2B."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from kiln_devstack.stack import DEV_API_KEY, Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_build_end_to_end import BRIEF, stream_history

pytestmark = pytest.mark.e2e

HEADERS = {"Authorization": f"Bearer {DEV_API_KEY}"}
PERIOD_S = 30


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_SANDBOX_PROVIDER": "e2b",
            "E2B_API_KEY": "",  # the stack starts the local E2B server
            "KILN_BUDGET_PERIOD_S": str(PERIOD_S),
            "KILN_BUDGET_DEMO_ALLOWANCE_USD": "0.008",  # runs out mid-build: it sleeps
            "KILN_SCRIPTED_LATENCY_S": "1.5",  # a build long enough to be interrupted
        }

    with own_stack(infra, "e2b", env) as s:
        yield s


def _history(stack: Stack, build_id: str) -> list[tuple[str, dict]]:
    stored = asyncio.run(stream_history(stack.env["NATS_URL"], build_id))
    return [(subject.rsplit(".", 1)[1], json.loads(data)) for subject, data, _ in stored]


def _e2b_sandboxes(stack: Stack, build_id: str) -> list[dict]:
    r = httpx.get(
        f"{stack.env['E2B_API_URL']}/v2/sandboxes",
        params={"metadata": f"kiln_build_id={build_id}", "state": "running,paused"},
        headers={"X-API-KEY": stack.env["E2B_API_KEY"]},
        timeout=10,
    )
    r.raise_for_status()
    return list(r.json())


def test_a_build_on_e2b_sleeps_wakes_survives_a_killed_sandbox_and_completes(stack: Stack):
    assert stack.env["E2B_API_URL"].startswith("http://127.0.0.1:")
    time.sleep(PERIOD_S - time.time() % PERIOD_S + 0.2)  # the allowance runs out before the reset
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        created = client.post("/v1/builds", json={"idea_brief": BRIEF})
        assert created.status_code == 201, created.text
        build_id = created.json()["build_id"]

        # Once a snapshot exists, kill the build's sandbox through E2B's API (a crash).
        killed, status = None, ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            stack.check_alive()
            status = client.get(f"/v1/builds/{build_id}").json()["status"]
            if status in ("completed", "failed", "cancelled"):
                break
            if killed is None and any(k == "snapshot_saved" for k, _ in _history(stack, build_id)):
                for sb in _e2b_sandboxes(stack, build_id):
                    r = httpx.delete(
                        f"{stack.env['E2B_API_URL']}/sandboxes/{sb['sandboxID']}",
                        headers={"X-API-KEY": stack.env["E2B_API_KEY"]},
                        timeout=10,
                    )
                    assert r.status_code == 204, r.text
                    killed = sb["sandboxID"]
            time.sleep(0.25)
        assert status == "completed", status
        assert killed is not None, " ".join(k for k, _ in _history(stack, build_id))

        history = _history(stack, build_id)
        kinds = [k for k, _ in history]
        for kind in ("sandbox_started", "build_sleeping", "build_resumed", "sandbox_restored"):
            assert kind in kinds, f"{kind} missing from {kinds}"
        started = next(b for k, b in history if k == "sandbox_started")
        assert started["provider"] == "e2b"
        stopped = [b["reason"] for k, b in history if k == "sandbox_stopped"]
        assert any(r.startswith("build sleeping") for r in stopped), stopped  # paused on E2B
        restored = [b for k, b in history if k == "sandbox_restored"]
        assert restored[0]["provider"] == "e2b" and restored[0]["sandbox_id"] != killed
        saved_before = [
            b["snapshot_id"]
            for k, b in history[: kinds.index("sandbox_restored")]
            if k == "snapshot_saved"
        ]
        assert restored[0]["from_snapshot"] == saved_before[-1]  # the latest one

        # Byte for byte: every file of the snapshot the fresh sandbox was restored from that the
        # build did not write again afterwards is in the final snapshot with the same digest.
        def final_id() -> str | None:
            return next(
                (b["snapshot_id"] for k, b in _history(stack, build_id)
                 if k == "snapshot_saved" and b["reason"] == "final"),
                None,
            )  # fmt: skip

        end = time.monotonic() + 60
        while final_id() is None:
            assert time.monotonic() < end, "no final snapshot"
            time.sleep(0.5)
        history = _history(stack, build_id)
        after = history[[k for k, _ in history].index("sandbox_restored") :]
        rewritten = {
            b["input"].get("path")
            for k, b in after
            if k == "tool_call" and b["tool"] in ("write_file", "edit_file")
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=stack.env["S3_ENDPOINT_URL"],
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
        bucket = stack.env.get("KILN_S3_BUCKET", "kiln-snapshots")

        def manifest(snapshot_id: str | None) -> dict[str, str]:
            key = f"builds/{build_id}/manifests/{snapshot_id}.json"
            body = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            return {e["path"]: e["sha256"] for e in body["entries"] if e.get("sha256")}

        source, final = manifest(restored[0]["from_snapshot"]), manifest(final_id())
        assert source, "the restored snapshot has no files"
        kept = {p: d for p, d in source.items() if p not in rewritten}
        assert kept and {p: final.get(p) for p in kept} == kept
        files = client.get(f"/v1/builds/{build_id}/files", timeout=60)
        assert files.status_code == 200 and files.content, files.text
    # and no sandbox of the build is left on E2B after its final snapshot
    end = time.monotonic() + 30
    while _e2b_sandboxes(stack, build_id):
        assert time.monotonic() < end, _e2b_sandboxes(stack, build_id)
        time.sleep(0.5)
