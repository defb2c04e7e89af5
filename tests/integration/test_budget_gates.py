"""The spend limit holds before the money is spent: the budget, the agent and a scripted model server
on real NATS (the gates' key-value bucket, message schedules), Redis and Postgres.

Twenty concurrent builds of one user loop on a cheap tool call (each model call costs the same)
until the allowance is used up. The budget closes the user's gate at the charge that reaches the
allowance; from then on no model call starts (the calls already in flight finish: at most one per
build), every build sleeps until the reset, and a top-up opens the gate before it wakes them."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from kiln_agent import bootstrap as agent_bootstrap
from kiln_agent.settings import AgentSettings
from kiln_budget import bootstrap as budget_bootstrap
from kiln_budget import spending
from kiln_budget.settings import BudgetSettings
from kiln_contracts import (
    BudgetGate,
    BuildLimits,
    BuildRequested,
    ToolCall,
    ToolResult,
    TopUpRequested,
    Usage,
    gate_key,
    stable_id,
    subjects,
)
from kiln_devstack.infra import Infra
from kiln_devstack.model.server import ScriptedServer
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus
from kiln_runtime.settings import CommonSettings
from kiln_runtime.streams import ensure_gates, ensure_streams
from tests.infra import own_database

pytestmark = pytest.mark.integration

BUILDS = 20
USAGE = {"input_tokens": 1000, "output_tokens": 100}
# a call of the pro tier's model, at its price in kiln.yaml (as the budget charges it)
CALL_MICRO_USD = (
    kiln_config.default()
    .cost(kiln_config.default().tier("pro").models["agent"], Usage(**USAGE), datetime.now(UTC))
    .micro_usd
)
ALLOWANCE_CALLS = 30
ALLOWANCE_USD = Decimal(ALLOWANCE_CALLS * CALL_MICRO_USD) / 1_000_000
LATENCY_S = 0.3
# After the gate closes, a call may still start within the watch's delivery to the agent (ms on
# an idle machine); more than this later is a call the gate let through.
LAG_S = 1.0


@pytest.fixture(scope="module")
def own_nats() -> Iterator[str]:
    """A nats-server of this module's own: the budget's consumers replay nobody else's events."""
    data_dir = Path(tempfile.mkdtemp(prefix="kg-", dir="/tmp"))
    infra = Infra(data_dir)
    try:
        yield infra.start_nats()
    finally:
        infra.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


class LoopServer(ScriptedServer):
    """Every reply one list_dir call (the path alternates, so no repetition limit trips), at the
    same usage; every request recorded with its arrival time."""

    def __init__(self) -> None:
        super().__init__(latency_s=LATENCY_S)
        self.record = True
        self.answered: list[float] = []
        self.responder = self.loop

    def loop(self, request: dict[str, Any]) -> dict[str, Any]:
        n = sum(1 for m in request["messages"] if m["role"] == "assistant")
        path = "." if n % 2 == 0 else "./"
        call = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:12]}", "name": "list_dir"}
        reply = self.model.reply(request, [{**call, "input": {"path": path}}], "tool_use")
        reply["usage"] = {**USAGE, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        self.answered.append(asyncio.get_running_loop().time())
        return reply

    def arrivals(self) -> list[float]:
        return [r.arrived_at for r in self.recorded]


@pytest.fixture
def own_db(infra: dict[str, str], uid: str) -> str:
    return own_database(infra["DATABASE_URL"], f"gates_{uid}")


@dataclass
class Stack:
    nc: Client
    model: LoopServer
    agent: agent_bootstrap.Wiring
    budget: budget_bootstrap.Wiring
    sandbox: Bus
    user: str

    async def kinds(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        """(stored at, message) of every ``kind`` message on the stream."""
        js = self.nc.jetstream()
        sub = await js.subscribe(subjects.kind_filter(kind), ordered_consumer=True)
        found: list[tuple[float, dict[str, Any]]] = []
        try:
            while True:
                msg: Msg = await sub.next_msg(timeout=0.5)
                found.append((msg.metadata.timestamp.timestamp(), json.loads(msg.data)))
        except Exception:
            pass
        finally:
            await sub.unsubscribe()
        return found

    async def gate(self) -> BudgetGate | None:
        kv = await ensure_gates(self.nc)
        try:
            entry = await kv.get(gate_key(self.user))
        except Exception:
            return None
        return BudgetGate.model_validate_json(entry.value or b"")


async def until(predicate: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met before the deadline: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def stack(
    own_nats: str, own_db: str, infra: dict[str, str], uid: str
) -> AsyncIterator[Stack]:
    nc = Client()
    await nc.connect(own_nats)
    await ensure_streams(nc)
    model = LoopServer()
    await model.start()
    agent = agent_bootstrap.build(
        AgentSettings(
            nats_url=own_nats,
            database_url=own_db,
            anthropic_base_url=model.url,
            anthropic_api_key="test",
            ack_wait_s=10,
            shutdown_grace_s=1,
        )
    )
    budget = budget_bootstrap.build(
        BudgetSettings(
            nats_url=own_nats,
            redis_url=infra["REDIS_URL"],
            ack_wait_s=10,
            shutdown_grace_s=1,
            budget_period_s=10**6,  # a "day" of 11.6 days: no reset during the test
            budget_demo_allowance_usd=ALLOWANCE_USD,
        )
    )
    sandbox = Bus(CommonSettings(nats_url=own_nats, shutdown_grace_s=1), "sandbox")

    async def answer(call: ToolCall, _: object) -> None:
        result = call.caused(
            ToolResult, call_id=call.call_id, iteration=call.iteration, output="(empty)"
        )
        await sandbox.publish(result.with_id(stable_id(call.build_id, "result", call.call_id)))

    sandbox.consume(ToolCall, answer, max_workers=32)
    for bus, start in ((budget.bus, budget.start), (agent.bus, agent.start), (sandbox, None)):
        await bus.connect()
        if start is not None:
            await start()
        await bus.start()
    try:
        yield Stack(nc, model, agent, budget, sandbox, f"u{uid}")
    finally:
        await agent.stop()  # its gates' watch first, while the connection is open
        for bus in (sandbox, agent.bus, budget.bus):
            await bus.stop()
        await budget.stop()
        await model.stop()
        await nc.close()


async def test_no_model_call_starts_once_the_gate_closes_and_a_top_up_opens_it_first(
    stack: Stack, uid: str
) -> None:
    limits = BuildLimits(max_iterations=10_000)
    ids = [f"g{i}-{uid}" for i in range(BUILDS)]
    for build_id in ids:
        await stack.agent.bus.publish(
            BuildRequested(
                build_id=build_id, user_id=stack.user, tier="pro", idea_brief="x", limits=limits
            )
        )

    async def asleep(n: int) -> bool:
        return len(await stack.kinds("build_sleeping")) >= n

    await until(lambda: asleep(BUILDS), what="every build asleep")
    await asyncio.sleep(LATENCY_S * 3)  # anything still in flight lands; nothing new may start
    gate = await stack.gate()
    assert gate is not None and gate.state == "closed" and gate.until is not None
    sleeps = await stack.kinds("sleep_requested")
    closed_at = min(at for at, _ in sleeps)  # the budget closes the gate, then asks for sleeps
    arrivals = stack.model.arrivals()
    late = [t for t in arrivals if t > closed_at + LAG_S]
    assert late == [], f"{len(late)} model calls started after the gate closed"
    # spent past the allowance: the calls started before the close that its charge did not
    # count yet (one in flight per build, plus replies still on their way to the budget)
    started_before = [t for t in arrivals if t <= closed_at]
    assert len(arrivals) - len(started_before) <= BUILDS
    assert len(arrivals) <= 2 * (ALLOWANCE_CALLS + BUILDS), len(arrivals)
    slept = {m["build_id"]: m for _, m in await stack.kinds("build_sleeping")}
    assert set(slept) == set(ids) and len(await stack.kinds("build_sleeping")) == BUILDS
    assert {datetime.fromisoformat(m["wake_at"]) for m in slept.values()} == {gate.until}
    assert await stack.budget.deps.store.sleeping(stack.user) == set(ids)  # a top-up wakes them

    # A top-up worth ten calls more than was spent: the gate opens before the wakes go out, the
    # builds go on, and the gate closes again at the new allowance.
    before = len(arrivals)
    spent = await spending.spent_today(stack.budget.deps, stack.user)
    over = spent - ALLOWANCE_CALLS * CALL_MICRO_USD
    await stack.agent.bus.publish(
        TopUpRequested.of(stack.user, f"t{uid}", over + 10 * CALL_MICRO_USD)
    )

    async def woken() -> bool:
        return len(await stack.kinds("build_resumed")) >= BUILDS

    await until(woken, what="every build woken by the top-up")
    await until(lambda: asleep(2 * BUILDS), what="every build asleep again")
    resumed = await stack.kinds("build_resumed")
    assert len(resumed) == BUILDS
    assert len(stack.model.arrivals()) > before  # they called the model again after the top-up
