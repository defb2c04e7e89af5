"""The watchdog on the agent with fakes: a build that stopped moving is retried with backoff,
then failed (reason stalled); a build that moves, or runs a model call, is left alone."""

from __future__ import annotations

from kiln_agent import control
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.stalls import Watch
from kiln_agent.watchdog import Watchdog
from kiln_contracts import BuildFailed, BuildLimits, BuildRequested, ToolCall
from tests.unit.test_agent_fakes import FakeModel, make_agent, result_for, text, tool_use

TWO_CALLS = (
    [text("two"), tool_use("c1", "bash", command="ls"), tool_use("c2", "bash", command="pwd")],
    "tool_use",
)
DONE = ([text("All done.")], "end_turn")
WATCH = Watch(idle_s=10.0, retries=2)


def request(build_id: str = "b1", timeout_s: float = 1.0) -> BuildRequested:
    return BuildRequested(
        build_id=build_id,
        user_id="u1",
        tier="pro",
        idea_brief="A tool that counts words.",
        limits=BuildLimits(tool_timeout_s=timeout_s),
    )


def age(store: MemoryStore, build_id: str, seconds: float) -> None:
    """As if the build's row had last changed ``seconds`` earlier."""
    store.updated[build_id] -= seconds


async def test_an_acting_build_is_retried_with_backoff_then_fails_as_stalled() -> None:
    agent, store, pub = make_agent(FakeModel(TWO_CALLS, DONE))
    dog = Watchdog(agent, WATCH, interval_s=1.0)
    await agent.build_requested(request())
    first = {c.call_id: c for c in pub.of(ToolCall)}
    await agent.tool_result(result_for(first["c1"]))  # c2's ToolCall is lost
    assert await dog.sweep() == 0  # not idle yet

    age(store, "b1", 11)
    assert await dog.sweep() == 1
    resent = [c for c in pub.of(ToolCall) if c.event_id not in {f.event_id for f in first.values()}]
    assert [(c.call_id, c.iteration) for c in resent] == [("c2", 1)]  # only the unanswered one
    assert resent[0].input == first["c2"].input

    age(store, "b1", 11)  # found again, but the second retry waits twice as long
    assert await dog.sweep() == 1 and len(pub.of(ToolCall)) == 3
    age(store, "b1", 10)
    await dog.sweep()
    assert len(pub.of(ToolCall)) == 4  # retry 2: a new id again
    assert len({c.event_id for c in pub.of(ToolCall)}) == 4

    age(store, "b1", 40)  # retries used up: fails
    await dog.sweep()
    failed = pub.of(BuildFailed)
    assert [(f.reason, f.iterations) for f in failed] == [("stalled", 1)]
    assert "no result for bash (c2)" in failed[0].detail and "retried 2 times" in failed[0].detail
    cp = await store.load("b1")
    assert cp is not None and cp.status == "failed"
    age(store, "b1", 1000)
    assert await dog.sweep() == 0  # an ended build is not looked at


async def test_a_result_after_a_retry_is_progress_and_the_retries_start_over() -> None:
    agent, store, pub = make_agent(FakeModel(TWO_CALLS, DONE))
    dog = Watchdog(agent, Watch(idle_s=10.0, retries=1), interval_s=1.0)
    await agent.build_requested(request())
    age(store, "b1", 11)
    await dog.sweep()  # retry 1 of 1: both calls sent again
    assert sorted(c.call_id for c in pub.of(ToolCall)) == ["c1", "c1", "c2", "c2"]
    c1 = next(c for c in pub.of(ToolCall) if c.call_id == "c1")
    await agent.tool_result(result_for(c1))  # progress
    age(store, "b1", 11)
    await dog.sweep()  # a first retry again, not the failure the next one would have been
    assert not pub.of(BuildFailed)
    assert sorted(c.call_id for c in pub.of(ToolCall)) == ["c1", "c1", "c2", "c2", "c2"]
    for call in pub.of(ToolCall):  # every copy answers: the duplicates change nothing
        await agent.tool_result(result_for(call))
    done = await store.load("b1")
    assert done is not None and done.status == "completed" and not pub.of(BuildFailed)


async def test_an_acting_build_waits_at_least_twice_its_tool_timeout() -> None:
    agent, store, pub = make_agent(FakeModel(TWO_CALLS, DONE))
    dog = Watchdog(agent, Watch(idle_s=1.0, retries=0), interval_s=1.0)
    await agent.build_requested(request(timeout_s=120.0))
    age(store, "b1", 100)  # a long call may still be running
    await dog.sweep()
    assert not pub.of(BuildFailed)
    age(store, "b1", 150)
    await dog.sweep()
    assert [f.reason for f in pub.of(BuildFailed)] == ["stalled"]


async def test_a_thinking_build_whose_message_was_lost_thinks_again() -> None:
    agent, store, pub = make_agent(FakeModel(TWO_CALLS, DONE))
    dog = Watchdog(agent, WATCH, interval_s=1.0)
    cp, turns = control.start(agent.rules, request())
    assert await store.create(cp, turns)  # created, but the message that would think is gone
    age(store, "b1", 11)
    await dog.sweep()
    assert {c.call_id for c in pub.of(ToolCall)} == {"c1", "c2"}
    moved = await store.load("b1")
    assert moved is not None and moved.status == "acting" and moved.iteration == 1


async def test_a_build_with_a_model_call_running_or_moved_since_the_sweep_is_left_alone() -> None:
    agent, store, pub = make_agent(FakeModel(TWO_CALLS, DONE))
    cp, turns = control.start(agent.rules, request())
    await store.create(cp, turns)
    age(store, "b1", 100)
    await store.take_lease("b1", "another replica", 30.0)  # mid-call elsewhere
    assert await store.idle(10.0, 10) == []
    await store.release_lease("b1", "another replica")
    [idle] = await store.idle(10.0, 10)
    await agent.nudge(idle, WATCH)  # thinks (no change since the sweep)
    assert len(pub.of(ToolCall)) == 2
    await agent.nudge(idle, WATCH)  # the same sighting again: the build has moved, nothing
    assert len(pub.of(ToolCall)) == 2 and not pub.of(BuildFailed)
