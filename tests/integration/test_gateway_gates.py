"""A clear refusal instead of a silent sleep, on real NATS, Redis and Postgres: once the budget has
closed a user's gate, ``POST /v1/builds`` answers 429 with a problem document and Retry-After,
a bus producer's BuildRequested ends in BuildRejected (visible as ``rejected`` in the API), and a
top-up through the gateway opens the gate again."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import pytest_asyncio

from kiln_agent import app as agent_app
from kiln_agent import config as agent_config
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.gates import BudgetGates
from kiln_agent.loop import Agent
from kiln_budget import allowance, recovery, spending
from kiln_budget import bootstrap as budget_bootstrap
from kiln_budget.settings import BudgetSettings
from kiln_contracts import BuildRequested, IterationCompleted, TopUpRequested, Usage
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus
from kiln_runtime.gates import GateBucket
from kiln_runtime.settings import CommonSettings
from tests.integration.gateway_fixtures import Gateway, running_gateway, until
from tests.unit.test_agent_fakes import FakeModel, text

pytestmark = pytest.mark.integration

ADMIN = "gates-admin-key"
PERIOD_S = 10**6  # a "day" of 11.6 days: no reset during the test


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gw(infra) -> AsyncIterator[Gateway]:
    async with running_gateway(infra, "gwgates", admin_api_key=ADMIN) as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="session")
async def budget(infra, uid) -> AsyncIterator[budget_bootstrap.Wiring]:
    """The budget's domain on real Redis and the real gates' bucket, serving top-ups; its stream
    consumers are not started (the test hands it the events it needs)."""
    wiring = budget_bootstrap.build(
        BudgetSettings(
            nats_url=infra["NATS_URL"],
            redis_url=infra["REDIS_URL"],
            budget_period_s=PERIOD_S,
            budget_demo_allowance_usd=Decimal("0.001"),  # 1_000 micro-USD
        ),
        service=f"budget-{uid}",
    )
    await wiring.bus.connect()
    await wiring.start()
    try:
        yield wiring
    finally:
        await wiring.stop()
        await wiring.bus.stop()


class OnlyMine(Agent):
    """The real agent, deaf to other tests' builds on the shared stream."""

    prefix = ""

    async def build_requested(self, msg: BuildRequested, delivered: int = 1) -> None:
        if msg.build_id.startswith(self.prefix):
            await super().build_requested(msg, delivered)


@pytest_asyncio.fixture(loop_scope="session")
async def agent(infra, uid) -> AsyncIterator[OnlyMine]:
    """The agent's real gates (a watch of the bucket) on the shared NATS; builds in memory."""
    bus = Bus(CommonSettings(nats_url=infra["NATS_URL"], shutdown_grace_s=1), f"agent{uid}")
    await bus.connect()
    source = GateBucket(bus)
    await source.open()
    gates = BudgetGates(source)
    await gates.start(timeout_s=10)
    model = FakeModel(([text("done")], "end_turn"))
    agent = OnlyMine(
        MemoryStore(), model, bus, agent_config.load(), kiln_config.default(), budget_gates=gates
    )
    agent.prefix = f"x{uid}"
    agent_app.register(bus, agent, workers=8)
    await bus.start()
    try:
        yield agent
    finally:
        await gates.stop()
        await bus.stop()


async def test_a_user_without_allowance_is_refused_clearly_then_a_top_up_lets_them_in(
    gw: Gateway, budget: budget_bootstrap.Wiring, agent: OnlyMine, uid: str
) -> None:
    user = f"gu{uid}"
    key = await gw.key(user)
    async with gw.client(key) as c:
        # Spend the user's allowance (the budget charges one 400-token sonnet iteration: 1_200)
        first = await c.post("/v1/builds", json={"idea_brief": "a word counter"})
        assert first.status_code == 201, first.text
        build_id = first.json()["build_id"]
        await recovery.guarded(  # as the budget's consumer handles it
            budget.deps,
            spending.iteration_completed,
            IterationCompleted(
                build_id=build_id,
                user_id=user,
                iteration=1,
                model="claude-sonnet-4-5",
                usage=Usage(input_tokens=400),
                stop_reason="tool_use",
            ),
        )

        refused = await c.post("/v1/builds", json={"idea_brief": "another one"})
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["type"] == "https://kiln.dev/problems/allowance-used-up"
        assert (problem["spent_micro_usd"], problem["allowance_micro_usd"]) == (1_200, 1_000)
        resets_at = datetime.fromisoformat(problem["resets_at"])
        assert "spent 1200 of 1000 micro-USD" in problem["detail"]
        assert "resets at" in problem["detail"] and "top-up" in problem["top_up"]
        wait = int(refused.headers["Retry-After"])
        left = (resets_at - datetime.now(UTC)).total_seconds()
        assert 0 < wait and abs(wait - math.ceil(left)) <= 2
        listed = (await c.get("/v1/builds")).json()["builds"]
        assert [b["build_id"] for b in listed] == [build_id]  # nothing was stored

        # A bus producer's BuildRequested for this user: the agent rejects it, the API shows it.
        rejected_id = f"x{uid}-bus"
        await gw.bus.publish(
            BuildRequested(build_id=rejected_id, user_id=user, tier="pro", idea_brief="from NATS")
        )

        async def rejected() -> bool:
            r = await c.get(f"/v1/builds/{rejected_id}")
            return r.status_code == 200 and r.json()["status"] == "rejected"

        await until(rejected)
        shown = (await c.get(f"/v1/builds/{rejected_id}")).json()
        assert "spent 1200 of 1000 micro-USD" in shown["reason"] and shown["finished_at"]
        kinds = [kind for _, kind in await gw.history(rejected_id)]
        assert kinds[-1] == "build_rejected" and "iteration_completed" not in kinds
        assert agent.model.requests == []  # type: ignore[attr-defined]

    # A top-up through the gateway: it publishes the command, the budget applies it (here by
    # hand: its consumers are not started) and opens the gate.
    async with gw.client(ADMIN) as admin:
        done = await admin.post(
            "/v1/budget/top-up",
            json={"user_id": user, "amount_usd": "0.01", "topup_id": f"t{uid}"},
        )
        assert done.status_code == 200, done.text
        assert done.json()["amount_micro_usd"] == 10_000
    command = TopUpRequested.of(user, f"t{uid}", 10_000)
    assert "top_up_requested" in [kind for _, kind in await gw.history(command.build_id)]
    await recovery.guarded(budget.deps, allowance.top_up, command)
    gate, _ = await budget.gates.read(user)
    assert gate is not None and gate.state == "open"
    async with gw.client(key) as c:
        again = await c.post("/v1/builds", json={"idea_brief": "another one"})
        assert again.status_code == 201, again.text
