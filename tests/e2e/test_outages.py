"""Outages: Postgres, Redis and the S3 API each go down in the middle of builds (connections
refused, open ones reset, through a forwarder in front of each) and come back. The builds wait
and go on: each completes once, no tool call runs twice, every iteration is charged once, the
final snapshot is stored, nothing is dead-lettered. ``KILN_OUTAGE_S`` sets how long each outage
lasts (default 6 s here; ``make outages`` runs 30 s)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln_devstack.outage import Forwarder, forwarded
from kiln_devstack.stack import Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_chaos import HEADERS, assert_builds_intact, post_builds, wait_all_completed

pytestmark = pytest.mark.e2e

OUTAGE_S = float(os.environ.get("KILN_OUTAGE_S", "6"))
BUILDS = 2
VARIABLES = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "s3": "S3_ENDPOINT_URL"}


class Outages:
    """One forwarder per dependency, in front of the session's servers."""

    def __init__(self) -> None:
        self.by_variable: dict[str, Forwarder] = {}

    def through(self, variable: str, url: str) -> str:
        """The URL through a new forwarder to the server of ``url``."""
        self.by_variable[variable], through = forwarded(url)
        return through

    def stop(self) -> None:
        for forwarder in self.by_variable.values():
            forwarder.stop()


@pytest.fixture(scope="module")
def outages() -> Iterator[Outages]:
    found = Outages()
    yield found
    found.stop()


@pytest.fixture(scope="module")
def stack(infra: dict[str, str], outages: Outages) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_DEV_TIER": "team",
            "KILN_SANDBOX_EXEC_LOG": str(data_dir / "exec.jsonl"),
            "KILN_SCRIPTED_LATENCY_S": "0.3",
            # the deliveries a message gets outlast the outage (at most 15 s apart)
            "KILN_MAX_DELIVER": str(max(20, int(OUTAGE_S) // 5 + 12)),
        }

    with own_stack(infra, "outage", env, through=outages.through) as s:
        yield s


def iterations(stack: Stack, ids: list[str]) -> list[int]:
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=5) as client:
        return [client.get(f"/v1/builds/{b}").json()["iteration"] for b in ids]


def waiting_on(stack: Stack, ids: list[str]) -> list[dict[str, object]]:
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=5) as client:
        return [client.get(f"/v1/builds/{b}").json()["waiting_on"] for b in ids]


@pytest.mark.parametrize("dependency", ["postgres", "redis", "s3"])
def test_builds_wait_out_an_outage_and_go_on(
    stack: Stack, outages: Outages, dependency: str
) -> None:
    forwarder = outages.by_variable[VARIABLES[dependency]]
    before = forwarder.connections
    ids = post_builds(stack, BUILDS, key=f"outage-{dependency}")
    deadline = time.monotonic() + 120
    while min(iterations(stack, ids)) < 2:  # mid-build: calls made, a snapshot or two taken
        assert time.monotonic() < deadline, iterations(stack, ids)
        time.sleep(0.2)
    forwarder.down()
    try:
        started = time.monotonic()
        if dependency == "s3":
            # builds go on without S3; the completed ones say they wait on their final snapshot
            wait_all_completed(stack, ids, chaos=None, timeout=240)
            assert {w["service"] for w in waiting_on(stack, ids)} == {"snapshot"}
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
    finally:
        forwarder.up()
    wait_all_completed(stack, ids, chaos=None, timeout=240)
    outcomes = assert_builds_intact(stack, ids)  # waits for the budget's charges too
    # nothing was killed: a call that ran waited to record what it did, none was cut short
    assert outcomes["interrupted"] == 0, outcomes
    assert forwarder.connections > before  # the services did use it (and came back to it)
    deadline = time.monotonic() + 60  # and then they wait on nothing
    while any(waiting_on(stack, ids)):
        assert time.monotonic() < deadline, waiting_on(stack, ids)
        time.sleep(0.2)
    with httpx.Client(base_url=stack.gateway_url, headers=HEADERS, timeout=10) as client:
        for build_id in ids:  # the final snapshot was stored, whatever was down
            listed = client.get(f"/v1/builds/{build_id}/snapshots").json()
            assert "final" in {s["reason"] for s in listed["snapshots"]}, listed
            path = f"/v1/builds/{build_id}/snapshots/latest/files/textstats/__init__.py"
            assert "-item[1]" in client.get(path).text
