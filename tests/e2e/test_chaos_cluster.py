"""Chaos on a three-node JetStream cluster: concurrent builds on two replicas of every service,
while the KILN stream's leader is SIGKILLed and started again, a NATS node is SIGSTOPped for
longer than the election timeout and resumed, and service replicas are SIGKILLed at random.

The same checks as the single-server chaos (tests/e2e/test_chaos.py): every build completes, no
tool call runs twice, no iteration is charged twice, no event of a build's history is missing,
nothing is dead-lettered. ``KILN_CHAOS_BUILDS`` / ``KILN_CHAOS_KILLS`` make it bigger (``make
chaos-cluster``); the suite runs a small one.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from kiln_contracts import subjects
from kiln_devstack.cluster import NatsCluster
from kiln_devstack.stack import SERVICES, Stack
from tests.e2e.stacks import own_stack
from tests.e2e.test_chaos import assert_builds_intact, post_builds, wait_all_completed

pytestmark = pytest.mark.e2e

BUILDS = int(os.environ.get("KILN_CHAOS_BUILDS", "3"))
SERVICE_KILLS = int(os.environ.get("KILN_CHAOS_KILLS", "4"))
# Longer than a JetStream cluster's election timeout (nats-server: 4 to 9 s) and than three
# client pings (KILN_NATS_PING_INTERVAL_S below): the paused node loses its leaderships and its
# clients move to another node.
PAUSE_S = 12.0
VICTIMS = [f"{s}{r}" for s in SERVICES if s != "webhooks" for r in ("", "-2")]


@pytest.fixture(scope="module")
def stack(infra: dict[str, str]) -> Iterator[Stack]:
    def env(data_dir: Path) -> dict[str, str]:
        return {
            "KILN_DEV_TIER": "team",
            "KILN_SANDBOX_EXEC_LOG": str(data_dir / "exec.jsonl"),
            "KILN_ACK_WAIT_S": "5",
            "KILN_SANDBOX_LEASE_S": "5",
            "KILN_MAX_DELIVER": "50",
            "KILN_NATS_PING_INTERVAL_S": "2",
            "KILN_SCRIPTED_LATENCY_S": "1.5",
        }

    with own_stack(infra, "chaoscl", env, nats_nodes=3, replicas=2) as s:
        yield s


def stream_leader(cluster: NatsCluster, timeout: float = 60.0) -> tuple[str, float]:
    """The KILN stream's leader once the cluster names one, and how long that took."""

    async def ask() -> str:
        up = [n.url for n in cluster.nodes if not n.stopped]
        nc = await nats.connect(up, connect_timeout=2, max_reconnect_attempts=1)
        try:
            info = await nc.jetstream().stream_info(subjects.STREAM)
            return str(info.cluster.leader) if info.cluster and info.cluster.leader else ""
        finally:
            await nc.close()

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            leader = asyncio.run(ask())
        except Exception:
            leader = ""
        if leader:
            return leader, time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"no leader for {subjects.STREAM} within {timeout:.0f}s")


class ClusterChaos(threading.Thread):
    """The faults, in a thread: the leader's SIGKILL, a node's SIGSTOP, service SIGKILLs."""

    def __init__(self, stack: Stack, seed: int) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.kills: list[str] = []
        # (fault, the old leader, the new one, seconds until the new one led)
        self.elections: list[tuple[str, str, str, float]] = []
        self.error: BaseException | None = None

    @property
    def cluster(self) -> NatsCluster:
        cluster = self.stack.infra.cluster
        assert isinstance(cluster, NatsCluster)
        return cluster

    def run(self) -> None:
        try:
            # the two NATS faults early, while every build is still running
            plan = ["kill-leader", "service", "pause-node"] + ["service"] * (SERVICE_KILLS - 1)
            for step in plan:
                if self.done.wait(self.rng.uniform(1.0, 3.0)):
                    return
                if step == "kill-leader":
                    self.kill_leader()
                elif step == "pause-node":
                    self.pause_node()
                else:
                    self.kill_service()
        except BaseException as err:  # surfaced by the test
            self.error = err

    def kill_leader(self) -> None:
        leader, _ = stream_leader(self.cluster)
        self.cluster.kill(leader)
        new, took = self.wait_new_leader(leader)
        self.elections.append(("SIGKILL leader", leader, new, took))
        time.sleep(self.rng.uniform(1.0, 3.0))
        self.cluster.start_node(leader)

    def pause_node(self) -> None:
        leader, _ = stream_leader(self.cluster)
        self.cluster.pause(leader)
        new, took = self.wait_new_leader(leader)
        self.elections.append(("SIGSTOP leader", leader, new, took))
        time.sleep(max(0.0, PAUSE_S - took))
        self.cluster.resume(leader)

    def wait_new_leader(self, old: str) -> tuple[str, float]:
        start = time.monotonic()
        while True:
            leader, _ = stream_leader(self.cluster)
            if leader != old:
                return leader, time.monotonic() - start
            assert time.monotonic() - start < 60, f"{old} still leads after 60 s"
            time.sleep(0.2)

    def kill_service(self) -> None:
        victim = self.rng.choice(VICTIMS)
        self.stack.kill(victim, signal.SIGKILL)
        self.kills.append(victim)
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.stack.start_service(victim)


@pytest.mark.timeout(900)  # twelve service processes and three servers on a shared machine
def test_builds_survive_a_cluster_losing_its_leader_and_a_hung_node(stack: Stack) -> None:
    assert stack.env["KILN_STREAM_REPLICAS"] == "3"
    leader, _ = stream_leader(stack.infra.cluster)
    ids = post_builds(stack, BUILDS)
    chaos = ClusterChaos(stack, seed=int(time.time()))
    chaos.start()
    try:
        wait_all_completed(stack, ids, chaos, timeout=600)
    finally:
        chaos.done.set()
        chaos.join(60)
    assert chaos.error is None, chaos.error
    for name in stack.services:  # everything is back up for the checks below
        if not stack.services[name].alive():
            stack.start_service(name)
    faults = [e[0] for e in chaos.elections]
    print(
        f"builds {len(ids)}; service kills {len(chaos.kills)}: {dict(Counter(chaos.kills))}; "
        f"first leader {leader}; elections: "
        + "; ".join(
            f"{what} {old} -> {new} in {took:.1f} s" for what, old, new, took in chaos.elections
        )
    )
    assert "SIGKILL leader" in faults and "SIGSTOP leader" in faults, chaos.elections

    assert_builds_intact(stack, ids)
