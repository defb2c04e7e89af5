"""The agent's state machine with fakes: no broker, no database, no model server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kiln_agent import tools
from kiln_agent.loop import CONTINUE
from kiln_agent.ports import ModelError, VersionConflict
from kiln_contracts import (
    AgentNarrated,
    BuildCancelled,
    BuildCompleted,
    BuildFailed,
    BuildLimits,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    CancelRequested,
    CheckpointSaved,
    IterationCompleted,
    QnA,
    SleepRequested,
    ToolCall,
    WakeRequested,
    stable_id,
)
from kiln_runtime.errors import Conflict
from tests.unit.test_agent_fakes import (
    FakeModel,
    ScriptedModel,
    Workspace,
    make_agent,
    result_for,
    text,
    tool_use,
)


def request(build_id: str = "b1", **fields) -> BuildRequested:
    fields.setdefault("idea_brief", "A tool that counts words.")
    return BuildRequested(build_id=build_id, user_id="u1", tier="pro", **fields)


TWO_CALLS = (
    [
        text("writing"),
        tool_use("c1", "write_file", path="a.py", content="x"),
        tool_use("c2", "bash", command="ls"),
    ],
    "tool_use",
)
DONE = ([text("All done.")], "end_turn")


async def test_happy_path_with_the_scripted_model_and_real_tools(tmp_path: Path) -> None:
    agent, store, pub = make_agent(ScriptedModel())
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    await agent.build_requested(request(understanding_qna=[QnA(question="Who?", answer="Me")]))
    answered: set[str] = set()
    try:
        for _ in range(30):
            calls = [c for c in pub.of(ToolCall) if c.call_id not in answered]
            if not calls:
                break
            for call in calls:
                answered.add(call.call_id)
                await agent.tool_result(ws.run(call))
    finally:
        ws.close()
    done = pub.of(BuildCompleted)
    assert len(done) == 1, [type(m).__name__ for m in pub.sent]
    assert "all tests pass" in done[0].summary
    final = [c for c in pub.of(CheckpointSaved) if c.reason == "final"]
    assert (
        done[0].final_checkpoint_id == final[0].event_id == stable_id("b1", "checkpoint", "final")
    )
    iterations = pub.of(IterationCompleted)
    assert [i.iteration for i in iterations] == list(range(1, done[0].iterations + 1))
    assert done[0].cost_micro_usd == sum(i.cost_micro_usd for i in iterations) > 0
    # the tools and the system prompt pass the API's 1024-token minimum for a cache entry: the
    # first request writes one, and from the second on the prefix is read from the cache
    assert iterations[0].usage.cache_creation_input_tokens > 0
    assert iterations[0].usage.cache_read_input_tokens == 0
    assert all(i.usage.cache_read_input_tokens > 0 for i in iterations[1:])
    narrated = pub.of(AgentNarrated)
    assert len([n for n in narrated if n.source == "narrate"]) == 2
    # the notes the script writes before its tool calls are shown too
    assert next(n.text for n in narrated if n.source == "thinking").startswith("I'll build")
    assert any(c.reason == "files_changed" for c in pub.of(CheckpointSaved))
    # a turn with three parallel calls, and the package really works at the end
    assert max(len([c for c in pub.of(ToolCall) if c.iteration == n]) for n in range(1, 9)) == 3
    assert "-item[1]" in (ws.root / "textstats/__init__.py").read_text()
    # the page: written, served in the background, fetched
    assert "serving textstats on" in (tmp_path / "ws.bash_1.out").read_text()
    assert any("the page answers" in n.text for n in narrated if n.source == "narrate")
    cp = await store.load("b1")
    assert cp is not None and cp.status == "completed"
    assert [t.seq for t in await store.turns("b1")] == list(range(cp.turns))
    system = cp.system
    assert "A tool that counts words." in system and "Q: Who?\nA: Me" in system


async def test_request_carries_cache_breakpoints_and_the_tools() -> None:
    model = FakeModel(DONE)
    agent, _, _ = make_agent(model)
    await agent.build_requested(request())
    req = model.requests[0]
    assert req.model == "claude-sonnet-5-5"  # the pro tier's agent model
    # adaptive thinking with its text shown, the tier's effort; nothing the model refuses
    assert req.thinking == {"type": "adaptive", "display": "summarized"}
    assert req.output_config == {"effort": "high"}
    assert req.system[0]["cache_control"] == {"type": "ephemeral"}
    assert req.tools[-1]["cache_control"] == {"type": "ephemeral"}
    assert req.messages[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    names = {t["name"] for t in req.tools}
    assert names == {
        "read_file",
        "write_file",
        "edit_file",
        "bash",
        "bash_output",
        "kill_shell",
        "glob",
        "grep",
        "list_dir",
        "narrate",
    }


async def test_duplicate_build_requested_is_a_no_op() -> None:
    model = FakeModel(TWO_CALLS)
    agent, store, pub = make_agent(model)
    msg = request()
    await agent.build_requested(msg)
    await agent.build_requested(msg)
    await agent.build_requested(request(idea_brief="something else"))
    assert len(model.requests) == 1
    assert len(pub.of(ToolCall)) == 2
    cp = await store.load("b1")
    assert cp is not None and cp.iteration == 1


async def test_results_out_of_order_and_duplicates_make_one_turn() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, _store, pub = make_agent(model)
    await agent.build_requested(request())
    c1, c2 = pub.of(ToolCall)
    assert (c1.call_id, c2.call_id) == ("c1", "c2")
    assert c1.event_id == stable_id("b1", "tool_call", "c1")
    assert c1.timeout_s == BuildLimits().tool_timeout_s
    r2 = result_for(c2, "listing")
    await agent.tool_result(r2)
    await agent.tool_result(r2)  # duplicate
    assert len(model.requests) == 1
    await agent.tool_result(result_for(c1, "wrote", files_changed=["a.py"]))
    await agent.tool_result(result_for(c1, "wrote again"))  # stale: the iteration moved on
    assert len(model.requests) == 2
    last = model.requests[1].messages[-1]["content"]
    assert [b["tool_use_id"] for b in last] == ["c1", "c2"]  # the order of the tool_use blocks
    assert [b["content"] for b in last] == ["wrote", "listing"]
    assert len(pub.of(BuildCompleted)) == 1
    assert [c.reason for c in pub.of(CheckpointSaved)] == ["files_changed", "final"]


async def test_result_of_an_unknown_call_is_ignored() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    c1 = pub.of(ToolCall)[0]
    before = (await store.load("b1")).version  # type: ignore[union-attr]
    await agent.tool_result(c1.caused(type(result_for(c1)), call_id="nope", iteration=1, output=""))
    await agent.tool_result(result_for(c1).model_copy(update={"iteration": 7}))
    assert (await store.load("b1")).version == before  # type: ignore[union-attr]


async def test_narrate_is_answered_without_the_sandbox() -> None:
    model = FakeModel(([tool_use("n1", "narrate", text="Starting!")], "tool_use"), DONE)
    agent, _, pub = make_agent(model)
    await agent.build_requested(request())
    narrated = pub.of(AgentNarrated)
    assert [(n.text, n.iteration) for n in narrated] == [("Starting!", 1)]
    assert narrated[0].event_id == stable_id("b1", "narrated", "n1")
    assert pub.of(ToolCall) == []
    assert model.requests[1].messages[-1]["content"][0]["content"] == "ok"
    assert len(pub.of(BuildCompleted)) == 1


async def test_input_failing_the_schema_is_an_error_result_without_the_sandbox() -> None:
    mixed = (
        [
            tool_use("c1", "read_file", path="a.py"),
            tool_use("c2", "write_file", path="b.py"),  # no content
            tool_use("c3", "narrate", text=7),
        ],
        "tool_use",
    )
    model = FakeModel(mixed, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    [call] = pub.of(ToolCall)  # only the valid call goes out
    assert (call.call_id, call.tool) == ("c1", "read_file")
    assert pub.of(AgentNarrated) == []
    assert len(model.requests) == 1  # the set waits for the valid call's result
    await agent.tool_result(result_for(call, "1\tx = 1"))
    assert len(model.requests) == 2
    results = model.requests[1].messages[-1]["content"]
    assert [b["tool_use_id"] for b in results] == ["c1", "c2", "c3"]
    assert [b["is_error"] for b in results] == [False, True, True]
    assert 'missing required field "content"' in results[1]["content"]
    assert results[1]["content"].startswith("invalid input for write_file")
    assert 'field "text" must be of type string, not integer' in results[2]["content"]
    assert len(pub.of(BuildCompleted)) == 1
    cp = await store.load("b1")
    assert cp is not None and cp.iteration == 2


async def test_a_turn_of_only_invalid_calls_completes_its_set_at_once() -> None:
    bad = ([tool_use("c1", "bash", command="ls", timeout_s=0, shell="zsh")], "tool_use")
    model = FakeModel(bad, DONE)
    agent, _, pub = make_agent(model)
    await agent.build_requested(request())
    assert pub.of(ToolCall) == []
    assert len(model.requests) == 2  # thought again without waiting for anything
    [result] = model.requests[1].messages[-1]["content"]
    assert result["is_error"] is True
    assert 'unknown field "shell"' in result["content"]
    assert 'field "timeout_s"' in result["content"]
    assert len(pub.of(BuildCompleted)) == 1


@pytest.mark.parametrize(
    ("tool", "tool_input", "expected"),
    [
        ("read_file", {"path": "a"}, None),
        ("read_file", {"path": "a", "offset": 3, "limit": 10}, None),
        ("list_dir", {}, None),
        (
            "edit_file",
            {"path": "a", "old_string": "x", "new_string": "y", "replace_all": 1},
            'field "replace_all" must be of type boolean, not integer',
        ),
        ("read_file", {}, 'missing required field "path"'),
        ("read_file", {"path": "a", "offset": 0}, 'field "offset": 0 is less than the minimum'),
        ("read_file", {"path": None}, 'field "path" must be of type string, not null'),
        (
            "glob",
            {"pattern": "*", "a": 1, "b": 2},
            'unknown fields "a", "b" (allowed: path, pattern)',
        ),
        ("narrate", {"text": "x" * 20_001}, "at most 20000 characters long, not 20001"),
        ("no_such_tool", {"anything": 1}, None),  # not ours to check (an unknown tool)
    ],
)
def test_input_error_names_the_field(tool: str, tool_input: dict, expected: str | None) -> None:
    problem = tools.input_error(tool, tool_input)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem, problem
        assert len(problem) < 1000


async def test_cancel_ignores_later_results() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    c1, c2 = pub.of(ToolCall)
    cancel = CancelRequested(build_id="b1", user_id="u1")
    await agent.cancel(cancel)
    await agent.cancel(cancel)
    await agent.tool_result(result_for(c1))
    await agent.tool_result(result_for(c2))
    [cancelled] = pub.of(BuildCancelled)
    assert (cancelled.iterations, cancelled.cost_micro_usd > 0) == (1, True)
    assert len(model.requests) == 1
    assert (await store.load("b1")).status == "cancelled"  # type: ignore[union-attr]


async def test_iteration_limit() -> None:
    model = FakeModel(
        *[([tool_use(f"n{i}", "narrate", text=f"step {i}")], "tool_use") for i in range(10)]
    )
    agent, _, pub = make_agent(model)
    await agent.build_requested(request(limits=BuildLimits(max_iterations=3)))
    [failed] = pub.of(BuildFailed)
    assert (failed.reason, failed.iterations) == ("iteration_limit", 3)
    assert len(model.requests) == 3


async def test_cost_limit() -> None:
    model = FakeModel(TWO_CALLS)
    agent, _, pub = make_agent(model)
    await agent.build_requested(request(limits=BuildLimits(max_cost_micro_usd=100)))
    [failed] = pub.of(BuildFailed)
    assert failed.reason == "cost_limit" and failed.cost_micro_usd > 100
    assert pub.of(ToolCall) == []
    assert len(pub.of(IterationCompleted)) == 1


async def test_repetition_of_the_same_call_fails_the_build() -> None:
    same = ([tool_use("x", "bash", command="ls")], "tool_use")
    model = FakeModel(same)
    agent, _store, pub = make_agent(model)
    await agent.build_requested(request())
    for i in range(2):
        calls = pub.of(ToolCall)
        assert len(calls) == i + 1
        model.replies = [([tool_use(f"x{i}", "bash", command="ls")], "tool_use")]
        await agent.tool_result(result_for(calls[-1]))
    [failed] = pub.of(BuildFailed)
    assert failed.reason == "repetition" and failed.iterations == 3


async def test_polling_a_background_process_is_not_repetition() -> None:
    poll = ([tool_use("p0", "bash_output", bash_id="bash_1")], "tool_use")
    model = FakeModel(poll)
    agent, _store, pub = make_agent(model)
    await agent.build_requested(request())
    for i in range(1, 5):
        calls = pub.of(ToolCall)
        assert len(calls) == i
        model.replies = [([tool_use(f"p{i}", "bash_output", bash_id="bash_1")], "tool_use")]
        await agent.tool_result(result_for(calls[-1]))
    assert pub.of(BuildFailed) == []
    assert len(pub.of(ToolCall)) == 5


async def test_model_error_and_refusal() -> None:
    agent, _, pub = make_agent(FakeModel(ModelError("HTTP 529: overloaded")))
    await agent.build_requested(request())
    [failed] = pub.of(BuildFailed)
    assert failed.reason == "model_error" and "529" in failed.detail
    agent, _, pub = make_agent(FakeModel(([text("no")], "refusal")))
    await agent.build_requested(request())
    assert pub.of(BuildFailed)[0].reason == "model_refusal"


async def test_max_tokens_continues() -> None:
    model = FakeModel(([text("part one")], "max_tokens"), DONE)
    agent, _, pub = make_agent(model)
    await agent.build_requested(request())
    assert model.requests[1].messages[-1]["content"][0]["text"] == CONTINUE
    assert len(pub.of(BuildCompleted)) == 1


async def test_sleep_waits_for_calls_in_flight_then_wake_resumes() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, _store, pub = make_agent(model)
    await agent.build_requested(request())
    c1, c2 = pub.of(ToolCall)
    sleep = SleepRequested(build_id="b1", user_id="u1", reason="budget")
    await agent.sleep(sleep)
    assert pub.of(BuildSleeping) == []
    await agent.tool_result(result_for(c1))
    await agent.tool_result(result_for(c2))
    await agent.sleep(sleep)  # duplicate
    [sleeping] = pub.of(BuildSleeping)
    assert sleeping.reason == "budget"
    assert [c.reason for c in pub.of(CheckpointSaved)] == ["sleep"]
    assert len(model.requests) == 1  # no think while asleep
    wake = WakeRequested(build_id="b1", user_id="u1", reason="top-up")
    await agent.wake(wake)
    await agent.wake(wake)
    assert len(pub.of(BuildResumed)) == 1
    assert len(model.requests) == 2 and len(pub.of(BuildCompleted)) == 1


async def test_a_sleep_during_a_model_call_keeps_the_paid_reply_and_sleeps_before_the_next():
    model = FakeModel(TWO_CALLS, DONE)
    agent, store, pub = make_agent(model)
    model.gate = asyncio.Event()
    thinking = asyncio.create_task(agent.build_requested(request()))
    await asyncio.sleep(0.01)
    await agent.sleep(SleepRequested(build_id="b1", user_id="u1", reason="budget"))
    model.gate.set()
    await thinking  # the reply is kept: it is paid for, and the budget charges it
    assert len(pub.of(IterationCompleted)) == 1 and len(pub.of(ToolCall)) == 2
    assert pub.of(BuildSleeping) == []
    for call in pub.of(ToolCall):
        await agent.tool_result(result_for(call))
    assert len(pub.of(BuildSleeping)) == 1 and len(model.requests) == 1
    assert (await store.load("b1")).iteration == 1  # type: ignore[union-attr]


async def test_a_sleep_between_model_calls_takes_effect_at_the_next_think() -> None:
    model = FakeModel(([text("part one")], "max_tokens"), DONE)
    agent, _, pub = make_agent(model)
    model.gate = asyncio.Event()
    thinking = asyncio.create_task(agent.build_requested(request()))
    await asyncio.sleep(0.01)
    await agent.sleep(SleepRequested(build_id="b1", user_id="u1", reason="budget"))
    model.gate.set()
    await thinking  # max_tokens: the build would think again, and sleeps instead
    [sleeping] = pub.of(BuildSleeping)
    assert sleeping.reason == "budget" and len(model.requests) == 1


async def test_outbox_is_republished_after_a_crash_between_commit_and_publish() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, store, pub = make_agent(model)
    pub.fail_next = 1  # the process "dies" right after the commit
    msg = request()
    with pytest.raises(ConnectionError):
        await agent.build_requested(msg)
    assert pub.of(ToolCall) == []
    cp = await store.load("b1")
    # IterationCompleted, the note before the calls, 2 ToolCalls
    assert cp is not None and len(cp.outbox) == 4
    await agent.build_requested(msg)  # the redelivery
    assert [c.call_id for c in pub.of(ToolCall)] == ["c1", "c2"]
    assert len(pub.of(IterationCompleted)) == 1 and len(model.requests) == 1
    await agent.store.clearing.settle()
    assert (await store.load("b1")).outbox == []  # type: ignore[union-attr]


async def test_lost_race_is_reapplied_on_fresh_state() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    c1, c2 = pub.of(ToolCall)
    real_save = store.save
    raced = False

    async def save_losing_once(cp, turns, **kw):  # another replica records c2 just before us
        nonlocal raced
        if not raced:
            raced = True
            other = await store.load("b1")
            assert other is not None
            await real_save(other, [])
        return await real_save(cp, turns, **kw)

    store.save = save_losing_once  # type: ignore[method-assign]
    await agent.tool_result(result_for(c1))
    store.save = real_save  # type: ignore[method-assign]
    await agent.tool_result(result_for(c2))
    assert len(pub.of(BuildCompleted)) == 1
    assert [b["tool_use_id"] for b in model.requests[1].messages[-1]["content"]] == ["c1", "c2"]


async def test_persistent_conflict_raises_conflict() -> None:
    agent, store, pub = make_agent(FakeModel(TWO_CALLS), save_attempts=3)
    await agent.build_requested(request())
    c1 = pub.of(ToolCall)[0]

    async def always_conflict(cp, turns, **kw):
        raise VersionConflict(cp.build_id)

    store.save = always_conflict  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        await agent.tool_result(result_for(c1))


async def test_unknown_tier_fails_the_build() -> None:
    agent, _, pub = make_agent(FakeModel(DONE))
    await agent.build_requested(request().model_copy(update={"tier": "platinum"}))
    assert pub.of(BuildFailed)[0].reason == "internal"


async def test_a_reply_is_saved_through_a_store_outage_and_the_model_is_not_asked_again() -> None:
    model = FakeModel(TWO_CALLS, DONE)
    agent, store, pub = make_agent(model)
    save = store.save
    failures = [ConnectionResetError("connection was closed in the middle of operation")] * 2

    async def flaky(cp, new_turns, lease=None):  # type: ignore[no-untyped-def]
        if new_turns and failures:  # the save of the reply: the database is down twice
            raise failures.pop()
        return await (save(cp, new_turns) if lease is None else save(cp, new_turns, lease))

    store.save = flaky  # type: ignore[method-assign]
    await agent.build_requested(request())
    assert not failures and len(model.requests) == 1  # one paid call, kept
    assert {c.call_id for c in pub.of(ToolCall)} == {"c1", "c2"}
    assert len(pub.of(IterationCompleted)) == 1
