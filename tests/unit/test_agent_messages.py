"""A user's messages to a build, with fakes: read at the next think of a running build, kept for
the wake of a sleeping one, and continuing one that has ended (completed, failed, cancelled)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kiln_agent import control
from kiln_agent.checkpoint import Checkpoint, PendingCall
from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildLimits,
    BuildRequested,
    CancelRequested,
    CheckpointSaved,
    IterationCompleted,
    SendUserMessage,
    SleepRequested,
    ToolCall,
    WakeRequested,
    stable_id,
)
from kiln_runtime.errors import RetryLater
from tests.unit.test_agent_fakes import (
    FakeModel,
    ScriptedModel,
    Workspace,
    make_agent,
    result_for,
    text,
    tool_use,
)

ONE_CALL = ([tool_use("c1", "bash", command="ls")], "tool_use")
DONE = ([text("All done.")], "end_turn")


def request(**fields: Any) -> BuildRequested:
    return BuildRequested(build_id="b1", user_id="u1", tier="pro", idea_brief="A tool.", **fields)


class HeldModel(FakeModel):
    """A FakeModel whose calls wait for ``gate``; ``called`` is set once a call has started."""

    def __init__(self, *replies: Any) -> None:
        super().__init__(*replies)
        self.gate = asyncio.Event()
        self.called = asyncio.Event()

    async def complete(self, request: Any) -> Any:
        self.called.set()
        return await super().complete(request)


def say(seq: int, words: str) -> SendUserMessage:
    return SendUserMessage.of("b1", "u1", f"m{seq}", seq, words)


def texts(blocks: list[dict[str, Any]]) -> list[str]:
    return [b["text"] for b in blocks if b["type"] == "text"]


async def checkpoint(store: Any) -> Checkpoint:
    cp = await store.load("b1")
    assert cp is not None
    return cp


# ---------------------------------------------------------------------------- a running build


async def test_a_message_to_an_acting_build_follows_the_results_once_and_in_order() -> None:
    model = FakeModel(ONE_CALL, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    [call] = pub.of(ToolCall)
    first, second = say(1, "use tabs"), say(2, "and add a README")
    await agent.user_message(first)
    await agent.user_message(first)  # delivered twice
    await agent.user_message(second)
    assert len(model.requests) == 1  # nothing thinks before the results
    await agent.tool_result(result_for(call, "a.py"))
    last = model.requests[1].messages[-1]["content"]
    assert [b["type"] for b in last] == ["tool_result", "text", "text"]
    assert texts(last) == ["use tabs", "and add a README"]
    cp = await checkpoint(store)
    assert (cp.state.messages, cp.state.inbox) == (2, [])
    assert len(pub.of(BuildCompleted)) == 1


async def test_a_message_ahead_of_one_not_taken_yet_waits_for_it() -> None:
    agent, store, _ = make_agent(FakeModel(ONE_CALL))
    await agent.build_requested(request())
    with pytest.raises(RetryLater, match="waits for message 1"):
        await agent.user_message(say(2, "second"))
    await agent.user_message(say(1, "first"))
    await agent.user_message(say(2, "second"))
    assert [m.text for m in (await checkpoint(store)).state.inbox] == ["first", "second"]


async def test_a_message_to_a_build_not_created_yet_is_deferred_longer_each_time() -> None:
    agent, _, _ = make_agent(FakeModel(DONE))
    delays = []
    for delivered in (1, 2, 5, 20):
        with pytest.raises(RetryLater, match="does not exist") as err:
            await agent.user_message(say(1, "hello"), delivered)
        delays.append(err.value.delay_s)
    assert delays == [0.25, 0.5, 4.0, 30.0]  # minutes in all before the bus gives up


async def test_a_reply_that_ends_the_turn_while_a_message_waits_answers_it() -> None:
    model = HeldModel(DONE, ([text("Renamed it.")], "end_turn"))
    agent, store, pub = make_agent(model)
    thinking = asyncio.create_task(agent.build_requested(request()))
    await model.called.wait()
    await agent.user_message(say(1, "rename it to wc"))  # arrives during the call
    assert len(model.requests) == 1  # no second call while the first is in flight
    model.gate.set()
    await thinking
    assert len(model.requests) == 2
    assert texts(model.requests[1].messages[-1]["content"]) == ["rename it to wc"]
    assert model.requests[1].messages[-2]["role"] == "assistant"
    [done] = pub.of(BuildCompleted)
    assert done.summary == "Renamed it." and done.iterations == 2
    assert (await checkpoint(store)).state.continuations == 0  # never ended meanwhile


async def test_a_message_during_a_call_that_acts_joins_its_results() -> None:
    model = HeldModel(ONE_CALL, DONE)
    agent, _, pub = make_agent(model)
    thinking = asyncio.create_task(agent.build_requested(request()))
    await model.called.wait()
    await agent.user_message(say(1, "also count lines"))
    model.gate.set()
    await thinking
    [call] = pub.of(ToolCall)
    await agent.tool_result(result_for(call))
    last = model.requests[1].messages[-1]["content"]
    assert [b["type"] for b in last] == ["tool_result", "text"]
    assert texts(last) == ["also count lines"]


async def test_a_message_to_a_thinking_build_with_no_call_in_flight_joins_at_once() -> None:
    model = FakeModel(DONE)
    agent, store, pub = make_agent(model)
    cp, turns = control.start(agent.rules, request())
    await store.create(cp, turns)  # thinking, and nobody holds the lease
    await agent.user_message(say(1, "go"))
    [req] = model.requests
    assert [m["role"] for m in req.messages] == ["user", "user"]  # the API joins them
    assert texts(req.messages[-1]["content"]) == ["go"]
    assert len(pub.of(BuildCompleted)) == 1 and store.leases == {}


# ---------------------------------------------------------------------------- sleeping


async def test_a_message_to_a_sleeping_build_waits_for_the_wake() -> None:
    model = FakeModel(ONE_CALL, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    [call] = pub.of(ToolCall)
    await agent.sleep(SleepRequested(build_id="b1", user_id="u1", reason="budget"))
    await agent.tool_result(result_for(call))
    assert (await checkpoint(store)).status == "sleeping"
    await agent.user_message(say(1, "one more thing"))
    await agent.user_message(say(1, "one more thing"))
    assert len(model.requests) == 1  # the budget holds: no think while asleep
    await agent.wake(WakeRequested(build_id="b1", user_id="u1", reason="top-up"))
    [_, woken] = model.requests
    assert texts(woken.messages[-1]["content"]) == ["one more thing"]
    assert [b["type"] for b in woken.messages[-2]["content"]] == ["tool_result"]
    assert len(pub.of(BuildCompleted)) == 1


# ---------------------------------------------------------------------------- continuing


async def test_a_completed_build_continues_with_a_message_and_a_new_allowance() -> None:
    model = FakeModel(ONE_CALL, DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request(limits=BuildLimits(max_iterations=2)))
    await agent.tool_result(result_for(pub.of(ToolCall)[0]))
    [done] = pub.of(BuildCompleted)
    assert (done.iterations, done.continuation) == (2, 0)
    before = len(await store.turns("b1"))

    model.replies = [([tool_use("c2", "bash", command="pwd")], "tool_use")]
    message = say(1, "add a file NOTES.md with hi")
    await agent.user_message(message)
    await agent.user_message(message)  # delivered twice: one continuation
    [continued] = pub.of(BuildContinued)
    assert (continued.continuation, continued.after, continued.iterations) == (1, "completed", 2)
    assert continued.message_id == "m1" and continued.event_id == stable_id("b1", "continued", 1)
    assert continued.cost_micro_usd == done.cost_micro_usd
    turns = await store.turns("b1")
    assert len(turns) == before + 2  # the user turn that continues it, the reply
    opening = turns[before].content
    note, words = texts(opening)
    assert "ended (completed)" in note and "final snapshot" in note and "2 more" in note
    assert words == "add a file NOTES.md with hi"
    # the iterations go on from 2, and the limit counts again from there
    [call] = [c for c in pub.of(ToolCall) if c.call_id == "c2"]
    assert call.iteration == 3
    model.replies = [([tool_use("c3", "bash", command="id")], "tool_use")]
    await agent.tool_result(result_for(call))
    await agent.tool_result(result_for(pub.of(ToolCall)[-1]))
    [failed] = pub.of(BuildFailed)
    assert (failed.reason, failed.iterations, failed.continuation) == ("iteration_limit", 4, 1)
    assert [i.iteration for i in pub.of(IterationCompleted)] == [1, 2, 3, 4]
    cp = await checkpoint(store)
    assert (cp.status, cp.state.continuations, cp.state.run_iteration) == ("failed", 1, 2)


async def test_each_run_ends_with_its_own_ids_and_its_own_final_snapshot() -> None:
    model = FakeModel(DONE)
    agent, _, pub = make_agent(model)
    await agent.build_requested(request())
    await agent.user_message(say(1, "again"))
    await agent.user_message(say(2, "and again"))
    ends = pub.of(BuildCompleted)
    assert [e.continuation for e in ends] == [0, 1, 2]
    assert [e.event_id for e in ends] == [
        stable_id("b1", "completed"),
        stable_id("b1", "completed", 1),
        stable_id("b1", "completed", 2),
    ]
    finals = [c for c in pub.of(CheckpointSaved) if c.reason == "final"]
    assert [e.final_checkpoint_id for e in ends] == [c.event_id for c in finals]
    assert len(set(c.event_id for c in finals)) == 3  # a snapshot each
    assert len(model.requests) == 3


async def test_the_cost_cap_is_a_new_allowance_per_continuation() -> None:
    model = FakeModel(DONE)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request(limits=BuildLimits(max_cost_micro_usd=15_000)))
    cost = pub.of(BuildCompleted)[0].cost_micro_usd
    assert 0 < cost <= 15_000
    await agent.user_message(say(1, "more"))
    [second] = [e for e in pub.of(BuildCompleted) if e.continuation == 1]
    assert second.cost_micro_usd == 2 * cost  # the totals keep counting
    assert pub.of(BuildFailed) == []
    assert (await checkpoint(store)).state.run_cost_micro_usd == cost


async def test_a_build_failed_mid_iteration_continues_with_every_call_answered() -> None:
    model = FakeModel(
        ([tool_use("x0", "bash", command="ls")], "tool_use"),
        ([tool_use("x1", "bash", command="ls")], "tool_use"),
        ([tool_use("x2", "bash", command="ls"), tool_use("y2", "read_file", path="a")], "tool_use"),
    )
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    for i in range(2):
        await agent.tool_result(result_for(pub.of(ToolCall)[i]))
    [failed] = pub.of(BuildFailed)
    assert failed.reason == "repetition"  # the third `ls`: its turn's calls never ran
    model.replies = [DONE]
    await agent.user_message(say(1, "try something else"))
    opening = (await store.turns("b1"))[-2].content
    results = [b for b in opening if b["type"] == "tool_result"]
    assert [b["tool_use_id"] for b in results] == ["x2", "y2"]
    assert all(b["is_error"] and "ended (failed)" in b["content"] for b in results)
    assert texts(opening)[-1] == "try something else"
    assert [e.after for e in pub.of(BuildContinued)] == ["failed"]
    assert len(pub.of(BuildCompleted)) == 1


async def test_a_cancelled_build_continues_keeping_the_results_that_came() -> None:
    two = (
        [tool_use("c1", "bash", command="ls"), tool_use("c2", "bash", command="pwd")],
        "tool_use",
    )
    model = FakeModel(two)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    c1, c2 = pub.of(ToolCall)
    await agent.tool_result(result_for(c1, "a.py"))
    await agent.cancel(CancelRequested(build_id="b1", user_id="u1"))
    await agent.tool_result(result_for(c2, "late"))  # ignored: the build had ended
    model.replies = [DONE]
    await agent.user_message(say(1, "carry on"))
    opening = (await store.turns("b1"))[-2].content
    results = [b for b in opening if b["type"] == "tool_result"]
    assert [(b["tool_use_id"], b["is_error"]) for b in results] == [("c1", False), ("c2", True)]
    assert results[0]["content"] == "a.py" and "ended (cancelled)" in results[1]["content"]
    assert "latest snapshot" in texts(opening)[0]
    [cancelled] = pub.of(BuildCancelled)
    assert cancelled.continuation == 0
    assert len(pub.of(BuildCompleted)) == 1


async def test_messages_waiting_when_a_build_ends_are_placed_when_it_continues() -> None:
    model = FakeModel(ONE_CALL)
    agent, store, pub = make_agent(model)
    await agent.build_requested(request())
    await agent.user_message(say(1, "first"))
    await agent.cancel(CancelRequested(build_id="b1", user_id="u1"))
    assert [m.text for m in (await checkpoint(store)).state.inbox] == ["first"]
    model.replies = [DONE]
    await agent.user_message(say(2, "second"))
    opening = (await store.turns("b1"))[-2].content
    assert texts(opening)[1:] == ["first", "second"]
    assert len(pub.of(BuildContinued)) == 1 and len(pub.of(BuildCompleted)) == 1


async def test_the_scripted_model_answers_a_message_and_resumes_its_work(tmp_path: Path) -> None:
    """Steering: a message sent while the script works is answered (the file it names is
    written), then the script goes on and completes its package; a message to the completed build
    continues it and is answered too."""
    agent, store, pub = make_agent(ScriptedModel())
    ws = Workspace(tmp_path)

    async def run_calls() -> None:
        answered: set[str] = set()
        for _ in range(30):
            calls = [c for c in pub.of(ToolCall) if c.call_id not in answered]
            if not calls:
                return
            for call in calls:
                answered.add(call.call_id)
                await agent.tool_result(ws.run(call))

    await agent.build_requested(request())
    await agent.user_message(say(1, "add a file NOTES.md with steered"))
    await run_calls()
    [done] = pub.of(BuildCompleted)
    assert "all tests pass" in done.summary
    assert (tmp_path / "NOTES.md").read_text() == "steered\n"
    assert (tmp_path / "textstats" / "__init__.py").is_file()

    await agent.user_message(say(2, "please write TODO.md"))
    await run_calls()
    [_, again] = pub.of(BuildCompleted)
    assert again.continuation == 1 and "TODO.md" in again.summary
    assert (tmp_path / "TODO.md").is_file()
    assert again.iterations > done.iterations
    assert (await checkpoint(store)).status == "completed"


# ---------------------------------------------------------------------------- the transitions alone


def fresh(rules: Any) -> Checkpoint:
    cp, _ = control.start(rules, request())
    return cp


def test_message_takes_the_next_seq_only_and_waits_in_the_inbox() -> None:
    agent, _, _ = make_agent(FakeModel(DONE))
    cp = fresh(agent.rules)
    cp.status = "acting"
    assert control.message(agent.rules, cp, say(2, "early")) is None  # not the next one
    assert control.message(agent.rules, cp, say(1, "first")) == []
    assert control.message(agent.rules, cp, say(1, "first")) is None  # a duplicate
    assert [(m.seq, m.text) for m in cp.state.inbox] == [(1, "first")]
    assert cp.state.messages == 1 and cp.outbox == [] and cp.turns == 1


def test_place_and_the_wake_turn_the_inbox_into_a_user_turn() -> None:
    agent, _, _ = make_agent(FakeModel(DONE))
    cp = fresh(agent.rules)
    control.message(agent.rules, cp, say(1, "a"))
    control.message(agent.rules, cp, say(2, "b"))
    [turn] = control.place(cp) or []
    assert (turn.seq, turn.role, texts(turn.content)) == (1, "user", ["a", "b"])
    assert control.place(cp) is None  # nothing waits now
    cp.status = "sleeping"
    control.message(agent.rules, cp, say(3, "c"))
    assert control.place(cp) is None  # asleep: it waits for the wake
    [woken] = control.wake(cp, WakeRequested(build_id="b1", user_id="u1", reason="r")) or []
    assert texts(woken.content) == ["c"] and cp.status == "thinking"


def test_continue_build_answers_open_calls_and_starts_a_new_run() -> None:
    agent, _, _ = make_agent(FakeModel(DONE))
    cp = fresh(agent.rules)
    cp.iteration, cp.cost_micro_usd, cp.status = 7, 900, "failed"
    cp.state.pending = [PendingCall(call_id="c1", tool="bash", input={"command": "ls"})]
    [turn] = control.message(agent.rules, cp, say(1, "again")) or []
    [result, note, words] = turn.content
    assert (result["tool_use_id"], result["is_error"]) == ("c1", True)
    assert "ended (failed)" in note["text"] and words["text"] == "again"
    assert (cp.status, cp.state.continuations, cp.state.pending) == ("thinking", 1, [])
    assert (cp.state.run_iteration, cp.state.run_cost_micro_usd) == (7, 900)
    assert agent.rules.run_iterations(cp) == 0 and agent.rules.run_cost(cp) == 0
    [continued] = cp.outbox
    assert isinstance(continued, BuildContinued) and continued.after == "failed"


def test_a_message_to_a_rejected_build_is_taken_and_starts_nothing() -> None:
    agent, _, _ = make_agent(FakeModel(DONE))
    cp = fresh(agent.rules)
    cp.status, cp.turns = "rejected", 0  # refused behind a closed budget gate: it never ran
    assert control.message(agent.rules, cp, say(1, "please start")) == []
    assert cp.status == "rejected" and cp.state.messages == 1
    assert cp.state.inbox == [] and cp.outbox == [] and cp.turns == 0
