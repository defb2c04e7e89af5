"""The agent behind budget gates, with fakes: what the watch keeps, what a think and a new build do
behind a closed gate, and that nothing is called while the gates cannot be known."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from kiln_agent.gates import BudgetGates, GateUpdate
from kiln_contracts import (
    BudgetGate,
    BuildCompleted,
    BuildFailed,
    BuildLimits,
    BuildRejected,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    CheckpointSaved,
    SleepRequested,
    ToolCall,
    WakeRequested,
    stable_id,
)
from kiln_runtime.errors import RetryLater
from tests.unit.test_agent_fakes import FakeModel, make_agent, result_for, text, tool_use

NOW = datetime(2025, 3, 31, 12, tzinfo=UTC)
RESET = datetime(2025, 4, 1, tzinfo=UTC)


def closed(user_id: str = "u1", until: datetime = RESET) -> BudgetGate:
    return BudgetGate(
        user_id=user_id,
        state="closed",
        until=until,
        reason="daily allowance used up",
        spent_micro_usd=1_200,
        allowance_micro_usd=1_000,
        updated_at=NOW,
    )


class FakeSource:
    """The bucket: ``put`` writes a value (the watch sees it unless ``lag``), ``read`` reads the
    latest; ``break_watch`` makes the running watch fail."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[BudgetGate | None, int]] = {}
        self.revision = 0
        self.updates: asyncio.Queue[GateUpdate | Exception] = asyncio.Queue()
        self.up = True
        self.reads = 0
        self.watches = 0

    def put(self, gate: BudgetGate, *, lag: bool = False) -> None:
        self.revision += 1
        self.values[gate.user_id] = (gate, self.revision)
        if not lag:
            self.updates.put_nowait((gate.user_id, gate, self.revision))

    def break_watch(self) -> None:
        self.updates.put_nowait(ConnectionError("watch lost"))

    async def watch(self) -> AsyncIterator[GateUpdate | None]:
        self.watches += 1
        for user_id, (gate, revision) in list(self.values.items()):
            yield user_id, gate, revision
        yield None
        while True:
            item = await self.updates.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        self.reads += 1
        return self.values.get(user_id, (None, 0))

    def connected(self) -> bool:
        return self.up

    def stopping(self) -> bool:
        return False


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def source() -> AsyncIterator[FakeSource]:
    yield FakeSource()


async def started(source: FakeSource, now: datetime = NOW) -> BudgetGates:
    gates = BudgetGates(source, clock=lambda: now)
    await gates.start(timeout_s=2)
    return gates


# ------------------------------------------------------------------------------ the gates


async def test_the_current_values_are_read_before_anything_is_answered(source: FakeSource):
    source.put(closed())
    gates = BudgetGates(source, clock=lambda: NOW)
    with pytest.raises(RetryLater):  # not started: unknown, fail closed
        await gates.closed("u1")
    await gates.start(timeout_s=2)
    try:
        assert await gates.closed("u1") == closed()
        assert await gates.closed("u2") is None  # never closed: no request at all
        assert source.reads == 1  # the closed one was confirmed, the open one asked no one
    finally:
        await gates.stop()


async def test_start_fails_when_the_bucket_cannot_be_read() -> None:
    class Silent(FakeSource):
        async def watch(self) -> AsyncIterator[GateUpdate | None]:
            await asyncio.Event().wait()
            yield None

    gates = BudgetGates(Silent(), clock=lambda: NOW)
    with pytest.raises(TimeoutError):
        await gates.start(timeout_s=0.1)
    with pytest.raises(RetryLater):
        await gates.closed("u1")


async def test_a_reopening_the_watch_has_not_delivered_yet_is_read(source: FakeSource):
    source.put(closed())
    gates = await started(source)
    try:
        source.put(BudgetGate.opened("u1"), lag=True)  # a top-up; the watch is behind
        assert await gates.closed("u1") is None
        source.updates.put_nowait(("u1", closed(), 1))  # the watch's stale update comes late
        await settle()
        assert await gates.closed("u1") is None and source.reads == 1  # kept the newer revision
    finally:
        await gates.stop()


async def test_a_closed_gate_expires_by_itself_and_a_nearly_open_one_is_waited_for(
    source: FakeSource,
):
    source.put(closed(until=NOW - timedelta(seconds=1)))
    source.put(closed("u2", until=NOW + timedelta(seconds=2)))
    gates = await started(source)
    try:
        assert await gates.closed("u1") is None  # the reset has passed: no writer needed
        with pytest.raises(RetryLater) as waited:
            await gates.closed("u2")
        assert 0 < waited.value.delay_s <= 2
    finally:
        await gates.stop()


async def test_a_broken_watch_or_bus_fails_closed_until_the_bucket_is_read_again(
    source: FakeSource,
):
    gates = await started(source)
    try:
        source.up = False
        with pytest.raises(RetryLater):
            await gates.closed("u1")
        source.up = True
        source.put(closed(), lag=True)
        source.break_watch()
        await settle()
        with pytest.raises(RetryLater):  # between the failure and the next watch
            await gates.closed("u1")
        for _ in range(100):
            if source.watches == 2 and gates._loaded.is_set():
                break
            await asyncio.sleep(0.05)
        assert await gates.closed("u1") == closed()  # read again from the current values
    finally:
        await gates.stop()


# ------------------------------------------------------------------------------ the loop


class FakeGates:
    def __init__(self) -> None:
        self.gates: dict[str, BudgetGate] = {}
        self.unknown = False

    async def closed(self, user_id: str) -> BudgetGate | None:
        if self.unknown:
            raise RetryLater("unknown", delay_s=5)
        return self.gates.get(user_id)


TOOL = ([tool_use("c1", "bash", command="ls")], "tool_use")
DONE = ([text("All done.")], "end_turn")


def request(build_id: str = "b1", **fields: object) -> BuildRequested:
    return BuildRequested(build_id=build_id, user_id="u1", tier="pro", idea_brief="x", **fields)  # type: ignore[arg-type]


async def test_behind_a_closed_gate_a_think_sleeps_until_the_reset_without_a_model_call():
    gates = FakeGates()
    model = FakeModel(TOOL, DONE)
    agent, store, pub = make_agent(model, budget_gates=gates)
    await agent.build_requested(request())
    [call] = pub.of(ToolCall)
    gates.gates["u1"] = closed()  # the budget closed it while the tool ran
    await agent.tool_result(result_for(call))
    assert len(model.requests) == 1
    [sleeping] = pub.of(BuildSleeping)
    assert sleeping.wake_at == RESET
    assert sleeping.reason == "daily allowance used up: spent 1200 of 1000 micro-USD"
    assert [c.reason for c in pub.of(CheckpointSaved)] == ["sleep"]
    assert (await store.load("b1")).status == "sleeping"  # type: ignore[union-attr]
    # the budget's own SleepRequested comes after: nothing more
    await agent.sleep(SleepRequested(build_id="b1", user_id="u1", reason="budget"))
    assert len(pub.of(BuildSleeping)) == 1
    # woken by hand while still closed: asleep again at once, still no model call
    await agent.wake(WakeRequested(build_id="b1", user_id="u1", reason="woken by user"))
    assert len(pub.of(BuildResumed)) == 1 and len(pub.of(BuildSleeping)) == 2
    assert len(model.requests) == 1
    # the scheduled wake at the reset (the gate has opened): one wake, the build goes on
    del gates.gates["u1"]
    reset = WakeRequested(build_id="b1", user_id="u1", reason="allowance reset")
    await agent.wake(reset)
    await agent.wake(reset)
    assert len(pub.of(BuildResumed)) == 2 and len(model.requests) == 2
    assert len(pub.of(BuildCompleted)) == 1


async def test_a_build_requested_behind_a_closed_gate_is_rejected_for_good():
    gates = FakeGates()
    gates.gates["u1"] = closed()
    model = FakeModel(DONE)
    agent, store, pub = make_agent(model, budget_gates=gates)
    await agent.build_requested(request())
    [rejected] = pub.of(BuildRejected)
    assert rejected.event_id == stable_id("b1", "rejected")
    assert (rejected.spent_micro_usd, rejected.allowance_micro_usd) == (1_200, 1_000)
    assert rejected.resets_at == RESET
    assert "resets at 2025-04-01T00:00:00+00:00" in rejected.reason
    assert "top up" in rejected.reason
    cp = await store.load("b1")
    assert cp is not None and cp.status == "rejected" and cp.terminal and cp.turns == 0
    del gates.gates["u1"]  # reopened: a redelivered request does not start it after all
    await agent.build_requested(request())
    assert model.requests == [] and len(pub.of(BuildRejected)) == 1
    await agent.wake(WakeRequested(build_id="b1", user_id="u1", reason="woken by user"))
    assert model.requests == [] and pub.of(BuildResumed) == []


async def test_unknown_gates_start_no_build_and_call_no_model():
    gates = FakeGates()
    gates.unknown = True
    model = FakeModel(TOOL, DONE)
    agent, store, pub = make_agent(model, budget_gates=gates)
    with pytest.raises(RetryLater):
        await agent.build_requested(request())
    assert await store.load("b1") is None and pub.sent == []
    gates.unknown = False
    await agent.build_requested(request())  # redelivered once the gates are known
    [call] = pub.of(ToolCall)
    gates.unknown = True
    with pytest.raises(RetryLater):
        await agent.tool_result(result_for(call))
    assert len(model.requests) == 1  # the result is recorded, the think waits
    gates.unknown = False
    await agent.tool_result(result_for(call))  # the redelivery thinks
    assert len(model.requests) == 2 and len(pub.of(BuildCompleted)) == 1


async def test_the_per_build_cap_still_ends_the_build_before_the_gate_is_asked():
    gates = FakeGates()
    model = FakeModel(TOOL, DONE)
    agent, _, pub = make_agent(model, budget_gates=gates)
    await agent.build_requested(request(limits=BuildLimits(max_cost_micro_usd=10**9)))
    [call] = pub.of(ToolCall)
    gates.gates["u1"] = closed()
    store = agent.store
    cp = await store.load("b1")
    assert cp is not None
    cp.limits = BuildLimits(max_cost_micro_usd=cp.cost_micro_usd)  # the cap is reached
    agent.store.drop("b1")
    await store.save(cp, [])
    await agent.tool_result(result_for(call))
    [failed] = pub.of(BuildFailed)
    assert failed.reason == "cost_limit" and pub.of(BuildSleeping) == []
    assert len(model.requests) == 1


async def test_a_sleep_asked_for_while_the_think_waits_needs_no_gate_and_no_model_call():
    gates = FakeGates()
    model = FakeModel(TOOL, DONE)
    agent, _, pub = make_agent(model, budget_gates=gates)
    await agent.build_requested(request())
    [call] = pub.of(ToolCall)
    gates.unknown = True
    with pytest.raises(RetryLater):
        await agent.tool_result(result_for(call))  # recorded; the think waits for the gates
    await agent.sleep(SleepRequested(build_id="b1", user_id="u1", reason="budget"))
    await agent.tool_result(result_for(call))  # redelivered, gates still unknown: it sleeps
    [sleeping] = pub.of(BuildSleeping)
    assert sleeping.reason == "budget" and len(model.requests) == 1
