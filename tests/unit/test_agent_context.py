"""Compaction (token counting, a watermark that moves in jumps), the context-window failure, and
the think lease, with fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from kiln_agent import config as agent_config
from kiln_agent import control
from kiln_agent.adapters.memory import MemoryStore
from kiln_agent.checkpoint import Checkpoint, Turn
from kiln_agent.clearing import Clearing
from kiln_agent.context import compaction_point, context_tokens, estimate_tokens
from kiln_agent.kept import Entry, Kept
from kiln_agent.loop import Agent, build_request
from kiln_agent.ports import ModelReply, ModelRequest
from kiln_agent.tools import definitions
from kiln_contracts import (
    BuildCompleted,
    BuildFailed,
    BuildLimits,
    BuildRequested,
    CancelRequested,
    SleepRequested,
    ToolCall,
    Usage,
    WakeRequested,
)
from kiln_runtime import config as kiln_config
from kiln_runtime.errors import RetryLater
from tests.unit.test_agent_fakes import FakeModel, FakePublisher, result_for, text, tool_use


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not met before the deadline"
        await asyncio.sleep(0.005)


def start() -> BuildRequested:
    return BuildRequested(build_id="b1", user_id="u1", tier="pro", idea_brief="A tool.")


def agent_with(model: FakeModel, **config: Any) -> tuple[Agent, MemoryStore, FakePublisher]:
    cfg = agent_config.load().model_copy(update=config)
    store, pub = MemoryStore(), FakePublisher()
    return Agent(store, model, pub, cfg, kiln_config.default()), store, pub


def call(i: int) -> tuple[list[dict[str, Any]], str]:
    return [tool_use(f"c{i}", "bash", command=f"cat big{i}")], "tool_use"


def cleared(request: Any) -> list[int]:
    return [
        i
        for i, m in enumerate(request.messages)
        for b in m["content"]
        if str(b.get("content", "")).endswith("old output cleared]")
    ]


class CountingModel(FakeModel):
    """Reports the request's (estimated) size as its input tokens, as the API would."""

    async def complete(self, request: ModelRequest) -> ModelReply:
        reply = await super().complete(request)
        size = sum(estimate_tokens(x) for x in (request.system, request.tools, request.messages))
        return reply.model_copy(update={"usage": Usage(input_tokens=size, output_tokens=20)})


def strip(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **m,
            "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]],
        }
        for m in messages
    ]


async def test_compaction_moves_a_watermark_when_the_context_passes_compact_at() -> None:
    # ~2100 tokens of system and tools; each 5000-character result adds ~1250
    model = CountingModel(call(1), call(2), call(3), call(4), ([text("done")], "end_turn"))
    agent, store, pub = agent_with(
        model, context_windows={"default": 10000}, compact_at=0.5, keep_recent_turns=2
    )
    await agent.build_requested(start())
    for n in range(4):
        await agent.tool_result(result_for(pub.of(ToolCall)[n], "x" * 5000))
    assert len(pub.of(BuildCompleted)) == 1
    marks = [cleared(r) for r in model.requests]
    # request 4 would pass half the window (~5900 of 5000 tokens): the results before the last
    # two turns are cleared from then on
    assert marks[:3] == [[], [], []]
    assert marks[3] == [2, 4]
    # the watermark does not slide: request 5 (~4700 tokens) clears the same turns, so it starts
    # with all of request 4
    assert marks[4] == [2, 4]
    assert strip(model.requests[4].messages[:7]) == strip(model.requests[3].messages)
    cp = await store.load("b1")
    assert cp is not None and cp.state.compacted_before == 5


async def test_counting_uses_the_api_usage_plus_an_estimate_of_new_turns() -> None:
    model = FakeModel(call(1), ([text("done")], "end_turn"))
    agent, store, pub = agent_with(model)
    await agent.build_requested(start())
    cp = await store.load("b1")
    assert cp is not None and cp.state.context_tokens == 1000 + 500 + 100  # input+cache+output
    await agent.tool_result(result_for(pub.of(ToolCall)[0], "y" * 4000))
    turns = await store.turns("b1")
    cp = await store.load("b1")
    assert cp is not None
    cfg = agent_config.load()
    # after the last reply: its count, plus the turns written since
    cp.state.context_tokens, cp.state.context_turns = 1600, 2
    request = build_request(cp, turns[:3], definitions(cfg.narrate_description), cfg)
    assert context_tokens(cp, turns[:3], request) == 1600 + estimate_tokens(turns[2].content)
    cp.state.context_tokens = None  # no count (e.g. after a compaction): the whole request
    assert context_tokens(cp, turns[:3], request) > estimate_tokens("y" * 4000)


async def test_nothing_to_clear_means_no_compaction_point() -> None:
    model = FakeModel(call(1), ([text("done")], "end_turn"))
    agent, store, pub = agent_with(model, keep_recent_turns=2)
    await agent.build_requested(start())
    await agent.tool_result(result_for(pub.of(ToolCall)[0], "short"))
    cp = await store.load("b1")
    assert cp is not None
    assert compaction_point(cp, await store.turns("b1"), agent.rules.config) is None


async def test_a_request_that_cannot_fit_fails_with_context_window() -> None:
    model = FakeModel(([text("done")], "end_turn"))
    agent, _, pub = agent_with(model, context_windows={"default": 300})
    await agent.build_requested(start())
    [failed] = pub.of(BuildFailed)
    assert failed.reason == "context_window" and "300-token window" in failed.detail
    assert model.requests == []  # never sent


async def test_a_fresh_lease_defers_a_second_think() -> None:
    model = FakeModel(([text("done")], "end_turn"))
    model.gate = asyncio.Event()
    store, pub = MemoryStore(), FakePublisher()
    one = Agent(store, model, pub, agent_config.load(), kiln_config.default(), lease_s=5)
    two = Agent(store, model, pub, agent_config.load(), kiln_config.default(), lease_s=5)
    thinking = asyncio.create_task(one.build_requested(start()))
    await until(lambda: model.requests)
    wake = WakeRequested(build_id="b1", user_id="u1", reason="manual")
    with pytest.raises(RetryLater) as deferred:
        await two.wake(wake)  # another message of the build, on another replica, mid-call
    assert 0 < deferred.value.delay_s <= 5
    model.gate.set()
    await thinking
    await two.wake(wake)  # its redelivery: the build has moved on, nothing to do
    assert len(model.requests) == 1 and len(pub.of(BuildCompleted)) == 1
    assert store.leases == {}  # released


class RenewalStore(MemoryStore):
    """Records each renewal round (the builds in it); a renewal of one build alone is an error."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[set[str]] = []

    async def extend_leases(self, leases: dict[str, str], ttl_s: float) -> set[str]:
        self.rounds.append(set(leases))
        return await super().extend_leases(leases, ttl_s)

    async def extend_lease(self, build_id: str, token: str, ttl_s: float) -> bool:
        raise AssertionError("a lease renewed on its own")


async def test_the_leases_of_calls_in_flight_are_renewed_together_until_the_calls_end() -> None:
    model = FakeModel(([text("done")], "end_turn"))
    model.gate = asyncio.Event()
    store, pub = RenewalStore(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default(), lease_s=0.15)
    second = start().model_copy(update={"build_id": "b2"})
    thinking = [asyncio.create_task(agent.build_requested(m)) for m in (start(), second)]
    await until(lambda: len(model.requests) == 2)
    await until(lambda: len([r for r in store.rounds if r == {"b1", "b2"}]) >= 3)
    # still held past several lease lengths: each round renewed both
    now = time.monotonic()  # the memory store's clock
    assert {b for b, (_, until_) in store.leases.items() if until_ > now} == {"b1", "b2"}
    model.gate.set()
    await asyncio.gather(*thinking)
    assert len(pub.of(BuildCompleted)) == 2 and store.leases == {}
    rounds = len(store.rounds)
    await asyncio.sleep(0.2)  # past a round: with no call in flight, nothing is renewed
    assert len(store.rounds) == rounds


async def test_an_expired_lease_is_taken_over_and_a_lost_one_is_not_renewed() -> None:
    agent, store, _ = agent_with(FakeModel())
    await store.create(*control.start(agent.rules, start()))
    wait, cp = await store.take_lease("b1", "dead", 0.05)
    assert wait == 0.0 and cp is not None and cp.build_id == "b1"
    wait, cp = await store.take_lease("b1", "alive", 1)
    assert wait > 0 and cp is None
    assert await store.extend_lease("b1", "dead", 0.05)  # the holder renews
    deadline = asyncio.get_running_loop().time() + 5
    while (await store.take_lease("b1", "alive", 1))[0] > 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert store.leases["b1"][0] == "alive"
    assert not await store.extend_lease("b1", "dead", 1)  # taken over: not renewed
    await store.release_lease("b1", "dead")  # not the holder: no effect
    assert store.leases["b1"][0] == "alive"
    await store.release_lease("b1", "alive")
    assert not await store.extend_lease("b1", "alive", 1)  # given up: not taken again by a renewal
    assert await store.take_lease("nope", "alive", 1) == (0.0, None)


class SpyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, int]] = []

    async def turns(self, build_id: str, since: int = 0) -> list[Any]:
        self.asked.append((build_id, since))
        return await super().turns(build_id, since)


class ByIteration(FakeModel):
    """A tool call per iteration (numbered by the request's length), then done at the fifth."""

    async def complete(self, request: ModelRequest) -> ModelReply:
        n = (len(request.messages) + 1) // 2
        self.replies = [call(n) if n < 5 else ([text("done")], "end_turn")]
        return await super().complete(request)


async def _two_builds(
    turn_cache_mb: float, turn_cache_builds: int = 1_000
) -> tuple[ByIteration, SpyStore, Agent]:
    """Two builds of five iterations each, interleaved, on one replica (the cache never holds
    more than its limits)."""
    model, store, pub = ByIteration(), SpyStore(), FakePublisher()
    agent = Agent(
        store, model, pub, agent_config.load(), kiln_config.default(),
        turn_cache_mb=turn_cache_mb, turn_cache_builds=turn_cache_builds,
    )  # fmt: skip
    builds = ["b1", "b2"]
    for build_id in builds:
        await agent.build_requested(start().model_copy(update={"build_id": build_id}))
    for _ in range(4):
        for build_id in builds:
            latest = [c for c in pub.of(ToolCall) if c.build_id == build_id][-1]
            await agent.tool_result(result_for(latest, "x" * 50))
            assert agent.store.kept.chars <= turn_cache_mb * 2**20
            assert len(agent.store.kept.entries) <= turn_cache_builds
            assert agent.store.kept.chars == sum(k.size for k in agent.store.kept.entries.values())
    assert sorted(m.build_id for m in pub.of(BuildCompleted)) == builds
    return model, store, agent


async def test_the_cache_keeps_at_most_its_number_of_builds() -> None:
    one, store, _ = await _two_builds(turn_cache_mb=64, turn_cache_builds=1)
    uncached, _, _ = await _two_builds(turn_cache_mb=0)
    assert [r.messages for r in one.requests] == [r.messages for r in uncached.requests]
    # interleaved, each build evicts the other: every think reads its build's turns whole
    assert [since for _, since in store.asked] == [0] * 10


async def test_a_replica_reads_a_turn_once_and_keeps_the_turns_it_saves() -> None:
    cached, store, _ = await _two_builds(turn_cache_mb=64)
    uncached, plain, _ = await _two_builds(turn_cache_mb=0)
    # the same requests either way
    assert [r.messages for r in cached.requests] == [r.messages for r in uncached.requests]
    assert len(cached.requests) == 10
    for build_id in ("b1", "b2"):
        # the first think reads the first turn; every later turn this replica saved itself
        assert [since for b, since in store.asked if b == build_id] == [0]
    assert {since for _, since in plain.asked} == {0}


class CountingStore(SpyStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def load(self, build_id: str) -> Any:
        self.calls.append("load")
        return await super().load(build_id)

    async def take_lease(self, build_id: str, token: str, ttl_s: float) -> Any:
        self.calls.append("take")
        return await super().take_lease(build_id, token, ttl_s)

    async def save(self, cp: Any, new_turns: Any, **kw: Any) -> bool:
        self.calls.append("save")
        return await super().save(cp, new_turns, **kw)

    async def turns(self, build_id: str, since: int = 0) -> list[Any]:
        self.calls.append("turns")
        return await super().turns(build_id, since)

    async def mark_sent(self, sent: dict[str, int]) -> None:
        self.calls.append("mark_sent")
        await super().mark_sent(sent)


async def test_an_iteration_is_two_saves_and_clearing_the_outbox() -> None:
    """A result on the replica that made the call: recorded by a save that takes the think lease,
    on the checkpoint kept from the call's save, then the turns kept, the model, the reply's save
    (the lease given up), and the outbox cleared once published: no read of any kind."""
    model, store, pub = ByIteration(), CountingStore(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await agent.build_requested(start())
    for _ in range(3):
        store.calls.clear()
        await agent.tool_result(result_for(pub.of(ToolCall)[-1], "out"))
        assert store.calls == ["save", "save"]  # the clearing is not waited for
        await agent.store.clearing.settle()
        assert store.calls == ["save", "save", "mark_sent"]
        assert store.leases == {}
        row = await store.load("b1")  # a lease held in a replica's memory is not in the row
        assert row is not None and row.lease is None
    assert len(model.requests) == 4


async def test_a_checkpoint_kept_from_before_another_replica_moved_on_is_read_afresh() -> None:
    """Replica A keeps the build's checkpoint; replica B then runs an iteration of it; the next
    result reaches A, whose kept checkpoint is an iteration behind: A reads it afresh (the
    result is not dropped as stale) and reads only the turns B added."""
    model, store = ByIteration(), CountingStore()
    pub = FakePublisher()
    a = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    b = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await a.build_requested(start())
    await b.tool_result(result_for(pub.of(ToolCall)[-1], "one"))  # iteration 2 called by B
    assert a.store.kept.entries["b1"].checkpoint is not None  # A's, at iteration 1
    store.calls.clear()
    store.asked.clear()
    await a.tool_result(result_for(pub.of(ToolCall)[-1], "two"))
    assert store.calls[:2] == ["load", "save"]  # "stale" on the kept one: confirmed afresh
    assert store.asked == [("b1", 2)]  # from the first turn B saved on
    assert [m["content"][-1].get("content") for m in model.requests[-1].messages[2::2]] == [
        "one",
        "two",
    ]
    # a change decided on a kept checkpoint that is behind fails the version check, and is
    # applied again on fresh state
    await b.tool_result(result_for(pub.of(ToolCall)[-1], "three"))
    await a.tool_result(result_for(pub.of(ToolCall)[-1], "four"))
    done = await store.load("b1")
    assert done is not None and done.status == "completed" and done.iteration == 5


async def test_the_turn_cache_is_bounded_and_stays_correct() -> None:
    limit_mb = 0.001  # 1048 characters: less than the two builds' turns at the end
    small, store, agent = await _two_builds(turn_cache_mb=limit_mb)
    uncached, _, _ = await _two_builds(turn_cache_mb=0)
    assert [r.messages for r in small.requests] == [r.messages for r in uncached.requests]
    assert list(agent.store.kept.entries) == [] and agent.store.kept.chars == 0  # both builds ended
    misses = [since for _, since in store.asked if since == 0]
    assert len(misses) > 2  # evicted, then read whole again


async def test_tool_calls_are_published_after_the_lease_is_released() -> None:
    model = FakeModel(call(1), ([text("done")], "end_turn"))
    store = MemoryStore()
    held_when_published: list[bool] = []

    class Watching(FakePublisher):
        async def publish(self, msg: Any) -> None:
            if isinstance(msg, ToolCall):
                held_when_published.append(msg.build_id in store.leases)
            await super().publish(msg)

    pub = Watching()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await agent.build_requested(start())
    [c] = pub.of(ToolCall)
    assert held_when_published == [False]
    # a result answering at once thinks straight away (no RetryLater on a held lease)
    await agent.tool_result(result_for(c))
    assert len(pub.of(BuildCompleted)) == 1


async def test_building_a_request_leaves_the_turns_as_they_were() -> None:
    model = FakeModel(call(1), call(2), ([text("done")], "end_turn"))
    agent, store, pub = agent_with(model, keep_recent_turns=2, clear_over_chars=10)
    await agent.build_requested(start())
    await agent.tool_result(result_for(pub.of(ToolCall)[0], "x" * 100))
    turns = await store.turns("b1")
    before = [[dict(b) for b in t.content] for t in turns]
    cp = await store.load("b1")
    assert cp is not None
    cp.state.compacted_before = len(turns)  # clear every long output
    request = build_request(cp, turns, definitions("n"), agent.rules.config)
    marked = [b for m in request.messages for b in m["content"] if "cache_control" in b]
    assert cleared(request) and len(marked) == 2  # the last two user turns
    assert [[dict(b) for b in t.content] for t in turns] == before
    assert not any("cache_control" in b for t in turns for b in t.content)


async def test_a_build_put_to_sleep_leaves_nothing_in_the_turn_cache() -> None:
    model, store, pub = ByIteration(), SpyStore(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await agent.build_requested(start())
    first = pub.of(ToolCall)[-1]
    await agent.tool_result(result_for(first, "x" * 50))  # a second think: turns now cached
    assert first.build_id in agent.store.kept.entries
    await agent.sleep(first.caused(SleepRequested, reason="allowance"))
    await agent.tool_result(result_for(pub.of(ToolCall)[-1], "y"))  # the set completes: sleeps
    assert (await store.load(first.build_id)).status == "sleeping"  # type: ignore[union-attr]
    assert agent.store.kept.entries == {} and agent.store.kept.chars == 0


class SlowTurns(SpyStore):
    """Reading turns waits until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.go_on: asyncio.Event | None = None

    async def turns(self, build_id: str, since: int = 0) -> list[Turn]:
        if self.go_on is not None:
            self.reading.set()
            await self.go_on.wait()
        return await super().turns(build_id, since)


async def test_a_build_that_moves_on_mid_think_leaves_nothing_in_the_turn_cache() -> None:
    model, store, pub = ByIteration(), SlowTurns(), FakePublisher()
    await Agent(store, model, pub, agent_config.load(), kiln_config.default()).build_requested(
        start()
    )
    first = pub.of(ToolCall)[-1]
    store.go_on = asyncio.Event()
    # the result reaches another replica, which has no turns of the build yet
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    thinking = asyncio.create_task(agent.tool_result(result_for(first, "x" * 50)))
    await store.reading.wait()  # the think holds its lease and is reading the turns
    await agent.cancel(first.caused(CancelRequested))  # ends the build at once
    store.go_on.set()
    await thinking  # its reply is dropped: the build has moved on
    assert (await store.load(first.build_id)).status == "cancelled"  # type: ignore[union-attr]
    assert agent.store.kept.entries == {} and agent.store.kept.chars == 0


async def test_a_build_put_to_sleep_mid_think_leaves_nothing_in_the_turn_cache() -> None:
    model, store, pub = ByIteration(), SlowTurns(), FakePublisher()
    await Agent(store, model, pub, agent_config.load(), kiln_config.default()).build_requested(
        start()
    )
    first = pub.of(ToolCall)[-1]
    store.go_on = asyncio.Event()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    thinking = asyncio.create_task(agent.tool_result(result_for(first, "x" * 50)))
    await store.reading.wait()
    await agent.sleep(first.caused(SleepRequested, reason="allowance"))
    store.go_on.set()
    await thinking  # its reply is kept (paid for); the build sleeps once its calls are answered
    for call in pub.of(ToolCall):
        if call.iteration == 2:
            await agent.tool_result(result_for(call))
    assert (await store.load(first.build_id)).status == "sleeping"  # type: ignore[union-attr]
    assert agent.store.kept.entries == {} and agent.store.kept.chars == 0


async def test_parallel_results_on_one_replica_leave_the_latest_checkpoint_kept() -> None:
    """Two results of one iteration handled at once: one handler starts from the kept checkpoint,
    the other reads the row; the loser of the race re-applies on fresh state, the set completes
    once, the checkpoint kept afterwards is the newest, and the next iteration reads nothing."""
    two = [tool_use("c1", "bash", command="a"), tool_use("c2", "bash", command="b")], "tool_use"
    model = FakeModel(two, call(3), ([text("done")], "end_turn"))
    store, pub = CountingStore(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await agent.build_requested(start())
    c1, c2 = pub.of(ToolCall)
    await asyncio.gather(agent.tool_result(result_for(c1)), agent.tool_result(result_for(c2)))
    assert len(model.requests) == 2  # one think for the completed set
    kept = agent.store.kept.entries["b1"].checkpoint
    row = await store.load("b1")
    assert kept is not None and row is not None and kept.version == row.version
    store.calls.clear()
    await agent.tool_result(result_for(pub.of(ToolCall)[-1]))
    await agent.store.clearing.settle()
    assert store.calls == ["save", "save", "mark_sent"]
    assert len(pub.of(BuildCompleted)) == 1


class SlowClearing(CountingStore):
    """Clearing published outboxes waits until ``go_on`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go_on = asyncio.Event()

    async def mark_sent(self, sent: dict[str, int]) -> None:
        await self.go_on.wait()
        await super().mark_sent(sent)


async def test_a_result_arriving_while_the_outbox_is_being_cleared_starts_from_the_kept_one() -> (
    None
):
    """The ToolCall is published, the clearing of the outbox has not finished when its result
    arrives: the result is handled from the kept checkpoint (no read), and the late clearing
    (for a version the build has moved past) changes nothing."""
    store = SlowClearing()
    model, pub = ByIteration(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    first = asyncio.create_task(agent.build_requested(start()))
    await until(lambda: len(pub.of(ToolCall)) == 1)
    store.calls.clear()
    second = asyncio.create_task(agent.tool_result(result_for(pub.of(ToolCall)[-1], "one")))
    await until(lambda: len(pub.of(ToolCall)) == 2)
    assert "load" not in store.calls and store.calls[:2] == ["save", "save"]
    store.go_on.set()
    await asyncio.gather(first, second)
    await agent.store.clearing.settle()
    row = await store.load("b1")
    assert row is not None and row.outbox == [] and row.iteration == 2


class AnsweringAtOnce(FakePublisher):
    """Each ToolCall's result is handled before the publish of the call returns (its answer
    arrived before the publisher heard its acknowledgement): ``agent`` handles it meanwhile. A
    call published again (same event id) is not delivered again, as the server drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.agent: Agent | None = None
        self.handlers: list[asyncio.Task[None]] = []

    async def publish(self, msg: Any) -> None:
        again = any(m.event_id == msg.event_id for m in self.sent)
        await super().publish(msg)
        if isinstance(msg, ToolCall) and not again and self.agent is not None:
            self.handlers.append(asyncio.create_task(self.agent.tool_result(result_for(msg))))
            for _ in range(20):  # as far as the handler gets before the acknowledgement
                await asyncio.sleep(0)


async def test_a_result_arriving_before_its_call_is_acknowledged_starts_from_the_kept_one() -> None:
    """The result of a ToolCall is handled while the publish of that call has not returned: it
    waits for the checkpoint being handed back instead of reading the row, so a whole build on
    one replica reads no checkpoint (and no kept checkpoint is ever an iteration behind)."""
    model, store, pub = ByIteration(), CountingStore(), AnsweringAtOnce()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    pub.agent = agent
    await agent.build_requested(start())
    await until(lambda: len(pub.of(BuildCompleted)) == 1)
    await asyncio.gather(*pub.handlers)
    assert len(pub.handlers) == 4 and len(model.requests) == 5
    # the first think takes its lease and reads the row in one go (the memory store's
    # take_lease reads through load); every result after that starts from the kept checkpoint
    assert store.calls[:2] == ["take", "load"] and "load" not in store.calls[2:], store.calls


def test_a_checkpoint_older_than_one_saved_since_is_not_kept() -> None:
    """A handler done with version 3 after another handler of the build saved version 4 (it had
    read the row meanwhile) leaves nothing kept: the next message reads the row, not a
    checkpoint an iteration behind."""
    kept = Kept(max_chars=10_000, max_builds=10)
    cp = Checkpoint("b1", "u1", "pro", "m", BuildLimits(), "system", version=3, turns=1)
    kept.keep("b1", Entry(), [Turn(0, "user", [{"type": "text", "text": "go"}], 0)])
    newer = dataclasses.replace(cp, version=4, turns=2)
    kept.saved(newer, [Turn(1, "assistant", [{"type": "text", "text": "ok"}], 1)])
    kept.remember(cp)
    assert kept.recall("b1") is None
    kept.remember(newer)
    assert kept.recall("b1") is newer


async def test_published_outboxes_are_cleared_together() -> None:
    """Marks handed over together are written by one write; a newer version of a build replaces
    its older mark."""
    seen: list[dict[str, int]] = []

    class Recording(MemoryStore):
        async def mark_sent(self, sent: dict[str, int]) -> None:
            seen.append(dict(sent))

    clearing = Clearing(Recording())
    for i in range(5):
        clearing.add(f"b{i}", 3)
    clearing.add("b0", 4)
    clearing.add("b0", 2)  # late: the build is past it
    await clearing.settle()
    assert seen == [{"b0": 4, "b1": 3, "b2": 3, "b3": 3, "b4": 3}]


async def test_a_row_read_before_its_clearing_is_written_is_not_published_again() -> None:
    """While the clearing of published outboxes is pending or being written, a read of those rows
    on this replica (as a think after a wake does) does not publish them again."""
    store = SlowClearing()
    model, pub = ByIteration(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    ids = [f"b{i}" for i in range(5)]
    await asyncio.gather(
        *(
            agent.build_requested(
                BuildRequested(build_id=b, user_id="u1", tier="pro", idea_brief="A tool.")
            )
            for b in ids
        )
    )
    published = len(pub.sent)
    for b in ids:
        assert (await store.load(b)).outbox != []  # type: ignore[union-attr]
        cp = await agent.store.load(b)
        assert cp is not None and cp.outbox == []
        await agent.driver.flush(cp)
    assert len(pub.sent) == published
    store.go_on.set()
    await agent.store.clearing.settle()
    assert [(await store.load(b)).outbox for b in ids] == [[]] * 5  # type: ignore[union-attr]


async def test_an_outbox_whose_clearing_failed_is_published_again_by_the_next_reader() -> None:
    """The clearing cannot be written (the database away): the outbox stays in the row and a
    replica that reads the row later publishes it again, under the same event ids."""

    class NoClearing(CountingStore):
        async def mark_sent(self, sent: dict[str, int]) -> None:
            raise OSError("the database is away")

    model, store, pub = ByIteration(), NoClearing(), FakePublisher()
    agent = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await agent.build_requested(start())
    await agent.store.clearing.settle()
    first = [m.event_id for m in pub.sent]
    other = Agent(store, model, pub, agent_config.load(), kiln_config.default())
    await other.driver.flush(await other.store.load("b1"))  # type: ignore[arg-type]
    assert [m.event_id for m in pub.sent[len(first) :]] == [
        m.event_id
        for m in (await store.load("b1")).outbox  # type: ignore[union-attr]
    ]
    assert set(m.event_id for m in pub.sent[len(first) :]) <= set(first)


def test_the_window_and_output_limit_follow_the_models_entry() -> None:
    agent, _, _ = agent_with(FakeModel(([text("done")], "end_turn")))
    assert agent.rules.window("claude-sonnet-5-5") == 1_000_000
    assert agent.rules.window("claude-haiku-4-5-20251001") == 200_000  # a dated id, its entry's
    cp = Checkpoint("b", "u", "free", "claude-haiku-4-5", BuildLimits(), "system")
    spec = kiln_config.default().models["claude-haiku-4-5"]
    request = build_request(
        cp, [], [], agent.rules.config.model_copy(update={"max_tokens": 100_000}), spec
    )
    assert request.max_tokens == 64_000  # Haiku 4.5's output limit
    assert request.thinking is None and request.output_config is None  # no budget, no effort
