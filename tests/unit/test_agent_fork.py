"""A fork (BuildRequested with ``fork``), with fakes: the source's conversation up to the fork's
iteration, thinking blocks as stored, a note, iterations numbered on from there, the source
untouched; a repeat is one fork; another user's build, or an iteration it has not reached, is
never forked."""

from __future__ import annotations

from typing import Any

import pytest

from kiln_agent import forks
from kiln_agent.checkpoint import Turn
from kiln_contracts import (
    BuildCompleted,
    BuildRequested,
    ForkOrigin,
    IterationCompleted,
    ToolCall,
)
from kiln_runtime.errors import PermanentError, RetryLater
from tests.unit.test_agent_fakes import FakeModel, make_agent, result_for, text, tool_use

THINKING = {"type": "thinking", "thinking": "I should list first.", "signature": "sig-1=="}


def source_request() -> BuildRequested:
    return BuildRequested(build_id="src", user_id="u1", tier="pro", idea_brief="A tool.")


def fork_request(iteration: int, user: str = "u1", snapshot: str | None = "s-2") -> BuildRequested:
    return BuildRequested(
        build_id="fk",
        user_id=user,
        tier="pro",
        idea_brief="A tool.",
        fork=ForkOrigin(build_id="src", iteration=iteration, snapshot_id=snapshot),
    )


def reply(call_id: str, command: str) -> tuple[list[dict[str, Any]], str]:
    return ([THINKING, tool_use(call_id, "bash", command=command)], "tool_use")


async def three_iterations() -> tuple[Any, Any, Any, FakeModel]:
    """The source: three iterations of one call each, then done."""
    model = FakeModel(
        reply("c1", "ls"), reply("c2", "pwd"), reply("c3", "id"), ([text("Done.")], "end_turn")
    )
    agent, store, pub = make_agent(model)
    await agent.build_requested(source_request())
    for _ in range(3):
        call = pub.of(ToolCall)[-1]
        await agent.tool_result(result_for(call, f"out of {call.call_id}"))
    return agent, store, pub, model


async def test_a_fork_has_the_conversation_up_to_its_iteration_and_goes_on_from_there() -> None:
    agent, store, pub, model = await three_iterations()
    source_before = await store.load("src")
    source_turns = await store.turns("src")
    model.replies = [([tool_use("n1", "bash", command="echo fork")], "tool_use")]
    await agent.build_requested(fork_request(2))
    await agent.build_requested(fork_request(2))  # delivered twice: one fork

    fork = await store.load("fk")
    assert fork is not None and fork.state.fork is not None
    assert (fork.iteration, fork.state.run_iteration, fork.system) == (3, 2, source_before.system)
    turns = await store.turns("fk")
    # kickoff, reply 1, results 1, reply 2, results 2: byte for byte the source's (thinking
    # blocks with their signatures), then the fork's note, then its own reply
    assert [t.content for t in turns[:5]] == [t.content for t in source_turns[:5]]
    assert turns[1].content[0] == THINKING
    note = turns[5]
    assert note.role == "user" and "fork of build src at its iteration 2" in note.content[0]["text"]
    assert "snapshot s-2" in note.content[0]["text"]
    # the model was asked once, with exactly that conversation
    [asked] = model.requests[-1:]
    assert len(asked.messages) == 6
    # iterations numbered on from the fork's; its calls restore from the source's snapshot
    fork_calls = [c for c in pub.of(ToolCall) if c.build_id == "fk"]
    assert [(c.iteration, c.call_id) for c in fork_calls] == [(3, "n1")]
    assert fork_calls[0].restore_from == ForkOrigin(build_id="src", iteration=2, snapshot_id="s-2")
    assert [e.iteration for e in pub.of(IterationCompleted) if e.build_id == "fk"] == [3]
    # the source is untouched
    after = await store.load("src")
    assert (after.version, after.turns, after.status) == (
        source_before.version,
        source_before.turns,
        "completed",
    )
    assert await store.turns("src") == source_turns


async def test_a_fork_at_an_iteration_whose_calls_had_no_results_answers_them() -> None:
    model = FakeModel(reply("c1", "ls"))
    agent, store, pub = make_agent(model)
    await agent.build_requested(source_request())  # acting at iteration 1, no result yet
    model.replies = [([text("ok")], "end_turn")]
    await agent.build_requested(fork_request(1, snapshot=None))
    turns = await store.turns("fk")
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    result, note = turns[2].content
    assert result["type"] == "tool_result" and result["tool_use_id"] == "c1"
    assert result["is_error"] and "forked" in result["content"]
    assert "newest snapshot at that iteration" in note["text"]
    [done] = [e for e in pub.of(BuildCompleted) if e.build_id == "fk"]
    assert done.iterations == 2


async def test_a_fork_at_iteration_zero_is_the_kickoff_and_the_note() -> None:
    agent, store, _, model = await three_iterations()
    model.replies = [([text("ok")], "end_turn")]
    await agent.build_requested(fork_request(0, snapshot=None))
    turns = await store.turns("fk")
    assert [t.role for t in turns[:2]] == ["user", "user"]
    assert turns[0].content == (await store.turns("src"))[0].content


async def test_no_fork_of_another_users_build_or_past_its_iteration() -> None:
    agent, store, _, _ = await three_iterations()
    with pytest.raises(PermanentError, match="no build src"):
        await agent.build_requested(fork_request(1, user="u2"))
    with pytest.raises(PermanentError, match="reached iteration 4, not 9"):
        await agent.build_requested(fork_request(9))
    assert await store.load("fk") is None


async def test_a_fork_of_a_build_not_created_yet_waits_then_is_refused() -> None:
    agent, store, _ = make_agent(FakeModel(([text("ok")], "end_turn")))
    with pytest.raises(RetryLater, match="no build src"):
        await agent.build_requested(fork_request(0), 1)
    with pytest.raises(PermanentError, match="no build src"):
        await agent.build_requested(fork_request(0), 5)
    assert await store.load("fk") is None


def test_turns_stored_without_their_iteration_are_counted_by_replies() -> None:
    turns = [
        Turn(0, "user", [text("go")]),
        Turn(1, "assistant", [text("a")]),
        Turn(2, "user", [text("r")]),
        Turn(3, "assistant", [text("b")]),
        Turn(4, "user", [text("r")]),
    ]
    assert [t.seq for t in forks.turns_until(turns, 1)] == [0, 1, 2]
    assert [t.seq for t in forks.turns_until(turns, 0)] == [0]
    assert len(forks.turns_until(turns, 7)) == 5


async def test_a_summary_of_the_sources_oldest_turns_is_kept_if_it_covers_only_kept_ones() -> None:
    agent, store, _, _ = await three_iterations()
    source = await store.load("src")
    turns = await store.turns("src")
    source.state.summarised_before, source.state.summary = 3, "The plan, and what ls showed."
    rules = agent.rules
    late, _ = forks.fork(rules, fork_request(2), source, turns)
    assert (late.state.summarised_before, late.state.summary) == (3, source.state.summary)
    early, _ = forks.fork(rules, fork_request(0), source, turns)  # only the kickoff is kept
    assert (early.state.summarised_before, early.state.summary) == (0, None)
