"""The scripted model asked to summarise (it answers the request it is given, as a model would), the
long script's turn count once the oldest turns are summarised, and the context window's refusal."""

from __future__ import annotations

import pytest

from kiln_agent import config as agent_config
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.context import summary_request
from kiln_contracts import BuildLimits
from kiln_devstack.model import catalogue, rules
from kiln_devstack.model.long_script import LongScript
from kiln_devstack.model.script import ScriptedModel
from kiln_devstack.model.summaries import summarise

CFG = agent_config.load()


def transcript_request() -> dict:
    cp = Checkpoint(
        build_id="b", user_id="u", tier="pro", model="claude-sonnet-5-5", limits=BuildLimits(),
        system="s",
    )  # fmt: skip
    cp.state.summary = "- src/old.py: written (in the sandbox)"
    turns = [
        Turn(0, "user", [{"type": "text", "text": "Build it."}]),
        Turn(1, "assistant", [
            {"type": "tool_use", "id": "t1", "name": "write_file",
             "input": {"path": "app.py", "content": "print(1)\n" * 500}},
            {"type": "tool_use", "id": "t2", "name": "bash", "input": {"command": "pytest -q"}},
        ]),
        Turn(2, "user", [
            {"type": "tool_result", "tool_use_id": "t1", "content": "wrote app.py"},
            {"type": "tool_result", "tool_use_id": "t2", "content": "3 passed"},
            {"type": "text", "text": "use SQLite, not Postgres"},
        ]),
        Turn(3, "assistant", [{"type": "text", "text": "ok"}]),
    ]  # fmt: skip
    return summary_request(cp, turns, CFG, None, upto=3).model_dump()


def test_a_summarising_request_is_answered_with_a_summary_of_its_transcript() -> None:
    reply = ScriptedModel().respond(transcript_request())
    assert reply["stop_reason"] == "end_turn"
    [block] = reply["content"]
    summary = block["text"]
    assert "- src/old.py: written (in the sandbox)" in summary  # the summary so far, kept
    assert "- app.py: written (in the sandbox)" in summary
    assert "The user said: use SQLite, not Postgres" in summary
    assert "pytest -q" in summary and "3 passed" in summary
    assert "print(1)" not in summary
    assert reply["usage"]["input_tokens"] > 0


def test_a_summary_longer_than_max_tokens_is_cut_there() -> None:
    body = transcript_request()
    body["max_tokens"] = 10
    reply = ScriptedModel().respond(body)
    assert reply["stop_reason"] == "max_tokens" and len(reply["content"][0]["text"]) == 40


def test_an_ordinary_turn_is_not_a_summarising_request() -> None:
    body = {"tools": [{"name": "bash"}], "messages": [{"role": "user", "content": "<transcript>"}]}
    assert summarise(body) is None
    assert summarise({"messages": [{"role": "user", "content": "hello"}]}) is None


def test_the_long_script_counts_its_turns_from_its_last_calls_not_from_the_turns_sent() -> None:
    script = LongScript(iterations=10, write_chars=500)
    messages: list[dict] = [{"role": "user", "content": [{"type": "text", "text": "go"}]}]
    for _ in range(4):
        reply = script.respond({"messages": messages, "tools": [{"name": "bash"}]})
        messages += [
            {"role": "assistant", "content": reply["content"]},
            {"role": "user", "content": [{"type": "text", "text": "ok"}]},
        ]
    writes = [b for b in reply["content"] if b.get("name") == "write_file"]
    assert writes[0]["input"]["path"] == "src/module_4.py"
    assert len(writes[0]["input"]["content"]) == 500
    # the oldest turns summarised away: the next turn is still the fifth
    kept = [messages[0], *messages[-2:]]
    nxt = script.respond({"messages": kept, "tools": [{"name": "bash"}]})
    assert [b["input"]["path"] for b in nxt["content"] if b.get("name") == "write_file"] == [
        "src/module_5.py"
    ]


def test_a_prompt_longer_than_the_window_is_refused_as_the_api_refuses_it() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 40_000}]}]}
    assert 10_000 <= rules.prompt_tokens(body) <= 10_100
    rules.check_length(rules.prompt_tokens(body), 20_000)
    with pytest.raises(catalogue.ApiError, match=r"prompt is too long: \d+ tokens > 5000 maximum"):
        rules.check_length(rules.prompt_tokens(body), 5_000)
