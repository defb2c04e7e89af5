"""Cost control end to end: a build spends its user's allowance, sleeps, and wakes by itself at
the reset (a JetStream message schedule), then completes — every service a process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln_devstack.stack import DEV_API_KEY, Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_build_end_to_end import BRIEF, wait_for_status

pytestmark = pytest.mark.e2e

PERIOD_S = 20  # a "day" of the budget; periods start at multiples of it since the epoch
HEADERS = {"Authorization": f"Bearer {DEV_API_KEY}"}


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_BUDGET_PERIOD_S": str(PERIOD_S),
            # A scripted iteration costs a few thousand micro-dollars: this runs out mid-build.
            "KILN_BUDGET_DEMO_ALLOWANCE_USD": "0.02",
        }

    with own_stack(infra, "sleep", env) as s:
        yield s


def test_a_build_sleeps_at_the_allowance_and_the_scheduled_wake_finishes_it(stack: Stack):
    # Start just after a period begins, so the allowance runs out well before the reset.
    time.sleep(PERIOD_S - time.time() % PERIOD_S + 0.2)
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        created = client.post("/v1/builds", json={"idea_brief": BRIEF})
        assert created.status_code == 201, created.text
        build_id = created.json()["build_id"]
        final = wait_for_status(client, stack, build_id, {"completed", "failed", "cancelled"})
        assert final["status"] == "completed", final

        events: list[tuple[str, str]] = []
        with client.stream("GET", f"/v1/builds/{build_id}/events", timeout=30) as stream:
            kind = ""
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((kind, line))
    kinds = [k for k, _ in events]
    assert "sleep_requested" in kinds and "build_sleeping" in kinds, kinds
    slept = kinds.index("build_sleeping")
    # The wake came from the schedule (reason: the allowance reset), not from anyone's hand.
    wakes = [d for k, d in events[slept:] if k == "wake_requested"]
    assert wakes and "reset" in wakes[0], wakes
    assert "build_resumed" in kinds[slept:]
    resumed = slept + kinds[slept:].index("build_resumed")
    assert "iteration_completed" in kinds[resumed:]  # it went on working after the wake
    assert kinds[-1] == "build_completed"
