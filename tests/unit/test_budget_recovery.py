"""A budget store that has lost its data is rebuilt from the stream before it charges again
(in-memory store and stream; the same on real Redis and NATS: tests/integration/test_budget_redis.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from kiln_budget import allowance, app, recovery, spending
from kiln_budget.deps import Deps
from kiln_contracts import (
    BuildCompleted,
    BuildContinued,
    BuildRequested,
    BuildResumed,
    Envelope,
    SleepRequested,
    WakeRequested,
)
from kiln_contracts.rpc import BudgetStatusReply, BudgetStatusRequest
from kiln_runtime import config as kiln_config
from kiln_runtime.errors import RetryLater
from tests.unit.test_budget_spending import (
    NOW,
    FakeCommands,
    FakeStore,
    FixedClock,
    iteration,
    topup,
)


@dataclass
class FakeStream:
    """The stream: what the services published, in order; replayed by kind."""

    messages: list[Envelope] = field(default_factory=list)
    replays: int = 0
    during_replay: list[object] = field(default_factory=list)  # called after the first message

    async def replay(self, kinds: Sequence[type[Envelope]]) -> AsyncIterator[Envelope]:
        self.replays += 1
        for n, msg in enumerate(list(self.messages)):
            if isinstance(msg, tuple(kinds)):
                yield msg
            if n == 0:
                for hook in self.during_replay:
                    hook()  # type: ignore[operator]


@dataclass
class Budget:
    deps: Deps
    stream: FakeStream
    commands: FakeCommands
    store: FakeStore

    async def handle(self, event: Envelope) -> None:
        """Publish ``event`` on the stream, then handle it as the budget's subscriber does."""
        self.stream.messages.append(event)
        handler = {
            "iteration_completed": spending.iteration_completed,
            "build_requested": spending.build_started,
            "build_resumed": spending.build_resumed,
            "build_completed": spending.build_ended,
            "build_continued": spending.build_continued,
            "top_up_requested": allowance.top_up,
        }[event.kind]
        await recovery.guarded(self.deps, handler, event)  # type: ignore[arg-type]
        # what the budget publishes goes on the stream too
        self.stream.messages.extend(m for m in self.commands.now if m not in self.stream.messages)


def budget(allowance_micro_usd: int | None = 1_000) -> Budget:
    store, stream, commands = FakeStore(), FakeStream(), FakeCommands()
    deps = Deps(
        store=store,
        clock=FixedClock(NOW),
        config=kiln_config.default(),
        commands=commands,
        demo_allowance_micro_usd=allowance_micro_usd,
        history=stream,
    )
    return Budget(deps, stream, commands, store)


def requested(build_id: str, tier: str = "pro") -> BuildRequested:
    return BuildRequested(build_id=build_id, user_id="u1", idea_brief="x", tier=tier)


async def test_a_lost_store_is_rebuilt_from_the_stream_before_the_next_charge() -> None:
    b = budget(None)
    for build_id in ("b1", "b2"):
        await b.handle(requested(build_id))
    charged = [iteration(input_tokens=1000), iteration(output_tokens=100)]  # 3_000 + 1_500
    earlier = iteration(input_tokens=10).model_copy(
        update={"occurred_at": NOW - timedelta(days=2)}
    )  # 30, on March 29th
    for event in (*charged, earlier):
        await b.handle(event)
    await b.handle(topup("u1", "t1", 7_000))
    await b.handle(
        BuildCompleted(build_id="b2", user_id="u1", summary="", iterations=1, cost_micro_usd=0)
    )
    # the same iteration again on the stream (a republish after the duplicate window)
    b.stream.messages.append(charged[0])
    before = await allowance.allowance(b.deps, "u1")
    assert (before.spent_today_micro_usd, before.spent_month_micro_usd) == (4_500, 4_530)
    assert b.stream.replays == 0  # the store was intact all along

    b.store.lose_everything()
    assert await spending.spent_today(b.deps, "u1") == 0
    later = iteration(input_tokens=1)  # 3 more
    await b.handle(later)

    assert b.stream.replays == 1
    after = await allowance.allowance(b.deps, "u1")
    assert after.tier == "pro"  # from the replayed BuildRequested
    assert after.spent_today_micro_usd == 4_500 + 3
    assert after.spent_month_micro_usd == 4_530 + 3
    assert after.topups_micro_usd == 7_000
    assert after.allowance_today_micro_usd == before.allowance_today_micro_usd
    assert await spending.spent_build(b.deps, "b1") == 4_533
    assert await spending.running_builds(b.deps, "u1") == {"b1"}
    # a redelivery of a replayed event, or of one charged after the rebuild, adds nothing
    for again in (charged[1], later):
        await b.handle(again)
    assert await spending.spent_today(b.deps, "u1") == 4_503
    assert b.commands.now == []  # a rebuild publishes nothing
    # a replayed top-up is not credited twice when it is redelivered
    await b.handle(topup("u1", "t1", 7_000))
    assert (await allowance.allowance(b.deps, "u1")).topups_micro_usd == 7_000


async def test_the_rebuild_restores_the_builds_asleep_so_a_top_up_still_wakes_them() -> None:
    b = budget(1_000)
    await b.handle(requested("b1", tier="free"))
    await b.handle(requested("b2", tier="free"))
    await b.handle(iteration(input_tokens=400))  # 1_200 of 1_000: both asleep
    assert await b.store.sleeping("u1") == {"b1", "b2"}
    await b.handle(BuildResumed(build_id="b2", user_id="u1", reason="woken by user"))
    b.commands.now.clear()

    b.store.lose_everything()
    await b.handle(topup("u1", "t9", 1))  # 1_001 of 1_203: still over
    wakes = [m for m in b.commands.now if isinstance(m, WakeRequested)]
    assert [w.build_id for w in wakes] == ["b1"]  # b2 had resumed
    # still over the allowance: b2 (resumed since) sleeps again; b1, asleep in this period at
    # its generation as the rebuild restored, does not get a second SleepRequested
    sleeps = [m.build_id for m in b.commands.now if isinstance(m, SleepRequested)]
    assert sleeps == ["b2"]


async def test_the_rebuild_keeps_a_continued_build_running() -> None:
    b = budget(None)
    await b.handle(requested("b1"))
    await b.handle(requested("b2"))
    for build_id in ("b1", "b2"):
        await b.handle(
            BuildCompleted(build_id=build_id, user_id="u1", summary="", iterations=1,
                           cost_micro_usd=0)
        )  # fmt: skip
    await b.handle(
        BuildContinued(build_id="b1", user_id="u1", continuation=1, after="completed",
                       message_id="m1", iterations=1, cost_micro_usd=0)
    )  # fmt: skip
    assert await spending.running_builds(b.deps, "u1") == {"b1"}
    b.store.lose_everything()
    await recovery.ensure_intact(b.deps)
    assert await spending.running_builds(b.deps, "u1") == {"b1"}


async def test_the_status_answer_rebuilds_a_lost_store_first() -> None:
    b = budget(None)
    await b.handle(requested("b1"))
    await b.handle(iteration(input_tokens=1000))
    b.store.lose_everything()
    request = BudgetStatusRequest(user_id="u1").model_dump_json().encode()
    reply = await app.status_responder(b.deps).answer(request)
    assert reply.ok and reply.status is not None
    assert (reply.status.tier, reply.status.spent_period_micro_usd) == ("pro", 3_000)
    bad = await app.status_responder(b.deps).answer(b'{"user_id": "a.b"}')
    assert isinstance(bad, BudgetStatusReply) and not bad.ok and "invalid" in bad.error


async def test_a_store_lost_again_during_the_rebuild_is_not_marked_intact() -> None:
    b = budget(None)
    await b.handle(requested("b1"))
    await b.handle(iteration(input_tokens=1000))
    await b.handle(iteration(input_tokens=2000))
    b.store.lose_everything()
    b.stream.during_replay.append(b.store.lose_everything)
    with pytest.raises(RetryLater):
        await recovery.ensure_intact(b.deps)
    assert not await b.store.intact()
    b.stream.during_replay.clear()
    await recovery.ensure_intact(b.deps)
    assert await spending.spent_today(b.deps, "u1") == 9_000


async def test_an_unknown_model_on_the_stream_is_charged_at_the_fallback_by_the_rebuild() -> None:
    b = budget(None)
    b.stream.messages += [iteration("gpt-x", input_tokens=1), iteration(input_tokens=1)]
    b.store.lose_everything()
    assert await recovery.rebuild(b.deps) == 2
    # as when it was first handled: claude-opus-4-1's $15 per Mtok input, then sonnet's $3
    assert await spending.spent_today(b.deps, "u1") == 15 + 3


async def test_without_the_stream_a_lost_store_cannot_charge() -> None:
    store = FakeStore(marked_intact=False)
    deps = Deps(store=store, clock=FixedClock(NOW), config=kiln_config.default())
    with pytest.raises(RuntimeError, match="History"):
        await recovery.guarded(deps, spending.charge_iteration, iteration(input_tokens=1))
    assert store.charged == set()
