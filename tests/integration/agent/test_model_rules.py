"""The rules of the current Claude models, as the scripted server enforces them, one test each,
through the real anthropic SDK: signed thinking blocks before tool use, a 400 in the API's error
shape for a thinking block lost or altered and for each setting the models refuse, dated ids for
the models that have them, the Models API; and the agent on them: a whole build completes, a
refusal fails the build at once with the API's message, a model switch keeps the conversation."""

from __future__ import annotations

import copy
import json
from typing import Any

import anthropic
import pytest

from kiln_agent import config as agent_config
from kiln_agent.adapters.anthropic_model import AnthropicModel, ModelUnavailable
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.loop import Agent
from kiln_agent.transitions import Rules
from kiln_contracts import (
    AgentNarrated,
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    IterationCompleted,
    ToolCall,
    ToolResult,
)
from kiln_devstack.model.server import ScriptedServer
from kiln_runtime import config as kiln_config
from kiln_runtime.config import KilnConfig
from tests.unit.test_agent_fakes import FakePublisher

pytestmark = pytest.mark.integration

TOOLS = [{"name": "bash", "description": "run", "input_schema": {"type": "object"}}]


def body(model: str = "claude-sonnet-5-5", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 1000,
        "tools": TOOLS,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Build the app."}]}],
        **extra,
    }


async def post(server: ScriptedServer, payload: dict[str, Any], **headers: str) -> Any:
    client = anthropic.AsyncAnthropic(api_key="k", base_url=server.url, max_retries=0)
    try:
        raw = await client.post(
            "/v1/messages", cast_to=bytes, body=payload, options={"headers": headers}
        )
        return json.loads(raw)
    finally:
        await client.close()


async def refused(server: ScriptedServer, payload: dict[str, Any], **headers: str) -> str:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await post(server, payload, **headers)
    err = caught.value
    assert err.status_code == 400
    assert isinstance(err.body, dict) and err.body["error"]["type"] == "invalid_request_error"
    return err.message


def answered(first: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """The request with the reply and a tool result for each of its calls appended."""
    calls = [b for b in first["content"] if b["type"] == "tool_use"]
    results = [{"type": "tool_result", "tool_use_id": c["id"], "content": "ok"} for c in calls]
    messages = request["messages"] + [
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": results},
    ]
    return {**request, "messages": messages}


# ---------------------------------------------------------------------------- replies


async def test_a_reply_starts_with_a_signed_thinking_block_before_tool_use(
    scripted: ScriptedServer,
) -> None:
    reply = await post(scripted, body())
    kinds = [b["type"] for b in reply["content"]]
    assert kinds[0] == "thinking" and "tool_use" in kinds
    first = reply["content"][0]
    assert first["signature"] and first["thinking"] == ""  # display omitted by default
    shown = await post(scripted, body(thinking={"type": "adaptive", "display": "summarized"}))
    assert shown["content"][0]["thinking"]  # summarized: its text comes back
    assert reply["model"] == "claude-sonnet-5-5"  # a dateless id is its own snapshot


async def test_the_conversation_goes_on_when_thinking_is_sent_back_unchanged(
    scripted: ScriptedServer,
) -> None:
    request = body()
    reply = await post(scripted, request)
    again = await post(scripted, answered(reply, request))
    assert again["type"] == "message" and "input_transformations" not in again


async def test_a_lost_thinking_block_is_refused(scripted: ScriptedServer) -> None:
    request = body()
    reply = await post(scripted, request)
    lost = copy.deepcopy(reply)
    lost["content"] = [b for b in lost["content"] if b["type"] not in ("thinking",)]
    lost["content"] = [b for b in lost["content"] if b["type"] != "redacted_thinking"]
    message = await refused(scripted, answered(lost, request))
    assert "Expected `thinking` or `redacted_thinking`, but found" in message


async def test_an_altered_thinking_block_is_refused(scripted: ScriptedServer) -> None:
    request = body(thinking={"type": "adaptive", "display": "summarized"})
    reply = await post(scripted, request)
    altered = copy.deepcopy(reply)
    altered["content"][0]["thinking"] += " (edited)"
    assert "Invalid `signature` in `thinking` block" in await refused(
        scripted, answered(altered, request)
    )


async def test_thinking_is_bound_to_the_turns_before_it(scripted: ScriptedServer) -> None:
    request = body()
    reply = await post(scripted, request)
    follow = answered(reply, request)
    follow["messages"][0]["content"][0]["text"] = "Build another app."  # history rewritten
    assert "bound to a different conversation" in await refused(scripted, follow)
    # unless the request asks for such blocks to be dropped (with the beta header)
    follow["thinking"] = {
        "type": "adaptive",
        "block_binding": {"prefix_mismatch_behavior": "drop_block"},
    }
    assert "block_binding" in await refused(scripted, follow)  # no beta header
    ok = await post(scripted, follow, **{"anthropic-beta": "thinking-binding-controls-2026-08-01"})
    assert {d["reason"] for d in ok["input_transformations"]} == {"prefix_binding_mismatch"}


async def test_the_binding_ignores_nulls_and_cache_control_but_not_the_tools(
    scripted: ScriptedServer,
) -> None:
    request = body()
    reply = await post(scripted, request)
    follow = answered(reply, request)
    # a client echoing a field as null, or marking a cache breakpoint, changes no prefix
    follow["messages"][0]["content"][0] |= {
        "citations": None,
        "cache_control": {"type": "ephemeral"},
    }
    assert (await post(scripted, follow))["type"] == "message"
    follow["tools"] = [{**TOOLS[0], "description": "run a command"}]
    assert "bound to a different conversation" in await refused(scripted, follow)


async def test_another_models_thinking_is_dropped_not_refused(scripted: ScriptedServer) -> None:
    request = body("claude-sonnet-5-5")
    reply = await post(scripted, request)
    # Haiku 5.5 cannot read Sonnet 5.5's thinking: the API drops it and answers
    moved = await post(scripted, {**answered(reply, request), "model": "claude-haiku-5-5"})
    assert {d["reason"] for d in moved["input_transformations"]} == {"model_binding_mismatch"}


# ---------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"temperature": 0.2}, "`temperature` is deprecated for this model."),
        ({"top_p": 0.9}, "`top_p` is deprecated for this model."),
        ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, '"thinking.type.enabled"'),
        ({"thinking": {"type": "disabled"}}, "between_tools"),
        ({"thinking": {"type": "adaptive", "display": "raw"}}, "thinking.display"),
        ({"tool_choice": {"type": "any"}}, 'tool_choice: type "tool" and "any"'),
        ({"tool_choice": {"type": "tool", "name": "bash"}}, 'tool_choice: type "tool"'),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"max_tokens": 200_000}, "maximum allowed number of output tokens"),
    ],
)
async def test_each_refused_setting_is_a_400(
    scripted: ScriptedServer, extra: dict[str, Any], expected: str
) -> None:
    assert expected in await refused(scripted, body(**extra))


async def test_opus_refuses_thinking_disabled_and_prefill(scripted: ScriptedServer) -> None:
    message = await refused(scripted, body("claude-opus-5-5", thinking={"type": "disabled"}))
    assert '"thinking.type.disabled" is not supported for this model' in message
    prefill = body("claude-opus-5-5")
    prefill["messages"].append({"role": "assistant", "content": [{"type": "text", "text": "{"}]})
    assert "does not support assistant message prefill" in await refused(scripted, prefill)


# ---------------------------------------------------------------------------- model ids


async def test_an_alias_is_answered_with_its_dated_snapshot(scripted: ScriptedServer) -> None:
    reply = await post(scripted, body("claude-haiku-4-5"))
    assert reply["model"] == "claude-haiku-4-5-20251001"
    assert reply["content"][0]["type"] != "thinking"  # no thinking unless asked for a budget
    assert set(reply["usage"]["cache_creation"]) == {
        "ephemeral_5m_input_tokens",
        "ephemeral_1h_input_tokens",
    }


async def test_retired_and_unknown_models_are_not_found(scripted: ScriptedServer) -> None:
    for model in ("claude-opus-4-1", "claude-sonnet-4-5-20250929", "claude-nonsense"):
        with pytest.raises(anthropic.NotFoundError) as caught:
            await post(scripted, body(model))
        assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


async def test_the_models_api_resolves_aliases_and_reports_retired_models(
    scripted: ScriptedServer,
) -> None:
    client = anthropic.AsyncAnthropic(api_key="k", base_url=scripted.url, max_retries=0)
    try:
        info = await client.models.retrieve("claude-haiku-4-5")
        assert info.id == "claude-haiku-4-5-20251001"
        listed = [m.id async for m in client.models.list()]
        assert "claude-sonnet-5-5" in listed and "claude-opus-4-1-20250805" not in listed
    finally:
        await client.close()
    model = AnthropicModel.connect(base_url=scripted.url, api_key="k", timeout_s=5, attempts=1)
    try:
        resolved = await model.check_models({"claude-haiku-4-5": "tier free agent"})
        assert resolved == {"claude-haiku-4-5": "claude-haiku-4-5-20251001"}
        with pytest.raises(
            ModelUnavailable, match="'claude-opus-4-1' \\(tier team agent\\) is retired"
        ):
            await model.check_models({"claude-opus-4-1": "tier team agent"})
        with pytest.raises(ModelUnavailable, match="does not exist"):
            await model.check_models({"claude-nonsense": "tier pro agent"})
        # every tier of the shipped kiln.yaml names a model the API offers
        kiln = kiln_config.default()
        await model.check_models(
            {m: t for t, tier in kiln.tiers.items() for m in tier.models.values()}
        )
    finally:
        await model.close()


# ---------------------------------------------------------------------------- the agent


def agent_on(
    server: ScriptedServer, kiln: KilnConfig | None = None
) -> tuple[Agent, MemoryStore, FakePublisher, AnthropicModel]:
    model = AnthropicModel.connect(
        base_url=server.url,
        api_key="k",
        timeout_s=5,
        attempts=3,
        backoff_base_s=0.001,
        backoff_cap_s=0.002,
    )
    store, pub = MemoryStore(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln or kiln_config.default())
    return agent, store, pub, model


async def drive(agent: Agent, pub: FakePublisher, build: BuildRequested) -> None:
    """Answer every ToolCall with a plain result until the build stops asking."""
    await agent.build_requested(build)
    answered_calls: set[str] = set()
    while True:
        calls = [c for c in pub.of(ToolCall) if c.call_id not in answered_calls]
        if not calls:
            return
        for call in calls:
            answered_calls.add(call.call_id)
            output = "OK" if "unittest" not in str(call.input) else _test_output(pub)
            await agent.tool_result(
                call.caused(
                    ToolResult, call_id=call.call_id, iteration=call.iteration, output=output
                )
            )


def _test_output(pub: FakePublisher) -> str:
    runs = sum(1 for c in pub.of(ToolCall) if "unittest" in str(c.input))
    if runs == 1:
        return "FAIL: test_top_words\nFAILED (failures=1)"
    return "Ran 5 tests\n\nOK"


async def test_a_whole_build_completes_on_the_current_models_rules(
    scripted: ScriptedServer,
) -> None:
    agent, _store, pub, model = agent_on(scripted)
    try:
        build = BuildRequested(build_id="rules-1", user_id="u1", tier="pro", idea_brief="A tool.")
        await drive(agent, pub, build)
        assert scripted.refused == []
        [done] = pub.of(BuildCompleted)
        assert done.iterations >= 5
        # every assistant turn went back with its thinking block first, as received
        for rec in scripted.recorded[1:]:
            turns = [m for m in rec.request["messages"] if m["role"] == "assistant"]
            assert all(t["content"][0]["type"] in ("thinking", "redacted_thinking") for t in turns)
        # the progress it wrote in thinking reached the user
        assert any(n.source == "thinking" and n.text for n in pub.of(AgentNarrated))
        # the spend is the priced usage of the distinct iterations, and more than nothing
        kiln = kiln_config.default()
        iterations = pub.of(IterationCompleted)
        priced = sum(kiln.cost(i.model, i.usage, i.occurred_at).micro_usd for i in iterations)
        assert done.cost_micro_usd == priced == sum(i.cost_micro_usd for i in iterations) > 0
    finally:
        await model.close()


async def test_a_refused_request_fails_the_build_with_the_apis_message_at_once(
    scripted: ScriptedServer,
) -> None:
    # kiln.yaml claims a larger output limit than the model has: the API refuses the call
    kiln = kiln_config.default()
    spec = kiln.models["claude-sonnet-5-5"].model_copy(update={"max_output_tokens": 300_000})
    wrong = kiln.model_copy(update={"models": {**kiln.models, "claude-sonnet-5-5": spec}})
    agent, _store, pub, model = agent_on(scripted, wrong)
    agent.rules = Rules(agent.rules.config.model_copy(update={"max_tokens": 300_000}), wrong)
    try:
        build = BuildRequested(build_id="rules-2", user_id="u1", tier="pro", idea_brief="A tool.")
        await agent.build_requested(build)
        [failed] = pub.of(BuildFailed)
        assert failed.reason == "model_error"
        assert (
            "HTTP 400" in failed.detail
            and "maximum allowed number of output tokens" in failed.detail
        )
        assert len(scripted.refused) == 1  # no retry of a request the API will never accept
    finally:
        await model.close()


async def test_a_tier_moved_to_another_model_carries_the_conversation_over(
    scripted: ScriptedServer,
) -> None:
    kiln = kiln_config.default()
    agent, _store, pub, model = agent_on(scripted, kiln)
    try:
        build = BuildRequested(build_id="rules-3", user_id="u1", tier="pro", idea_brief="A tool.")
        await agent.build_requested(build)
        # the operator moves the tier to another model while the build runs
        moved = kiln.tiers["pro"].model_copy(
            update={"models": {"agent": "claude-haiku-5-5"}, "effort": {"agent": "low"}}
        )
        agent.rules = Rules(
            agent.rules.config, kiln.model_copy(update={"tiers": {**kiln.tiers, "pro": moved}})
        )
        calls = list(pub.of(ToolCall))
        for call in calls:
            await agent.tool_result(
                call.caused(ToolResult, call_id=call.call_id, iteration=call.iteration, output="OK")
            )
        requests = [r.request for r in scripted.recorded]
        assert [r["model"] for r in requests[:2]] == ["claude-sonnet-5-5", "claude-haiku-5-5"]
        assert requests[1]["output_config"] == {"effort": "low"}
        # the whole conversation went over, thinking included; the API dropped what it cannot read
        assert requests[1]["messages"][1]["content"][0]["type"] == "thinking"
        assert (
            scripted.recorded[1].response["input_transformations"][0]["reason"]
            == "model_binding_mismatch"
        )
        assert scripted.refused == []
        iterations = pub.of(IterationCompleted)
        assert [i.model for i in iterations[:2]] == ["claude-sonnet-5-5", "claude-haiku-5-5"]
    finally:
        await model.close()
