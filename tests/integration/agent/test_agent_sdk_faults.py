"""The agent through the real anthropic SDK against the scripted server, with injected faults:
retries (429 with retry-after, 529, 500, timeouts), every stop reason, parallel tool calls whose
results arrive out of order and duplicated, and context-window overflows (compact, then retry)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kiln_agent import config as agent_config
from kiln_agent.adapters.anthropic_model import AnthropicModel
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.loop import CONTINUE, Agent
from kiln_agent.ports import ContextWindowExceeded, ModelRequest
from kiln_contracts import BuildCompleted, BuildFailed, BuildRequested, IterationCompleted, ToolCall
from kiln_devstack.model.server import Fault, ScriptedServer
from kiln_runtime import config as kiln_config
from tests.unit.test_agent_fakes import FakePublisher, result_for, text, tool_use

pytestmark = pytest.mark.integration

REQUEST = ModelRequest(
    model="claude-haiku-5-5",
    system=[],
    tools=[],
    max_tokens=10,
    messages=[{"role": "user", "content": "hi"}],
)


def connect(server: ScriptedServer, **kwargs: Any) -> AnthropicModel:
    kwargs.setdefault("timeout_s", 5)
    kwargs.setdefault("attempts", 6)
    kwargs.setdefault("backoff_base_s", 0.001)
    kwargs.setdefault("backoff_cap_s", 0.005)
    return AnthropicModel.connect(base_url=server.url, api_key="k", **kwargs)


def agent_on(
    server: ScriptedServer, **config: Any
) -> tuple[Agent, MemoryStore, FakePublisher, AnthropicModel]:
    cfg = agent_config.load().model_copy(update=config)
    model = connect(server)
    store, pub = MemoryStore(), FakePublisher()
    return Agent(store, model, pub, cfg, kiln_config.default()), store, pub, model


def start(build_id: str = "b1") -> BuildRequested:
    return BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="A tool.")


async def test_transient_failures_are_retried_through_the_sdk(scripted: ScriptedServer) -> None:
    model = connect(scripted, timeout_s=0.5)
    try:
        scripted.faults = [
            Fault(429, retry_after="0"),
            Fault(529),
            Fault(500),
            Fault(500, delay_s=2.0),  # answers after the client's 0.5 s timeout
            Fault(0, delay_s=0.01),  # hangs up without an answer
        ]
        reply = await model.complete(REQUEST)
        assert reply.stop_reason == "tool_use"
        assert scripted.attempts == 6 and scripted.requests == 1
    finally:
        await model.close()


async def test_retry_after_is_honoured(scripted: ScriptedServer) -> None:
    model = connect(scripted)  # its own backoff would wait at most 5 ms
    loop = asyncio.get_running_loop()
    try:
        for fault in (Fault(429, retry_after_ms="400"), Fault(529, retry_after="0.4")):
            scripted.faults = [fault]
            began = loop.time()
            await model.complete(REQUEST)
            assert loop.time() - began >= 0.4
    finally:
        await model.close()


async def test_retries_spent_fail_the_build_with_the_reason(scripted: ScriptedServer) -> None:
    agent, _, pub, model = agent_on(scripted)
    agent.model = connect(scripted, attempts=3)
    try:
        scripted.faults = [500, 529, Fault(429, retry_after="0")]
        await agent.build_requested(start())
        [failed] = pub.of(BuildFailed)
        assert failed.reason == "model_error" and "429" in failed.detail
        assert scripted.requests == 0
    finally:
        await model.close()
        await agent.model.close()  # type: ignore[attr-defined]


async def test_stop_reasons(scripted: ScriptedServer) -> None:
    agent, store, pub, model = agent_on(scripted)
    try:
        scripted.canned = [
            ([text("Half a thought")], "max_tokens"),
            ([text("Searching the web")], "pause_turn"),
            ([text("I will not build that.")], "refusal"),
        ]
        await agent.build_requested(start())
        requests = [r.request for r in scripted.recorded]
        assert len(requests) == 3
        # max_tokens: the partial turn, then a user turn asking to continue
        # (each assistant turn starts with the thinking block it came with)
        assert requests[1]["messages"][-2]["content"][0]["type"] == "thinking"
        assert requests[1]["messages"][-2]["content"][-1]["text"] == "Half a thought"
        assert requests[1]["messages"][-1]["content"][0]["text"] == CONTINUE
        # pause_turn: the request ends with the paused assistant turn, for the model to go on
        assert requests[2]["messages"][-1]["role"] == "assistant"
        assert requests[2]["messages"][-1]["content"][-1]["text"] == "Searching the web"
        [failed] = pub.of(BuildFailed)
        assert failed.reason == "model_refusal" and "will not build" in failed.detail
        stops = [i.stop_reason for i in pub.of(IterationCompleted)]
        assert stops == ["max_tokens", "pause_turn", "refusal"]
        assert [t.seq for t in await store.turns("b1")] == list(range(5))
    finally:
        await model.close()


async def test_parallel_calls_with_results_out_of_order_and_duplicated(
    scripted: ScriptedServer,
) -> None:
    agent, _, pub, model = agent_on(scripted)
    try:
        calls = [tool_use(f"c{i}", "bash", command=f"echo {i}") for i in range(5)]
        scripted.canned = [
            ([text("five at once"), *calls], "tool_use"),
            ([text("done")], "end_turn"),
        ]
        await agent.build_requested(start())
        sent = pub.of(ToolCall)
        assert [c.call_id for c in sent] == [f"c{i}" for i in range(5)]
        order = [4, 1, 1, 3, 0, 4, 2, 2, 0]  # out of order, with duplicates (also after the set)
        for i in order:
            await agent.tool_result(result_for(sent[i], f"out {i}"))
        assert len(scripted.recorded) == 2  # one think after the set completed, none for repeats
        last = scripted.recorded[1].request["messages"][-1]
        assert [b["tool_use_id"] for b in last["content"]] == [f"c{i}" for i in range(5)]
        assert [b["content"] for b in last["content"]] == [f"out {i}" for i in range(5)]
        assert len(pub.of(BuildCompleted)) == 1
    finally:
        await model.close()


async def _two_long_iterations(agent: Agent, scripted: ScriptedServer, pub: FakePublisher) -> None:
    scripted.canned = [
        ([tool_use("c1", "bash", command="cat big1")], "tool_use"),
        ([tool_use("c2", "bash", command="cat big2")], "tool_use"),
    ]
    await agent.build_requested(start())
    await agent.tool_result(result_for(pub.of(ToolCall)[0], "x" * 5000))


@pytest.mark.parametrize("overflow", ["http_400", "stop_reason"])
async def test_context_overflow_compacts_then_retries(
    scripted: ScriptedServer, overflow: str
) -> None:
    agent, store, pub, model = agent_on(scripted, keep_recent_turns=2)
    try:
        await _two_long_iterations(agent, scripted, pub)
        if overflow == "http_400":
            scripted.faults = [Fault(400, message="prompt is too long: 210000 tokens > 200000")]
        else:
            scripted.canned = [([text("partial")], "model_context_window_exceeded")]
        scripted.canned.append(([text("done")], "end_turn"))
        await agent.tool_result(result_for(pub.of(ToolCall)[1], "y" * 5000))
        assert len(pub.of(BuildCompleted)) == 1
        final = scripted.recorded[-1].request["messages"]
        assert final[2]["content"][0]["content"] == "[5000 characters of old output cleared]"
        assert final[4]["content"][0]["content"] == "y" * 5000  # recent turns kept
        stored = await store.turns("b1")
        assert stored[2].content[0]["content"] == "x" * 5000  # the stored turns keep it all
        cp = await store.load("b1")
        assert cp is not None and cp.state.compacted_before == 3
    finally:
        await model.close()


async def test_overflow_with_nothing_left_to_clear_fails_with_context_window(
    scripted: ScriptedServer,
) -> None:
    agent, _, pub, model = agent_on(scripted)
    try:
        scripted.faults = [Fault(400, message="prompt is too long: 210000 tokens > 200000")]
        await agent.build_requested(start())
        [failed] = pub.of(BuildFailed)
        assert failed.reason == "context_window"
    finally:
        await model.close()


async def test_prompt_too_long_is_its_own_error(scripted: ScriptedServer) -> None:
    model = connect(scripted)
    try:
        scripted.faults = [Fault(400, message="prompt is too long: 210000 tokens > 200000")]
        with pytest.raises(ContextWindowExceeded):
            await model.complete(REQUEST)
    finally:
        await model.close()
