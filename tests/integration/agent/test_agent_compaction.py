"""A long build with large writes through agent processes (``python -m kiln_agent``, two replicas on
a NATS server and database of this module's own), the model through the SDK against the scripted
server with a 30,000-token window for both, and a fake sandbox in the test.

Every turn writes a 4,000-character file, so clearing old tool output alone cannot keep the
conversation in the window (without compaction of the inputs and summaries the build fails with
context_window at its ~20th call): the oldest turns are summarised by model calls. The replica
making the first summarising call is SIGKILLed mid-call; the survivor makes it again, and each
summary is published exactly once, under its stable id, and charged once by the budget service
(on Redis): the build's spend there is every call's, summaries included, and equals the agent's.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
import yaml

from kiln_agent import config
from kiln_agent.adapters.postgres import SCHEMA, migrations
from kiln_budget import bootstrap as budget_service
from kiln_budget import spending
from kiln_budget.settings import BudgetSettings
from kiln_contracts import (
    BuildLimits,
    BuildRequested,
    IterationCompleted,
    ToolCall,
    stable_id,
    subjects,
)
from kiln_devstack.model.long_script import LongScript
from kiln_devstack.model.server import Recorded, ScriptedServer
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.db import create_pool
from kiln_runtime.settings import CommonSettings
from tests.integration.agent.conftest import until
from tests.integration.agent.test_agent_durability import Replica, transcript_is_whole
from tests.integration.test_budget_redis import consumer_caught_up, until_async
from tests.unit.test_agent_fakes import Workspace

pytestmark = pytest.mark.integration

ACK_WAIT_S = "1.5"
WINDOW = 30_000
ITERATIONS = 60


@pytest.fixture
async def pg(own_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(own_db, schema=SCHEMA, migrations=migrations())
    yield pool
    await pool.close()


def is_summary(rec: Recorded) -> bool:
    return not rec.request.get("tools")


async def test_a_long_build_with_large_writes_is_summarised_and_each_summary_charged_once(
    own_nats: str,
    own_db: str,
    pg: asyncpg.Pool,
    scripted: ScriptedServer,
    uid: str,
    tmp_path: Path,
    infra: dict[str, str],
) -> None:
    build_id, user_id = f"long{uid}", f"u{uid}"
    scripted.window = WINDOW
    scripted.responder = LongScript(ITERATIONS, 1, scripted.model.usage, write_chars=4000).respond
    agent_config = config.load().model_dump()
    agent_config["context_windows"] = {"default": WINDOW}
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(agent_config))
    replicas: dict[str, Replica] = {}

    def start(name: str) -> None:
        env = {
            **os.environ,
            "NATS_URL": own_nats,
            "DATABASE_URL": own_db,
            "ANTHROPIC_BASE_URL": f"{scripted.url}/{name}",
            "ANTHROPIC_API_KEY": "test",
            "KILN_ACK_WAIT_S": ACK_WAIT_S,
            "KILN_AGENT_LEASE_S": ACK_WAIT_S,
            "KILN_MODEL_TIMEOUT_S": "30",
            "KILN_AGENT_CONFIG": str(config_path),
        }
        replicas[name] = Replica(name, env, tmp_path)

    killed: list[str] = []

    async def on_request(rec: Recorded) -> None:
        if is_summary(rec) and not killed:  # the first summarising call: SIGKILL its replica
            killed.append(rec.prefix.strip("/"))
            replicas[killed[0]].kill()

    scripted.on_request = on_request

    sandbox = Bus(CommonSettings(nats_url=own_nats, ack_wait_s=10), "sandbox")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    charged: list[IterationCompleted] = []  # every IterationCompleted, as a consumer sees them

    async def run_tool(call: ToolCall, _: Delivery) -> None:
        if call.build_id == build_id:
            await sandbox.publish(await asyncio.to_thread(ws.run, call))

    async def charge(event: IterationCompleted, _: Delivery) -> None:
        if event.build_id == build_id:
            charged.append(event)

    observer = Bus(CommonSettings(nats_url=own_nats, ack_wait_s=10), "observer")
    sandbox.consume(ToolCall, run_tool, max_workers=8)
    observer.consume(IterationCompleted, charge, max_workers=4)
    for bus in (sandbox, observer):
        await bus.connect()
        await bus.start()
    # the budget service, on Redis; an allowance no call here reaches
    budget = budget_service.build(
        BudgetSettings(
            nats_url=own_nats,
            redis_url=infra["REDIS_URL"],
            ack_wait_s=5,
            budget_demo_allowance_usd=Decimal(1_000_000),
        ),
        service=f"budget-{uid}",
    )
    await budget.bus.connect()
    await budget.start()
    await budget.bus.start()
    start("a")
    start("b")
    try:
        await until(
            lambda: replicas["a"].ready() and replicas["b"].ready(), timeout=90, what="agents ready"
        )  # two processes starting on a loaded machine
        await sandbox.publish(
            BuildRequested(
                build_id=build_id,
                user_id=user_id,
                tier="pro",
                idea_brief="A long build.",
                limits=BuildLimits(max_iterations=ITERATIONS),
            )
        )

        async def status() -> str | None:
            return await pg.fetchval("SELECT status FROM builds WHERE build_id = $1", build_id)

        deadline = asyncio.get_running_loop().time() + 180
        while await status() not in ("completed", "failed"):
            assert asyncio.get_running_loop().time() < deadline, (
                f"not ended: {await status()}; "
                + "\n".join(r.log.read_text()[-1500:] for r in replicas.values())
            )
            await asyncio.sleep(0.1)
        row = await pg.fetchrow(
            "SELECT status, iteration, state, cost_micro_usd FROM builds WHERE build_id = $1",
            build_id,
        )
        assert row["status"] == "completed", json.loads(row["state"])["detail"]
        assert row["iteration"] == ITERATIONS
        state = json.loads(row["state"])
        summaries = state["summaries"]
        assert summaries >= 1 and state["summarised_before"] > 0 and state["summary"]

        # the killed replica's summarising call was made again by the survivor; every summary
        # made is published once, under its stable id
        calls = [r for r in scripted.recorded if is_summary(r)]
        assert killed and len(calls) == summaries + 1
        assert calls[1].prefix.strip("/") != killed[0]
        await until(lambda: len(charged) == ITERATIONS + summaries, what="every call charged")
        ids = [e.event_id for e in charged if e.purpose == "summary"]
        assert ids == [stable_id(build_id, "summary", n) for n in range(1, summaries + 1)]
        assert not [i for i, n in collections.Counter(e.event_id for e in charged).items() if n > 1]

        # the budget charged every call once, summaries included: the build's spend is the
        # agent's own count of its cost, and a summary delivered again changes nothing
        deps = budget.deps
        expected = sum(spending.cost_of(deps.config, e) for e in charged)
        assert expected == row["cost_micro_usd"] > 0
        summary_cost = sum(
            spending.cost_of(deps.config, e) for e in charged if e.purpose == "summary"
        )
        assert summary_cost > 0

        async def spent() -> int:
            return await spending.spent_build(deps, build_id)

        await until_async(lambda: _equals(spent(), expected), timeout=30)
        again = next(e for e in charged if e.purpose == "summary")
        ack = await budget.bus.nc.jetstream().publish(
            subjects.subject_of(again),
            again.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"again-{again.event_id}"},
        )
        assert not ack.duplicate
        await until_async(lambda: consumer_caught_up(budget, again.kind, ack.seq))
        assert await spent() == expected

        # no request overflowed: the server refused nothing, and the stored conversation is
        # whole (compaction changes what is sent, never what is stored)
        assert scripted.refused == []
        turns = await transcript_is_whole(pg, build_id)
        assert len(turns) == 2 * ITERATIONS
        big = [u for t in turns[1::2] for u in t if u.get("name") == "write_file"]
        assert len(big) == ITERATIONS - 1 and all(len(u["input"]["content"]) == 4000 for u in big)
        # what was sent after the last compaction: old writes cleared to a marker, an object
        last = [r for r in scripted.recorded if not is_summary(r)][-1].request["messages"]
        uses = [b for m in last for b in m["content"] if b.get("type") == "tool_use"]
        marked = [u for u in uses if "read_file" in str(u["input"].get("content", ""))]
        assert marked and all(isinstance(u["input"], dict) and u["input"]["path"] for u in marked)
        assert "was summarised" in json.dumps(last[0])
    finally:
        for r in replicas.values():
            r.kill()
        for bus in (sandbox, observer, budget.bus):
            await bus.stop()
        await budget.stop()


async def _equals(awaitable: object, expected: object) -> bool:
    return await awaitable == expected  # type: ignore[misc]
