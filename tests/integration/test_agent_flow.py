"""The agent on real NATS + Postgres, the model through the anthropic SDK against the scripted
server, and a tiny sandbox responder in the test that runs the ToolCalls in a temp directory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kiln_agent import app, config
from kiln_agent.adapters.anthropic_model import AnthropicModel
from kiln_agent.adapters.postgres import SCHEMA, PostgresStore, migrations
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.loop import Agent, build_request
from kiln_agent.ports import LeaseChange, ModelError, ModelRequest, VersionConflict
from kiln_agent.settings import AgentSettings
from kiln_contracts import (
    BuildCompleted,
    BuildContinued,
    BuildLimits,
    BuildRequested,
    Envelope,
    IterationCompleted,
    SendUserMessage,
    ToolCall,
    ToolResult,
)
from kiln_contracts.routes import CONSUMES
from kiln_devstack.model.server import ScriptedServer
from kiln_runtime import config as kiln_config
from kiln_runtime.bus import Bus, Delivery
from kiln_runtime.db import create_pool
from kiln_runtime.settings import CommonSettings
from tests.unit.test_agent_fakes import Workspace

pytestmark = pytest.mark.integration


def new_checkpoint(build_id: str) -> Checkpoint:
    return Checkpoint(
        build_id=build_id, user_id="u", tier="pro", model="m", limits=BuildLimits(), system="s"
    )


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start()
    yield server
    await server.stop()


class OnlyMine(Agent):
    """The real agent, deaf to other tests' builds on the shared stream."""

    prefix = ""

    async def build_requested(self, msg, delivered=1):  # type: ignore[no-untyped-def]
        if msg.build_id.startswith(self.prefix):
            await super().build_requested(msg, delivered)

    async def tool_result(self, msg):  # type: ignore[no-untyped-def]
        if msg.build_id.startswith(self.prefix):
            await super().tool_result(msg)

    async def user_message(self, msg, delivered=1):  # type: ignore[no-untyped-def]
        if msg.build_id.startswith(self.prefix):
            await super().user_message(msg, delivered)


async def test_build_completes_on_nats_and_postgres_through_the_sdk(
    infra, uid, scripted, tmp_path: Path
) -> None:
    settings = AgentSettings(
        nats_url=infra["NATS_URL"],
        database_url=infra["DATABASE_URL"],
        anthropic_base_url=scripted.url,
        anthropic_api_key="test",
        ack_wait_s=10,
    )
    pool = await create_pool(settings.database_url, schema=SCHEMA, migrations=migrations())
    model = AnthropicModel.connect(base_url=scripted.url, api_key="test", timeout_s=30)
    bus = Bus(settings, f"agent{uid}")
    agent = OnlyMine(PostgresStore(pool), model, bus, config.load(), kiln_config.default())
    agent.prefix = uid
    app.register(bus, agent, workers=16)

    # the test's sandbox: answers this test's ToolCalls by running them in a directory
    sandbox = Bus(CommonSettings(nats_url=infra["NATS_URL"]), f"sandbox{uid}")
    seen: list[Envelope] = []
    workspaces: dict[str, Workspace] = {}

    async def run_tool(call: ToolCall, delivery: Delivery) -> None:
        if call.build_id.startswith(uid):
            ws = workspaces.setdefault(call.build_id, Workspace(tmp_path / call.build_id))
            ws.root.mkdir(exist_ok=True)
            await sandbox.publish(await asyncio.to_thread(ws.run, call))

    async def watch(event: Envelope, delivery: Delivery) -> None:
        if event.build_id.startswith(uid):
            seen.append(event)

    sandbox.consume(ToolCall, run_tool, max_workers=8)
    sandbox.consume_all(watch, durable=f"watch{uid}", max_workers=4)
    for b in (bus, sandbox):
        await b.connect()
        await b.start()
    try:
        builds = [f"{uid}-{i}" for i in range(3)]
        for build_id in builds:
            msg = BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="stats")
            await bus.publish(msg)
            await bus.publish(msg.with_id(msg.event_id))  # a duplicate publish
            # another request for the same build id (it may even win the race): still one build
            again = BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="again")
            await bus.publish(again)

        def completed() -> list[BuildCompleted]:
            return [e for e in seen if isinstance(e, BuildCompleted)]

        await until(lambda: len(completed()) == len(builds), timeout=60)
        await asyncio.sleep(0.3)  # nothing more may follow
        assert sorted(e.build_id for e in completed()) == builds
        for done in completed():
            assert "all tests pass" in done.summary
            mine = [e for e in seen if e.build_id == done.build_id]
            iterations = [e.iteration for e in mine if isinstance(e, IterationCompleted)]
            assert iterations == list(range(1, done.iterations + 1))
            models = {e.model for e in mine if isinstance(e, IterationCompleted)}
            assert models == {"claude-sonnet-5-5"}  # the pro tier's model, a dateless id
            calls = {e.call_id for e in mine if isinstance(e, ToolCall)}
            results = {e.call_id for e in mine if isinstance(e, ToolResult)}
            assert calls == results
            pkg = tmp_path / done.build_id / "textstats" / "__init__.py"
            assert "-item[1]" in pkg.read_text()
        row = await pool.fetchrow(
            "SELECT status, turns, version FROM builds WHERE build_id = $1", builds[0]
        )
        assert row["status"] == "completed"
        n_turns = await pool.fetchval("SELECT count(*) FROM turns WHERE build_id = $1", builds[0])
        assert n_turns == row["turns"]
    finally:
        for b in (bus, sandbox):
            await b.stop()
        await model.close()
        await pool.close()


async def test_a_build_is_steered_and_continued_through_the_sdk(
    infra, uid, scripted, tmp_path: Path
) -> None:
    """On NATS and Postgres, through the SDK to the scripted server (which enforces the API's
    rules: thinking blocks bound to their prefix, user turns one after another): a message sent
    while the build works is answered, and one sent after it completed continues it."""
    settings = AgentSettings(
        nats_url=infra["NATS_URL"],
        database_url=infra["DATABASE_URL"],
        anthropic_base_url=scripted.url,
        anthropic_api_key="test",
        ack_wait_s=10,
    )
    pool = await create_pool(settings.database_url, schema=SCHEMA, migrations=migrations())
    model = AnthropicModel.connect(base_url=scripted.url, api_key="test", timeout_s=30)
    bus = Bus(settings, f"agent{uid}")
    agent = OnlyMine(PostgresStore(pool), model, bus, config.load(), kiln_config.default())
    agent.prefix = uid
    app.register(bus, agent, workers=16)
    sandbox = Bus(CommonSettings(nats_url=infra["NATS_URL"]), f"sandbox{uid}")
    seen: list[Envelope] = []
    ws = Workspace(tmp_path)

    async def run_tool(call: ToolCall, delivery: Delivery) -> None:
        if call.build_id.startswith(uid):
            await sandbox.publish(await asyncio.to_thread(ws.run, call))

    async def watch(event: Envelope, delivery: Delivery) -> None:
        if event.build_id.startswith(uid):
            seen.append(event)

    sandbox.consume(ToolCall, run_tool, max_workers=8)
    sandbox.consume_all(watch, durable=f"watch{uid}", max_workers=1)
    for b in (bus, sandbox):
        await b.connect()
        await b.start()

    def of(cls: type) -> list:
        return list({e.event_id: e for e in seen if isinstance(e, cls)}.values())

    try:
        build_id = f"{uid}-talk"
        await bus.publish(
            BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="stats")
        )
        await until(lambda: len(of(ToolCall)) > 0)
        steer = SendUserMessage.of(build_id, "u1", "m1", 1, "add a file NOTES.md with steered")
        await bus.publish(steer)
        await bus.publish(steer.with_id(steer.event_id))
        await until(lambda: len(of(BuildCompleted)) == 1, timeout=60)
        [first] = of(BuildCompleted)
        assert "all tests pass" in first.summary
        assert (tmp_path / "NOTES.md").read_text() == "steered\n"

        await bus.publish(SendUserMessage.of(build_id, "u1", "m2", 2, "please write TODO.md"))
        await until(lambda: len(of(BuildCompleted)) == 2, timeout=60)
        [continued] = of(BuildContinued)
        assert (continued.continuation, continued.iterations) == (1, first.iterations)
        second = next(e for e in of(BuildCompleted) if e.continuation == 1)
        assert "TODO.md" in second.summary and second.iterations > first.iterations
        assert (tmp_path / "TODO.md").is_file()
        iterations = [e.iteration for e in of(IterationCompleted)]
        assert sorted(iterations) == list(range(1, second.iterations + 1))
        assert scripted.refused == []  # every request kept the API's rules
    finally:
        for b in (bus, sandbox):
            await b.stop()
        await model.close()
        await pool.close()


async def test_postgres_checkpoint_optimistic_concurrency(infra, uid) -> None:
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    store = PostgresStore(pool)
    try:
        cp = new_checkpoint(f"pg{uid}")
        cp.turns = 1
        assert await store.create(cp, [Turn(0, "user", [{"type": "text", "text": "go"}])])
        assert not await store.create(cp, [])
        again = [Turn(0, "user", [{"type": "text", "text": "other"}]), Turn(1, "assistant", [])]
        assert not await store.create(cp, again)  # a repeat writes no turn
        assert [t.content for t in await store.turns(cp.build_id)] == [
            [{"type": "text", "text": "go"}]
        ]
        a, b = await store.load(cp.build_id), await store.load(cp.build_id)
        assert a is not None and b is not None
        a.iteration, a.turns = 1, 2
        a.outbox = [
            ToolCall(
                build_id=cp.build_id, user_id="u", call_id="c", iteration=1, tool="bash", input={}
            )
        ]
        await store.save(a, [Turn(1, "assistant", [{"type": "text", "text": "hi"}])])
        with pytest.raises(VersionConflict):
            await store.save(b, [Turn(1, "assistant", [])])
        fresh = await store.load(cp.build_id)
        assert fresh is not None and fresh.version == 2 and fresh.iteration == 1
        assert [m.kind for m in fresh.outbox] == ["tool_call"]
        await store.mark_sent({cp.build_id: 1})  # a stale version: no effect
        assert (await store.load(cp.build_id)).outbox  # type: ignore[union-attr]
        await store.mark_sent({cp.build_id: 2, "no-such-build": 1})
        assert (await store.load(cp.build_id)).outbox == []  # type: ignore[union-attr]
        assert [t.role for t in await store.turns(cp.build_id)] == ["user", "assistant"]
    finally:
        await pool.close()


async def test_postgres_think_lease_is_taken_with_the_checkpoint_and_given_up_by_the_save(
    infra, uid
) -> None:
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    store = PostgresStore(pool)
    try:
        cp = new_checkpoint(f"lease{uid}")
        assert await store.create(cp, [])
        wait, held = await store.take_lease(cp.build_id, "one", 5)
        assert wait == 0.0 and held is not None and held.version == 1
        wait, none = await store.take_lease(cp.build_id, "two", 5)
        assert none is None and 4 < wait <= 5
        assert await store.extend_lease(cp.build_id, "one", 5)
        assert not await store.extend_lease(cp.build_id, "two", 5)
        await store.save(held, [], LeaseChange(give_up="two"))  # not the holder: the lease stays
        assert (await store.take_lease(cp.build_id, "two", 5))[0] > 0
        held.iteration = 1
        await store.save(
            held, [], LeaseChange(give_up="one")
        )  # the holder: saved and given up at once
        assert not await store.extend_lease(cp.build_id, "one", 5)  # a late renewal takes nothing
        wait, fresh = await store.take_lease(cp.build_id, "two", 5)
        assert wait == 0.0 and fresh is not None and fresh.iteration == 1 and fresh.version == 3
        assert await store.take_lease(f"missing{uid}", "two", 5) == (0.0, None)
        # a save takes the lease for its token only if it is free; it is saved either way
        fresh.iteration = 2
        assert not await store.save(fresh, [], LeaseChange(take="three", ttl_s=5))  # "two" holds it
        await store.release_lease(cp.build_id, "two")
        assert await store.save(fresh, [], LeaseChange(take="three", ttl_s=5))
        assert (await store.take_lease(cp.build_id, "two", 5))[0] > 4
        assert await store.save(fresh, [], LeaseChange(take="three", ttl_s=5))  # its own already
        again = await store.load(cp.build_id)
        assert again is not None and again.version == 6 and again.iteration == 2
    finally:
        await pool.close()


async def test_postgres_turns_read_back_as_they_were_saved(infra, uid) -> None:
    """Same keys in the same order (jsonb would sort them): requests built from turns read back
    are byte-identical to those built from the turns the agent kept."""
    pool = await create_pool(infra["DATABASE_URL"], schema=SCHEMA, migrations=migrations())
    store = PostgresStore(pool)
    try:
        cp = new_checkpoint(f"order{uid}")
        content = [
            {"type": "tool_use", "id": "c1", "name": "bash", "input": {"zz": 1.5, "a": [{"y": 1}]}},
            {"type": "text", "text": 'é ✓ \\ "q"'},
        ]
        cp.turns = 1
        assert await store.create(cp, [Turn(0, "user", [{"type": "text", "text": "go"}])])
        cp.turns = 2
        saved = Turn(1, "assistant", content)
        await store.save(cp, [saved])
        [back] = await store.turns(cp.build_id, since=1)
        assert json.dumps(back.content) == json.dumps(content)
        # the text read back is the text written: the turn is sent as that JSON, not re-encoded
        assert back.stored == saved.content_json and back.message.json == saved.message.json
    finally:
        await pool.close()


async def test_sdk_path_against_the_scripted_server(scripted) -> None:
    model = AnthropicModel.connect(
        base_url=scripted.url, api_key="k", timeout_s=10, attempts=3, backoff_base_s=0.01
    )
    try:
        cp = Checkpoint(
            build_id="b", user_id="u", tier="pro", model="claude-haiku-5-5", limits=BuildLimits(),
            system="You build things.",
        )  # fmt: skip
        cfg = config.load()
        from kiln_agent.tools import definitions

        turns = [Turn(0, "user", [{"type": "text", "text": "Build it."}])]
        scripted.model.usage.min_cache_tokens = 0  # this short request may be cached too
        request = build_request(cp, turns, definitions(cfg.narrate_description), cfg)
        reply = await model.complete(request)
        assert reply.model == "claude-haiku-5-5" and reply.stop_reason == "tool_use"
        assert [b["name"] for b in reply.content if b["type"] == "tool_use"] == [
            "narrate",
            "list_dir",
        ]
        assert reply.usage.cache_creation_input_tokens > 0
        again = await model.complete(request)
        assert again.usage.cache_read_input_tokens == reply.usage.cache_creation_input_tokens

        scripted.faults = [529, 429]  # retried (retry-after: 0), then answered
        assert (await model.complete(request)).stop_reason == "tool_use"
        scripted.faults = [529, 529, 529]
        with pytest.raises(ModelError, match="529"):
            await model.complete(request)
        scripted.faults = []
        bad = ModelRequest(model="claude-haiku-5-5", system=[], tools=[], messages=[], max_tokens=0)
        with pytest.raises(ModelError, match="400"):
            await model.complete(bad)
    finally:
        await model.close()


async def test_scripted_server_serves_many_connections(scripted) -> None:
    models = [
        AnthropicModel.connect(base_url=scripted.url, api_key="k", timeout_s=10) for _ in range(50)
    ]
    request = ModelRequest(
        model="claude-haiku-5-5", system=[], tools=[], max_tokens=10,
        messages=[{"role": "user", "content": "hi"}],
    )  # fmt: skip
    try:
        replies = await asyncio.gather(*(m.complete(request) for m in models))
        assert {r.stop_reason for r in replies} == {"tool_use"}
    finally:
        await asyncio.gather(*(m.close() for m in models))


async def test_an_idle_model_connection_is_kept_for_the_next_call(scripted) -> None:
    request = ModelRequest(
        model="claude-haiku-5-5", system=[], tools=[], max_tokens=10,
        messages=[{"role": "user", "content": "hi"}],
    )  # fmt: skip
    for keepalive_s, connections in ((0.1, 2), (30.0, 1)):
        model = AnthropicModel.connect(
            base_url=scripted.url, api_key="k", timeout_s=10, keepalive_s=keepalive_s
        )
        before = scripted.connections
        try:
            await model.complete(request)
            await asyncio.sleep(1.0)  # idle longer than the short keep-alive
            await model.complete(request)
        finally:
            await model.close()
        assert scripted.connections - before == connections


async def test_bootstrap_wires_the_real_adapters(infra, scripted) -> None:
    from kiln_agent.bootstrap import build

    settings = AgentSettings(
        nats_url=infra["NATS_URL"],
        database_url=infra["DATABASE_URL"],
        anthropic_base_url=scripted.url,
        anthropic_api_key="k",
    )
    service = build(settings)
    await service.bus.connect()
    # reads the budget gates, opens the pool and the client, registers the subscribers
    await service.start()
    try:
        assert service.pool is not None and await service.pool.fetchval("SELECT 1") == 1
        assert len(service.bus.pullers) == len(CONSUMES["agent"])
        assert service.gates is not None and await service.gates.closed("nobody") is None
    finally:
        await service.stop()
        await service.bus.stop()
