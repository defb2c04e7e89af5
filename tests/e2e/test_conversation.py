"""A build is a conversation, end to end (every service a process, the scripted model, driven over
HTTP like a user): a message sent while the build works is answered, and a message to the
completed build continues it in a fresh sandbox restored from its final snapshot."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln_devstack.host import wait_for
from kiln_devstack.stack import DEV_API_KEY, Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_build_end_to_end import BRIEF, replay_changes_nothing, stream_history

pytestmark = pytest.mark.e2e

HEADERS = {"Authorization": f"Bearer {DEV_API_KEY}"}
STEER = "add a file STEER.md with steered while it worked"
CONTINUE = "please write CONTINUED.md"


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        # each reply of the scripted model a little slower: the build works long enough to be
        # written to while it does
        return {
            "KILN_SANDBOX_EXEC_LOG": str(data_dir / "exec.jsonl"),
            "KILN_SCRIPTED_LATENCY_S": "0.5",
        }

    with own_stack(infra, "talk", env) as s:
        yield s


def events(stack: Stack, build_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(kind, message) of every message of the build on the stream, in order."""
    return [
        (subject.rsplit(".", 1)[-1], json.loads(data))
        for subject, data, _ in asyncio.run(stream_history(stack.env["NATS_URL"], build_id))
    ]


def summary(history: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The history in short, for a failed assertion: each kind with its gist."""
    out = []
    for kind, body in history:
        gist = body.get("text") or body.get("tool") or body.get("stop_reason") or ""
        if kind == "tool_call":
            gist = f"{gist} {json.dumps(body.get('input'))[:80]} it{body.get('iteration')}"
        out.append(f"{kind} {str(gist)[:100]}")
    return out


def of(history: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [body for k, body in history if k == kind]


def wait_build(client: httpx.Client, stack: Stack, build_id: str, **fields: Any) -> dict:
    deadline = time.monotonic() + 240
    body: dict = {}
    while time.monotonic() < deadline:
        stack.check_alive()
        body = client.get(f"/v1/builds/{build_id}").json()
        if all(body.get(k) == v for k, v in fields.items()):
            return body
        if body.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"build {build_id} ended: {body}")
        time.sleep(0.25)
    raise AssertionError(f"build {build_id} did not reach {fields}: {body}")


def files(client: httpx.Client, build_id: str) -> tuple[str, dict[str, bytes]]:
    """The build's latest snapshot, downloaded as a user does: (snapshot id, path -> bytes)."""
    r = client.get(f"/v1/builds/{build_id}/files")
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        out = {
            m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    return r.headers["x-kiln-snapshot-id"], out


def test_a_build_is_steered_while_it_works_then_continued_after_it_completed(stack: Stack):
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        created = client.post("/v1/builds", json={"idea_brief": BRIEF})
        assert created.status_code == 201, created.text
        build_id = created.json()["build_id"]

        # steering: a message while it works (it has made its first model call)
        wait_for(
            lambda: client.get(f"/v1/builds/{build_id}").json()["iteration"] >= 1,
            "the build's first model call",
            60,
        )
        steer = client.post(
            f"/v1/builds/{build_id}/messages",
            json={"text": STEER},
            headers={"Idempotency-Key": f"steer-{uuid.uuid4().hex}"},
        )
        assert steer.status_code == 202, steer.text
        assert steer.json()["seq"] == 1
        first = wait_build(client, stack, build_id, status="completed")
        assert first["continuations"] == 0 and "all tests pass" in first["summary"]
        iterations = first["iteration"]

        history = events(stack, build_id)
        iterations_calls = len(of(history, "tool_call"))
        kinds = [k for k, _ in history]
        assert kinds.index("send_user_message") < kinds.index("build_completed")  # while it worked
        assert len(of(history, "build_completed")) == 1, "\n".join(summary(history))
        [done] = of(history, "build_completed")

        # the file it asked for is in the final snapshot, with the package
        def final_snapshot(snapshot_id: str) -> bool:
            return client.get(f"/v1/builds/{build_id}").json()["last_snapshot_id"] == snapshot_id

        wait_for(lambda: final_snapshot(done["final_checkpoint_id"]), "the final snapshot", 60)
        snapshot_id, tree = files(client, build_id)
        assert snapshot_id == done["final_checkpoint_id"]
        assert tree.get("STEER.md") == b"steered while it worked\n", "\n".join(summary(history))
        assert "textstats/__init__.py" in tree
        # the sandbox is stopped after the final snapshot
        wait_for(
            lambda: any(
                snapshot_id in e["reason"] for e in of(events(stack, build_id), "sandbox_stopped")
            ),
            "the sandbox stopped after the final snapshot",
            60,
        )

        # continuing: a message to the completed build, sent while the agent and the sandbox
        # are down (SIGKILLed); the agent comes back first and is SIGKILLed again once the
        # continuation's first call is out
        for victim in ("agent", "sandbox"):
            stack.kill(victim, signal.SIGKILL)
        again = client.post(f"/v1/builds/{build_id}/messages", json={"text": CONTINUE})
        assert again.status_code == 202 and again.json()["seq"] == 2
        stack.start_service("agent")
        wait_for(
            lambda: len(of(events(stack, build_id), "tool_call")) > iterations_calls,
            "the continuation's first call",
            60,
        )
        stack.kill("agent", signal.SIGKILL)
        stack.start_service("agent")
        stack.start_service("sandbox")
        second = wait_build(client, stack, build_id, status="completed", continuations=1)
        assert "CONTINUED.md" in second["summary"]
        assert second["iteration"] > iterations

        history = events(stack, build_id)
        [continued] = of(history, "build_continued")
        assert (continued["continuation"], continued["after"]) == (1, "completed")
        assert continued["iterations"] == iterations
        numbers = [e["iteration"] for e in of(history, "iteration_completed")]
        assert numbers == list(range(1, second["iteration"] + 1))  # going on from where they were
        calls = [e["call_id"] for e in of(history, "tool_call")]
        assert len(calls) == len(set(calls))  # though killed, no call asked for twice ...
        results = {e["call_id"] for e in of(history, "tool_result")}
        assert results == set(calls)  # ... and each one answered
        # and none ran twice (the sandbox's execution log)
        log = stack.data_dir / "exec.jsonl"
        runs = Counter(
            x["call_id"]
            for x in map(json.loads, log.read_text().splitlines())
            if x["build_id"] == build_id
        )
        assert all(n == 1 for n in runs.values()), runs.most_common(3)
        # a fresh sandbox, restored from the first run's final snapshot
        restored = of(history, "sandbox_restored")
        assert [r["from_snapshot"] for r in restored] == [snapshot_id]
        ends = of(history, "build_completed")
        assert [e.get("continuation", 0) for e in ends] == [0, 1]

        wait_for(lambda: final_snapshot(ends[1]["final_checkpoint_id"]), "the new final", 60)
        new_id, new_tree = files(client, build_id)
        assert new_id == ends[1]["final_checkpoint_id"] != snapshot_id
        assert new_tree["CONTINUED.md"] == b"Written as the user asked: CONTINUED.md\n"
        assert new_tree["STEER.md"] == tree["STEER.md"]  # the restored files are kept
        assert new_tree["textstats/__init__.py"] == tree["textstats/__init__.py"]

        # a user's SSE client sees the whole conversation, to the end of the continuation
        with client.stream("GET", f"/v1/builds/{build_id}/events", timeout=30) as stream:
            seen = [
                line.split(":", 1)[1].strip()
                for line in stream.iter_lines()
                if line.startswith("event:")
            ]
        assert seen.count("send_user_message") == 2 and seen.count("build_completed") == 2
        assert seen[-1] == "build_completed"

    delivered_twice_changes_nothing(stack, build_id)


def delivered_twice_changes_nothing(stack: Stack, build_id: str) -> None:
    """The whole conversation again with fresh message ids (its messages, the continuation, the
    tool calls of both runs): every consumer gets each a second time, and nothing changes."""
    replay_changes_nothing(
        stack, build_id, ("status", "iteration", "cost_micro_usd", "summary", "continuations")
    )
