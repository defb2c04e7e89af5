"""Durability with agent processes: two or three ``python -m kiln_agent`` replicas on a NATS server
and database of this module's own, the model through the SDK against the scripted server, and a
fake sandbox in the test that runs the ToolCalls and records every execution.

One replica is SIGKILLed while a build is collecting the results of parallel calls, another in the
middle of a model call; the survivor finishes the build, no ToolCall runs twice, and the transcript
(the turns table) has no gaps. Then two in-process replicas and many parallel calls per turn show
that optimistic concurrency and the think lease hold: no result lost, one model call per iteration.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kiln_agent import app, config
from kiln_agent.adapters.anthropic_model import AnthropicModel
from kiln_agent.adapters.postgres import SCHEMA, PostgresStore, migrations
from kiln_agent.loop import Agent
from kiln_agent.ports import VersionConflict
from kiln_agent.settings import AgentSettings
from kiln_contracts import BuildRequested, ToolCall, ToolResult
from kiln_devstack.model.long_script import LongScript
from kiln_devstack.model.server import Recorded, ScriptedServer
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.db import create_pool
from kiln_runtime.settings import CommonSettings
from tests.integration.agent.conftest import until
from tests.unit.test_agent_fakes import Workspace, result_for

pytestmark = pytest.mark.integration

ACK_WAIT_S = "1.5"


class Replica:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"agent-{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "kiln_agent"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self) -> bool:
        return "consuming from" in self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@pytest.fixture
async def pg(own_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(own_db, schema=SCHEMA, migrations=migrations())
    yield pool
    await pool.close()


async def transcript_is_whole(pg: asyncpg.Pool, build_id: str) -> list[list[dict[str, Any]]]:
    """Assert the turns table has no gaps and pairs every tool_use with its result; return it."""
    rows = await pg.fetch(
        "SELECT seq, role, content FROM turns WHERE build_id = $1 ORDER BY seq", build_id
    )
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    assert await pg.fetchval("SELECT turns FROM builds WHERE build_id = $1", build_id) == len(rows)
    assert [r["role"] for r in rows] == ["user", "assistant"] * (len(rows) // 2)
    turns = [json.loads(r["content"]) for r in rows]
    for asked, answered in zip(turns[1::2], turns[2::2], strict=False):
        uses = [b["id"] for b in asked if b["type"] == "tool_use"]
        assert [b["tool_use_id"] for b in answered] == uses
    return turns


async def test_replicas_killed_mid_collection_and_mid_call_finish_the_build(
    own_nats: str, own_db: str, pg: asyncpg.Pool, scripted: ScriptedServer, uid: str, tmp_path: Path
) -> None:
    build_id = f"dur{uid}"
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
            "KILN_AGENT_WORKERS": "8",
        }
        replicas[name] = Replica(name, env, tmp_path)

    def caller(assistant_turns: int) -> list[str]:
        """Which replicas asked for the model call after that many assistant turns."""
        return [
            r.prefix.strip("/")
            for r in scripted.recorded
            if sum(m["role"] == "assistant" for m in r.request["messages"]) == assistant_turns
        ]

    killed_in_call: list[str] = []

    async def on_request(rec: Recorded) -> None:
        # the 5th model call (after 4 assistant turns): SIGKILL whoever makes it, mid-call
        if sum(m["role"] == "assistant" for m in rec.request["messages"]) == 4:
            if not killed_in_call:
                killed_in_call.append(rec.prefix.strip("/"))
                await until(replicas["c"].ready, what="replica c started")
                replicas[rec.prefix.strip("/")].kill()

    scripted.on_request = on_request

    # the fake sandbox: runs each ToolCall it receives, recording it; holds the write phase's
    # second and third results until a replica has been killed
    sandbox = Bus(CommonSettings(nats_url=own_nats, ack_wait_s=10), "sandbox")
    executed: list[str] = []
    release = asyncio.Event()
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()

    async def run_tool(call: ToolCall, _: Delivery) -> None:
        if call.build_id != build_id:
            return
        executed.append(call.call_id)
        result = await asyncio.to_thread(ws.run, call)
        if call.iteration == 2 and not call.call_id.startswith("toolu_write_0_"):
            await release.wait()
        await sandbox.publish(result)

    sandbox.consume(ToolCall, run_tool, max_workers=8)
    await sandbox.connect()
    await sandbox.start()
    start("a")
    start("b")
    try:
        await sandbox.publish(
            BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="textstats")
        )

        async def recorded_results() -> int:
            row = await pg.fetchrow(
                "SELECT iteration, status, state FROM builds WHERE build_id = $1", build_id
            )
            if row is None or (row["iteration"], row["status"]) != (2, "acting"):
                return -1
            return len(json.loads(row["state"])["results"])

        deadline = asyncio.get_running_loop().time() + 60
        while await recorded_results() != 1:
            assert asyncio.get_running_loop().time() < deadline, "the write phase never began"
            await asyncio.sleep(0.05)
        # 1 of 3 results recorded: kill the replica that thought this iteration, then let the
        # other results come; the survivor collects them
        [first_victim] = caller(1)
        replicas[first_victim].kill()
        release.set()
        start("c")

        async def status() -> str | None:
            return await pg.fetchval("SELECT status FROM builds WHERE build_id = $1", build_id)

        deadline = asyncio.get_running_loop().time() + 90
        while await status() != "completed":
            assert asyncio.get_running_loop().time() < deadline, (
                f"not completed: {await status()}; "
                + "\n".join(r.log.read_text()[-1500:] for r in replicas.values())
            )
            await asyncio.sleep(0.1)

        # the call was killed mid-flight and redone by another replica
        assert killed_in_call and len(caller(4)) == 2 and caller(4)[0] != caller(4)[1]
        # no ToolCall ran twice, and every one the model asked for of the sandbox ran
        assert [c for c, n in collections.Counter(executed).items() if n > 1] == []
        turns = await transcript_is_whole(pg, build_id)
        asked = {
            b["id"]
            for t in turns[1::2]
            for b in t
            if b["type"] == "tool_use" and b["name"] != "narrate"
        }
        assert set(executed) == asked
        assert "-item[1]" in (ws.root / "textstats" / "__init__.py").read_text()
    finally:
        for r in replicas.values():
            r.kill()
        await sandbox.stop()


class CountingStore(PostgresStore):
    conflicts = 0

    async def save(self, cp: Any, new_turns: Any, **kw: Any) -> bool:
        try:
            return await super().save(cp, new_turns, **kw)
        except VersionConflict:
            CountingStore.conflicts += 1
            raise


async def test_two_replicas_and_many_parallel_calls_lose_nothing(
    own_nats: str, own_db: str, pg: asyncpg.Pool, scripted: ScriptedServer, uid: str
) -> None:
    iterations, parallel = 6, 16
    scripted.responder = LongScript(iterations, parallel, scripted.model.usage).respond
    settings = AgentSettings(nats_url=own_nats, database_url=own_db, ack_wait_s=5)
    buses, models, pools = [], [], []
    for _ in range(2):
        pool = await create_pool(own_db, schema=SCHEMA, migrations=migrations())
        model = AnthropicModel.connect(base_url=scripted.url, api_key="k", timeout_s=30)
        bus = Bus(settings, "agentpar")  # the same durable consumers: two replicas
        agent = Agent(
            CountingStore(pool), model, bus, config.load(), kiln_config.default(), lease_s=5
        )
        app.register(bus, agent, workers=32)
        buses.append(bus)
        models.append(model)
        pools.append(pool)
    sandbox = Bus(CommonSettings(nats_url=own_nats), "sandboxpar")
    executed: list[str] = []

    build_id = f"par{uid}"

    async def run_tool(call: ToolCall, _: Delivery) -> None:
        if call.build_id != build_id:
            return  # an earlier test's, on this module's stream
        executed.append(call.call_id)
        await asyncio.sleep(random.uniform(0, 0.02))
        result: ToolResult = result_for(call, f"ran {call.call_id}")
        await sandbox.publish(result)
        if random.random() < 0.5:
            await sandbox.publish(result_for(call, f"ran {call.call_id}"))  # new event id

    sandbox.consume(ToolCall, run_tool, max_workers=32)
    for b in (*buses, sandbox):
        await b.connect()
        await b.start()
    try:
        await sandbox.publish(
            BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="fan out")
        )

        async def status() -> str | None:
            return await pg.fetchval("SELECT status FROM builds WHERE build_id = $1", build_id)

        deadline = asyncio.get_running_loop().time() + 60
        while await status() != "completed":
            assert asyncio.get_running_loop().time() < deadline, f"status {await status()}"
            await asyncio.sleep(0.05)
        turns = await transcript_is_whole(pg, build_id)
        results = [t for t in turns[2::2]]
        assert len(results) == iterations - 1
        for i, t in enumerate(results):
            sandboxed = [b for b in t if not b["content"] == "ok"]  # narrate answers "ok"
            assert len(sandboxed) == parallel, f"iteration {i + 1} lost results"
            assert all(b["content"] == f"ran {b['tool_use_id']}" for b in sandboxed)
        assert len(scripted.recorded) == iterations  # one model call per iteration
        assert sorted(collections.Counter(executed).values()) == [1] * parallel * (iterations - 1)
        print(f"version conflicts resolved by re-applying: {CountingStore.conflicts}")
    finally:
        for b in (sandbox, *buses):
            await b.stop()
        for m in models:
            await m.close()
        for p in pools:
            await p.close()
