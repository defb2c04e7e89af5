"""Tool input that fails its tool's schema, on real NATS + Postgres with the model through the SDK:
the agent answers it with an error result itself, so it never reaches the sandbox (no ToolCall on
the stream), and the iteration's set completes with the valid calls' results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from kiln_agent import app, config
from kiln_agent.adapters.anthropic_model import AnthropicModel
from kiln_agent.adapters.postgres import SCHEMA, PostgresStore, migrations
from kiln_agent.loop import Agent
from kiln_agent.settings import AgentSettings
from kiln_contracts import BuildCompleted, BuildRequested, Envelope, ToolCall
from kiln_devstack.model.server import ScriptedServer
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.db import create_pool
from kiln_runtime.settings import CommonSettings
from tests.integration.agent.conftest import until
from tests.unit.test_agent_fakes import result_for, text, tool_use

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg(own_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(own_db, schema=SCHEMA, migrations=migrations())
    yield pool
    await pool.close()


async def test_invalid_input_is_answered_by_the_agent_and_never_reaches_the_sandbox(
    own_nats: str, pg: asyncpg.Pool, scripted: ScriptedServer, uid: str
) -> None:
    scripted.canned = [
        (
            [
                text("two calls, one of them broken"),
                tool_use("ok1", "bash", command="echo hi"),
                tool_use("bad1", "read_file", path="a.py", offset="ten"),
            ],
            "tool_use",
        ),
        ([tool_use("bad2", "edit_file", path="a.py")], "tool_use"),  # every call invalid
        ([text("done")], "end_turn"),
    ]
    settings = AgentSettings(
        nats_url=own_nats,
        database_url="unused",
        anthropic_base_url=scripted.url,
        anthropic_api_key="k",
        ack_wait_s=10,
    )
    model = AnthropicModel.connect(base_url=scripted.url, api_key="k", timeout_s=10)
    bus = Bus(settings, f"agent{uid}")
    agent = Agent(PostgresStore(pg), model, bus, config.load(), kiln_config.default())
    app.register(bus, agent, workers=4)

    sandbox = Bus(CommonSettings(nats_url=own_nats), f"sandbox{uid}")
    executed: list[ToolCall] = []
    seen: list[Envelope] = []

    async def run_tool(call: ToolCall, _: Delivery) -> None:
        executed.append(call)
        await sandbox.publish(result_for(call, "hi"))

    async def watch(event: Envelope, _: Delivery) -> None:
        seen.append(event)

    sandbox.consume(ToolCall, run_tool, max_workers=4, durable=f"sandbox-{uid}")
    sandbox.consume_all(watch, durable=f"watch-{uid}", max_workers=4)
    for b in (bus, sandbox):
        await b.connect()
        await b.start()
    try:
        build_id = f"{uid}-input"
        await bus.publish(
            BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="hi")
        )
        await until(
            lambda: any(isinstance(e, BuildCompleted) for e in seen), 30, "the build completes"
        )
        await asyncio.sleep(0.3)  # let anything that should not come arrive
        on_stream = [e.call_id for e in seen if isinstance(e, ToolCall)]
        assert on_stream == ["ok1"]
        assert [c.call_id for c in executed] == ["ok1"]

        requests = [r.request for r in scripted.recorded]
        assert len(requests) == 3
        first = requests[1]["messages"][-1]["content"]
        assert [(b["tool_use_id"], b.get("is_error", False)) for b in first] == [
            ("ok1", False),
            ("bad1", True),
        ]
        assert first[0]["content"] == "hi"
        assert 'field "offset" must be of type integer, not string' in first[1]["content"]
        second = requests[2]["messages"][-1]["content"]
        assert second[0]["tool_use_id"] == "bad2" and second[0]["is_error"] is True
        assert 'missing required field "old_string"' in second[0]["content"]
        assert 'missing required field "new_string"' in second[0]["content"]

        rows = await pg.fetch(
            "SELECT content FROM turns WHERE build_id = $1 AND role = 'user' ORDER BY seq",
            build_id,
        )
        stored = [json.loads(r["content"]) for r in rows]
        assert [b["tool_use_id"] for b in stored[1]] == ["ok1", "bad1"]
        assert stored[1][1]["is_error"] is True
    finally:
        for b in (bus, sandbox):
            await b.stop()
        await model.close()
