"""Chaos: concurrent builds while services are SIGKILLed at random and NATS restarts once.

The kills are bounded (``KILLS``): on a loaded machine the builds move slower, and kills without
end would then keep them from ever finishing.

Every build must complete; no tool call may run twice (the sandbox's execution log); no iteration
may be charged twice (the budget's per-build spend equals the price of the distinct iterations);
each build's history has no gaps; nothing is dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import redis

from kiln_contracts import BY_KIND, IterationCompleted, subjects
from kiln_devstack.host import port_in_use, wait_for
from kiln_devstack.stack import DEV_API_KEY, Stack
from kiln_runtime.config import default as config
from kiln_sandbox.handlers import INTERRUPTED
from tests.e2e.stacks import own_stack
from tests.e2e.test_build_end_to_end import BRIEF, stream_history

pytestmark = pytest.mark.e2e

BUILDS = 4
KILLS = 20  # service kills at most, then the builds finish in peace
VICTIMS = ("gateway", "agent", "sandbox", "budget", "snapshot")
HEADERS = {"Authorization": f"Bearer {DEV_API_KEY}"}


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_DEV_TIER": "team",  # room for every build at once
            "KILN_SANDBOX_EXEC_LOG": str(data_dir / "exec.jsonl"),
            # Redeliver a dead replica's messages after 5 s instead of 10 s.
            "KILN_ACK_WAIT_S": "5",
            "KILN_SANDBOX_LEASE_S": "5",
            "KILN_MAX_DELIVER": "50",
            # Slow the model down so that the builds are still running while the chaos happens.
            "KILN_SCRIPTED_LATENCY_S": "1.0",
        }

    with own_stack(infra, "chaos", env) as s:
        yield s


class Chaos(threading.Thread):
    """SIGKILLs a random service every few seconds (restarting it), ``KILLS`` times at most, and
    restarts NATS once."""

    def __init__(self, stack: Stack, seed: int) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.kills: list[str] = []
        self.nats_restarted = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            rounds = 0
            while len(self.kills) < KILLS and not self.done.wait(self.rng.uniform(1.0, 2.5)):
                rounds += 1
                if rounds == 2 and not self.nats_restarted:
                    self.restart_nats()
                    continue
                victim = self.rng.choice(VICTIMS)
                self.stack.kill(victim, signal.SIGKILL)
                self.kills.append(victim)
                time.sleep(self.rng.uniform(0.2, 1.5))
                self.stack.start_service(victim)
        except BaseException as err:  # surfaced by the test
            self.error = err

    def restart_nats(self) -> None:
        port = int(self.stack.env["NATS_URL"].rsplit(":", 1)[1])
        self.stack.infra.restart("nats-server")
        wait_for(lambda: port_in_use(port), "nats-server after restart")
        self.nats_restarted = True


def post_builds(stack: Stack, builds: int = BUILDS, key: str = "chaos") -> list[str]:
    ids = []
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        for n in range(builds):
            created = client.post(
                "/v1/builds",
                json={"idea_brief": f"{BRIEF}\n(build {n})"},
                headers={"Idempotency-Key": f"{key}-{n}"},
            )
            assert created.status_code == 201, created.text
            ids.append(created.json()["build_id"])
    return ids


def wait_all_completed(stack: Stack, ids: list[str], chaos: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        if chaos is not None and chaos.error:
            raise chaos.error
        try:
            with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=5) as c:
                status = {b: c.get(f"/v1/builds/{b}").json().get("status", "?") for b in ids}
        except (httpx.HTTPError, ValueError):
            pass  # the gateway may be down right now
        if status and all(s in ("completed", "failed", "cancelled") for s in status.values()):
            break
        time.sleep(0.5)
    assert status and all(s == "completed" for s in status.values()), status


def history(nats_url: str, build_id: str) -> list[tuple[str, dict]]:
    """(kind, message) of every event of the build, in stream order."""
    raw = asyncio.run(stream_history(nats_url, build_id))
    return [(subjects.parse(subject)[1], json.loads(data)) for subject, data, _ in raw]


async def dead_letter_count(nats_url: str) -> int:
    nc = await nats.connect(nats_url.split(","))
    try:
        info = await nc.jetstream().stream_info(subjects.DLQ_STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


@pytest.mark.timeout(600)  # the wait below, the stack's start and the checks
def test_builds_survive_random_kills_and_a_nats_restart(stack: Stack) -> None:
    ids = post_builds(stack)
    chaos = Chaos(stack, seed=int(time.time()))
    chaos.start()
    try:
        wait_all_completed(stack, ids, chaos, timeout=420)
    finally:
        chaos.done.set()
        chaos.join(30)
    for name in VICTIMS:  # everything is back up for the checks below
        if not stack.services[name].alive():
            stack.start_service(name)
    assert chaos.nats_restarted and len(chaos.kills) >= 3, chaos.kills
    print(f"killed {len(chaos.kills)} times: {Counter(chaos.kills)}; NATS restarted once")

    assert_builds_intact(stack, ids)


def assert_builds_intact(stack: Stack, ids: list[str]) -> Counter[str]:
    """Every build completed once, no tool call ran twice, no iteration was charged twice, no
    event of a history is missing, nothing was dead-lettered. The count of tool results by
    outcome (ok, error, interrupted)."""
    # No tool call ran twice.
    exec_log = stack.data_dir / "exec.jsonl"
    lines = [json.loads(x) for x in exec_log.read_text().splitlines()] if exec_log.exists() else []
    runs = Counter((x["build_id"], x["call_id"]) for x in lines)
    nats_url = stack.env["NATS_URL"]
    outcomes = Counter(
        "interrupted" if body["output"] == INTERRUPTED else "error" if body["is_error"] else "ok"
        for build_id in ids
        for kind, body in history(nats_url, build_id)
        if kind == "tool_result"
    )
    print(f"tool results: {dict(outcomes)}")
    assert runs, f"no tool call ran at all; results: {dict(outcomes)}"
    assert max(runs.values()) == 1, [k for k, n in runs.items() if n > 1]

    store = redis.Redis.from_url(stack.env["REDIS_URL"])
    for build_id in ids:
        events = history(nats_url, build_id)
        kinds = [k for k, _ in events]
        assert kinds.count("build_completed") == 1 and kinds[-1] != "build_requested"
        for kind, body in events:  # every event on the stream is a valid message
            BY_KIND[kind].model_validate(body)

        # Gap-free: iterations 1..n, each tool call answered exactly once.
        iterations = [
            IterationCompleted.model_validate(b) for k, b in events if k == "iteration_completed"
        ]
        numbers = [it.iteration for it in iterations]
        assert sorted(numbers) == list(range(1, len(numbers) + 1)), numbers
        calls = [b["call_id"] for k, b in events if k == "tool_call"]
        results = [b["call_id"] for k, b in events if k == "tool_result"]
        assert len(calls) == len(set(calls)) and sorted(calls) == sorted(results)
        # every call ran, except one the sandbox's kill interrupted after claiming it (it is
        # answered as interrupted, never run again: it may not have run at all)
        interrupted = {
            b["call_id"] for k, b in events if k == "tool_result" and b["output"] == INTERRUPTED
        }
        assert set(calls) - interrupted <= {cid for (b, cid) in runs if b == build_id}

        # Charged once per iteration: the build's spend is the price of what was used.
        expected = sum(
            config().cost(it.model, it.usage, it.occurred_at).micro_usd for it in iterations
        )
        assert expected > 0
        wait_for(
            lambda b=build_id, e=expected: int(store.get(f"kiln:spend:build:{b}") or 0) == e,
            f"the budget of {build_id}",
            timeout=30,
        )

    assert asyncio.run(dead_letter_count(nats_url)) == 0
    return outcomes
