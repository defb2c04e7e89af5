"""Compaction's decisions as plain functions (old tool inputs cleared, where a summary ends, what is
sent once the oldest turns are summarised, the summarising request, its charge), and the loop
around them with fakes: a long build with large writes fits, each summary is charged once, and a
closed budget gate stops a summarising call as it stops any other."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from kiln_agent import compaction
from kiln_agent import config as agent_config
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.context import (
    _cleared,
    build_request,
    compaction_point,
    conversation,
    estimate_tokens,
    summary_point,
    summary_request,
)
from kiln_agent.ports import ContextWindowExceeded, ModelReply, ModelRequest
from kiln_agent.tools import definitions
from kiln_contracts import (
    BuildCompleted,
    BuildLimits,
    BuildRequested,
    BuildSleeping,
    IterationCompleted,
    SendUserMessage,
    ToolCall,
    Usage,
    WakeRequested,
    stable_id,
)
from kiln_devstack.model.long_script import LongScript
from kiln_runtime import config as kiln_config
from kiln_runtime.config import Cost
from tests.unit.test_agent_fakes import FakeModel, make_agent, result_for, text, tool_use
from tests.unit.test_agent_gates import FakeGates, closed

CFG = agent_config.load()
BIG = "x = 1\n" * 1000  # 6,000 characters


def checkpoint(**state: Any) -> Checkpoint:
    cp = Checkpoint(
        build_id="b1", user_id="u1", tier="pro", model="claude-sonnet-5-5",
        limits=BuildLimits(), system="You build apps.",
    )  # fmt: skip
    for k, v in state.items():
        setattr(cp.state, k, v)
    return cp


def build(n: int, write: str = BIG) -> list[Turn]:
    """Turn 0 (the kickoff), then n iterations: an assistant turn (thinking, a write_file of
    ``write``, a bash call) and its results."""
    turns = [Turn(0, "user", [text("Build the app.")])]
    for i in range(n):
        turns.append(
            Turn(
                len(turns),
                "assistant",
                [
                    {"type": "thinking", "thinking": f"step {i}", "signature": "c2ln"},
                    tool_use(f"w{i}", "write_file", path=f"src/m{i}.py", content=write),
                    tool_use(f"b{i}", "bash", command=f"python -m m{i}"),
                ],
            )
        )
        results = [
            {"type": "tool_result", "tool_use_id": f"w{i}", "content": f"wrote src/m{i}.py"},
            {"type": "tool_result", "tool_use_id": f"b{i}", "content": "ok"},
        ]
        turns.append(Turn(len(turns), "user", results))
    return turns


KILN = kiln_config.default()


def request(cp: Checkpoint, turns: list[Turn]) -> ModelRequest:
    spec = KILN.models[KILN.resolve(cp.model) or ""]
    return build_request(cp, turns, definitions(CFG.narrate_description), CFG, spec)


def size(req: ModelRequest) -> int:
    return sum(estimate_tokens(x) for x in (req.system, req.tools, req.messages))


# ------------------------------------------------------------------ clearing old tool inputs


def test_an_old_write_keeps_its_call_but_its_contents_become_a_marker() -> None:
    block = tool_use("toolu_1", "write_file", path="app/main.py", content=BIG)
    out = _cleared(block, CFG.clear_over_chars)
    assert out is not block and block["input"]["content"] == BIG  # the turn is not changed
    assert (out["type"], out["id"], out["name"]) == ("tool_use", "toolu_1", "write_file")
    assert isinstance(out["input"], dict) and set(out["input"]) == {"path", "content"}
    assert out["input"]["path"] == "app/main.py"
    marker = out["input"]["content"]
    assert "6000 characters cleared" in marker and 'read_file "app/main.py"' in marker
    assert len(marker) < 200


def test_an_old_edit_clears_the_long_strings_only_and_short_calls_stay_the_same_object() -> None:
    edit = tool_use("e", "edit_file", path="a.py", old_string=BIG, new_string="y = 2")
    out = _cleared(edit, CFG.clear_over_chars)
    assert out["input"]["new_string"] == "y = 2" and "cleared" in out["input"]["old_string"]
    short = tool_use("s", "write_file", path="a.py", content="tiny")
    assert _cleared(short, CFG.clear_over_chars) is short
    bash = tool_use("b", "bash", command="x" * 5000)  # not a file's contents: kept
    assert _cleared(bash, CFG.clear_over_chars) is bash
    odd = {"type": "tool_use", "id": "o", "name": "write_file", "input": "not an object"}
    assert _cleared(odd, CFG.clear_over_chars) is odd


def test_writes_before_the_watermark_are_sent_cleared_and_the_recent_ones_whole() -> None:
    turns = build(6)
    cp = checkpoint()
    point = compaction_point(cp, turns, CFG)
    assert point == len(turns) - CFG.keep_recent_turns  # only the writes are long: it clears
    cp.state.compacted_before = point
    messages = conversation(cp, turns, CFG)
    contents = [
        b["input"]["content"]
        for m in messages
        for b in m["content"]
        if b.get("name") == "write_file"
    ]
    old = (point - 1) // 2
    assert all("cleared" in c for c in contents[:old]) and contents[old:] == [BIG] * (6 - old)
    # thinking blocks are never altered
    thinking = [b for m in messages for b in m["content"] if b["type"] == "thinking"]
    assert [b["thinking"] for b in thinking] == [f"step {i}" for i in range(6)]


# ------------------------------------------------------------------ where a summary ends


def test_no_summary_while_clearing_brings_the_request_under_compact_to() -> None:
    turns = build(6)
    cp = checkpoint()
    cleared = len(turns) - CFG.keep_recent_turns
    assert summary_point(cp, turns, request(cp, turns), CFG, 100_000, cleared) is None


def test_a_summary_ends_at_an_assistant_turn_as_early_as_brings_it_under_compact_to() -> None:
    turns = build(60, write="z" * 100)  # each cleared iteration still costs ~150 tokens
    cp = checkpoint()
    cleared = len(turns) - CFG.keep_recent_turns
    window = 16_000
    upto = summary_point(cp, turns, request(cp, turns), CFG, window, cleared)
    assert upto is not None and turns[upto].role == "assistant"
    assert upto <= len(turns) - CFG.keep_recent_turns
    # what is sent afterwards fits compact_to with room for the summary at its longest
    cp.state.summarised_before, cp.state.compacted_before = upto, cleared
    cp.state.summary = "s"
    after = size(request(cp, turns)) + CFG.summary_max_tokens
    assert after <= CFG.compact_to * window
    # and one turn less summarised would not have (the fewest turns)
    cp.state.summarised_before = upto - 2
    assert size(request(cp, turns)) + CFG.summary_max_tokens > CFG.compact_to * window


def test_when_nothing_else_fits_all_but_the_recent_turns_are_summarised() -> None:
    turns = build(12)
    cp = checkpoint()
    cleared = len(turns) - CFG.keep_recent_turns
    upto = summary_point(cp, turns, request(cp, turns), CFG, 6_000, cleared)
    # the last assistant turn that leaves keep_recent_turns turns whole
    latest = len(turns) - CFG.keep_recent_turns
    assert upto == max(t.seq for t in turns if t.role == "assistant" and t.seq <= latest)
    # a second summary starts after the first one
    cp.state.summarised_before = upto
    assert summary_point(cp, turns, request(cp, turns), CFG, 6_000, cleared) is None


def test_an_overflow_the_estimate_did_not_see_is_summarised_when_nothing_is_left_to_clear() -> None:
    turns = build(12, write="short")
    cp = checkpoint(compact_now=True)
    assert compaction_point(cp, turns, CFG) is None
    req = request(cp, turns)
    assert summary_point(cp, turns, req, CFG, 200_000, 0) is None
    upto = summary_point(cp, turns, req, CFG, 200_000, 0, force=True)
    assert upto == 3  # the fewest: the first iteration only


async def test_an_overflowing_call_with_nothing_to_clear_is_answered_by_a_summary() -> None:
    model = FakeModel(
        ([tool_use("c1", "bash", command="ls")], "tool_use"),
        ([tool_use("c2", "bash", command="ls")], "tool_use"),
        ContextWindowExceeded("prompt is too long: 210000 tokens > 200000 maximum"),
        ([text("- ran ls twice")], "end_turn"),  # the summary
        ([text("done")], "end_turn"),
    )
    agent, store, pub = make_agent(model)
    agent.rules = type(agent.rules)(
        agent.rules.config.model_copy(update={"keep_recent_turns": 2}), agent.rules.kiln
    )
    await agent.build_requested(START)
    await drive(agent, pub)
    assert len(pub.of(BuildCompleted)) == 1
    assert [bool(r.tools) for r in model.requests] == [True, True, True, False, True]
    assert "- ran ls twice" in str(model.requests[-1].messages[0])
    [summary] = [m for m in pub.of(IterationCompleted) if m.purpose == "summary"]
    assert summary.event_id == stable_id("b1", "summary", 1)
    cp = await store.load("b1")
    assert cp.state.summaries == 1 and cp.state.summarised_before == 3


# ------------------------------------------------------------------ what is sent after a summary


def test_after_a_summary_the_first_turn_carries_it_and_the_roles_still_alternate() -> None:
    turns = build(10)
    cp = checkpoint(summarised_before=9, compacted_before=13, summary="- wrote src/m0.py")
    messages = conversation(cp, turns, CFG)
    assert messages[0]["content"][0] == turns[0].content[0]
    note = messages[0]["content"][-1]["text"]
    assert note.startswith("(Kiln)") and "- wrote src/m0.py" in note
    assert messages[1]["content"] is not turns[9].content and turns[9].role == "assistant"
    assert [m["role"] for m in messages] == (["user", "assistant"] * len(messages))[: len(messages)]
    assert len(messages) == 1 + len(turns) - 9
    ids = [b["id"] for m in messages for b in m["content"] if b["type"] == "tool_use"]
    results = [b["tool_use_id"] for m in messages for b in m["content"] if "tool_use_id" in b]
    assert ids == results  # every kept call still has its result, and no result is orphaned
    req = request(cp, turns)
    assert req.thinking and req.thinking.get("block_binding")  # old thinking: dropped, not refused


def test_the_summarising_request_reads_the_oldest_turns_cleared_without_tools() -> None:
    turns = build(10)
    cp = checkpoint(summary="- the summary so far")
    req = summary_request(cp, turns, CFG, None, upto=9)
    assert req.tools == [] and len(req.messages) == 1 and req.messages[0]["role"] == "user"
    prompt = req.messages[0]["content"][0]["text"]
    assert "- the summary so far" in prompt and "<transcript>" in prompt
    assert "Build the app." not in prompt  # the first turn is kept, not summarised
    assert "src/m3.py" in prompt and "src/m4.py" not in prompt  # turns 1-8: iterations 0-3
    assert BIG[:100] not in prompt and "characters cleared" in prompt
    assert "step 0" not in prompt  # thinking is not the transcript's
    assert len(prompt) < 6_000


def test_a_summary_is_charged_once_under_its_stable_id_and_moves_both_watermarks() -> None:
    cp = checkpoint(compacted_before=5)
    cp.iteration, cp.turns, cp.cost_micro_usd = 20, 41, 1_000
    reply = ModelReply(
        model="claude-sonnet-5-5-20260928", content=[{"type": "thinking", "thinking": "",
        "signature": "x"}, text("- wrote a.py")], stop_reason="end_turn",
        usage=Usage(input_tokens=900, output_tokens=50),
    )  # fmt: skip
    cp_now = datetime.now(UTC)
    priced = cp_now, Cost(micro_usd=300, priced_as="claude-sonnet-5-5", fallback=False)
    cause = stable_id("b1", "cause")
    assert compaction.summarised(cp, (20, 40), 21, 33, reply, priced, cause) is None  # moved on
    assert compaction.summarised(cp, (20, 41), 21, 33, reply, priced, cause) == []
    [charge] = cp.outbox
    assert isinstance(charge, IterationCompleted) and charge.purpose == "summary"
    assert charge.event_id == stable_id("b1", "summary", 1) and charge.iteration == 20
    assert charge.usage.input_tokens == 900 and charge.occurred_at == cp_now
    assert cp.cost_micro_usd == 1_300 and cp.state.summaries == 1
    assert (cp.state.summarised_before, cp.state.compacted_before) == (21, 33)
    assert cp.state.summary == "- wrote a.py" and cp.state.context_tokens is None
    assert cp.status == "thinking"
    # a reply with no summary is charged too, and ends the build rather than ask again
    empty = reply.model_copy(update={"content": [], "stop_reason": "refusal"})
    assert compaction.summarised(cp, (20, 41), 40, 40, empty, priced, cause) == []
    assert cp.state.summaries == 2 and cp.status == "failed" and cp.cost_micro_usd == 1_600


# ------------------------------------------------------------------ the loop


class LongModel:
    """The scripted long build (kiln_devstack's LongScript) as the Model port; ``after`` is
    called with each request once answered."""

    def __init__(self, iterations: int, write_chars: int) -> None:
        self.script = LongScript(iterations, 1, write_chars=write_chars)
        self.requests: list[ModelRequest] = []
        self.after: Any = None
        self.hold_summary: asyncio.Event | None = None  # set: the summarising call may answer

    async def complete(self, request: ModelRequest) -> ModelReply:
        self.requests.append(request)
        if not request.tools and self.hold_summary is not None:
            await self.hold_summary.wait()
        body = self.script.respond(request.model_dump())
        if self.after is not None:
            self.after(request)
        return ModelReply(
            model=body["model"], content=body["content"], stop_reason=body["stop_reason"],
            usage=Usage(**body["usage"]),
        )  # fmt: skip


async def drive(agent: Any, pub: Any) -> None:
    done = 0
    while len(calls := pub.of(ToolCall)) > done:
        for call in calls[done:]:
            await agent.tool_result(result_for(call, "ok"))
        done = len(calls)


def long_agent(model: LongModel, **kw: Any) -> tuple[Any, Any, Any]:
    agent, store, pub = make_agent(model, **kw)
    cfg = agent.rules.config.model_copy(update={"context_windows": {"default": 20_000}})
    agent.rules = type(agent.rules)(cfg, agent.rules.kiln)
    return agent, store, pub


START = BuildRequested(
    build_id="b1", user_id="u1", tier="pro", idea_brief="x", limits=BuildLimits(max_iterations=60)
)


async def test_a_long_build_with_large_writes_fits_and_each_summary_is_charged_once() -> None:
    model = LongModel(60, write_chars=4000)
    agent, store, pub = long_agent(model)
    await agent.build_requested(START)
    await drive(agent, pub)
    assert len(pub.of(BuildCompleted)) == 1
    summaries = [r for r in model.requests if not r.tools]
    charged = [m for m in pub.of(IterationCompleted) if m.purpose == "summary"]
    assert summaries and len(charged) == len(summaries)
    assert [m.event_id for m in charged] == [
        stable_id("b1", "summary", n) for n in range(1, len(charged) + 1)
    ]
    turns = [m for m in pub.of(IterationCompleted) if m.purpose == "turn"]
    assert len(turns) == 60
    cp = await store.load("b1")
    assert cp.cost_micro_usd == sum(m.cost_micro_usd for m in pub.of(IterationCompleted))
    # every turn's request fitted the window
    assert max(size(r) for r in model.requests) < 20_000


async def test_a_closed_gate_stops_the_summarising_call_until_it_opens() -> None:
    first = LongModel(60, write_chars=4000)
    agent, _, pub = long_agent(first)
    await agent.build_requested(START)
    await drive(agent, pub)
    due = next(i for i, r in enumerate(first.requests) if not r.tools)  # turns before it

    gates = FakeGates()
    model = LongModel(60, write_chars=4000)
    answered = 0

    def close_after(_: ModelRequest) -> None:
        nonlocal answered
        answered += 1
        if answered == due:
            gates.gates["u1"] = closed()  # the reply that used up the allowance

    model.after = close_after
    agent, store, pub = long_agent(model, budget_gates=gates)
    await agent.build_requested(START)
    await drive(agent, pub)
    assert len(model.requests) == due and all(r.tools for r in model.requests)
    assert len(pub.of(BuildSleeping)) == 1 and (await store.load("b1")).status == "sleeping"
    del gates.gates["u1"]
    await agent.wake(WakeRequested(build_id="b1", user_id="u1", reason="allowance reset"))
    assert not model.requests[due].tools  # the summary first, once the gate is open
    await drive(agent, pub)
    assert len(pub.of(BuildCompleted)) == 1


def test_a_config_whose_compaction_would_free_no_room_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="compact_to must be below compact_at"):
        agent_config.AgentConfig.model_validate({**CFG.model_dump(), "compact_to": 0.8})


async def test_a_message_sent_during_the_summarising_call_is_read_at_the_next_think() -> None:
    model = LongModel(60, write_chars=4000)
    model.hold_summary = asyncio.Event()
    agent, store, pub = long_agent(model)
    await agent.build_requested(START)
    driving = asyncio.create_task(drive(agent, pub))
    deadline = asyncio.get_running_loop().time() + 10
    while not any(not r.tools for r in model.requests):
        assert asyncio.get_running_loop().time() < deadline and not driving.done()
        await asyncio.sleep(0.001)
    await agent.user_message(SendUserMessage.of("b1", "u1", "m1", 1, "use SQLite, not Postgres"))
    assert (await store.load("b1")).state.inbox  # waits: the call in flight holds the lease
    model.hold_summary.set()
    await driving
    await drive(agent, pub)
    assert len(pub.of(BuildCompleted)) == 1
    i = next(i for i, r in enumerate(model.requests) if not r.tools)
    after = model.requests[i + 1].messages
    assert after[-1]["role"] == "user" and after[-1]["content"][-1]["text"] == (
        "use SQLite, not Postgres"
    )
    assert not (await store.load("b1")).state.inbox
