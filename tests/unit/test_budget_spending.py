"""The budget's domain with an in-memory store: pricing, rounding, charge-once, running builds,
sleep, wake and top-ups, and the rebuild of a store that has lost its data."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kiln_budget import allowance, app, spending
from kiln_budget.deps import Deps
from kiln_budget.periods import ShortCalendar, UtcCalendar, rfc3339
from kiln_budget.ports import Charge, SpendLost, TopUpState
from kiln_contracts import (
    BudgetGate,
    BuildCancelled,
    BuildCompleted,
    BuildContinued,
    BuildFailed,
    BuildRequested,
    BuildResumed,
    Envelope,
    IterationCompleted,
    SleepRequested,
    TopUpRequested,
    Usage,
    WakeRequested,
)
from kiln_runtime import config as kiln_config
from kiln_runtime import metrics
from kiln_runtime.config import KilnConfig, ModelSpec, Price


@dataclass
class FakeStore:
    charged: set[uuid.UUID] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)
    running_sets: dict[str, set[str]] = field(default_factory=dict)
    ended: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, str] = field(default_factory=dict)
    topup_list: dict[str, dict[str, tuple[int, datetime]]] = field(default_factory=dict)
    generations: dict[str, str] = field(default_factory=dict)
    slept_marks: dict[tuple[str, str], str] = field(default_factory=dict)
    sleeping_sets: dict[str, set[str]] = field(default_factory=dict)
    topup_states: dict[tuple[str, str], TopUpState] = field(default_factory=dict)
    marked_intact: bool = True
    rebuilds: set[str] = field(default_factory=set)

    def lose_everything(self) -> None:
        """What a FLUSHALL does to Redis."""
        fresh = FakeStore(marked_intact=False)
        self.__dict__.update(fresh.__dict__)

    async def set_tier(self, user_id: str, tier: str) -> None:
        self.tiers[user_id] = tier

    async def tier(self, user_id: str) -> str | None:
        return self.tiers.get(user_id)

    def _add(self, key: str, amount: int) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    async def charge(self, charge: Charge, *, replay: bool = False) -> bool:
        await asyncio.sleep(0)  # let concurrent callers interleave
        if not replay and not self.marked_intact:
            raise SpendLost("lost")
        if charge.event_id in self.charged:
            return False
        self.charged.add(charge.event_id)
        self._add(f"day:{charge.user_id}:{charge.period}", charge.amount_micro_usd)
        self._add(f"month:{charge.user_id}:{charge.cycle}", charge.amount_micro_usd)
        self._add(f"build:{charge.build_id}", charge.amount_micro_usd)
        return True

    async def user_day(self, user_id: str, period: str) -> int:
        return self.counters.get(f"day:{user_id}:{period}", 0)

    async def user_month(self, user_id: str, cycle: str) -> int:
        return self.counters.get(f"month:{user_id}:{cycle}", 0)

    async def build(self, build_id: str) -> int:
        return self.counters.get(f"build:{build_id}", 0)

    async def build_started(self, user_id: str, build_id: str) -> bool:
        if self.ended.get(build_id, 0) > self.runs.get(build_id, 0):
            return False
        running = self.running_sets.setdefault(user_id, set())
        added = build_id not in running
        running.add(build_id)
        return added

    async def build_ended(self, user_id: str, build_id: str, continuation: int = 0) -> None:
        self.ended[build_id] = max(self.ended.get(build_id, 0), continuation + 1)
        if continuation < self.runs.get(build_id, 0):
            return  # the end of a run the build has continued from
        self.running_sets.setdefault(user_id, set()).discard(build_id)
        self.sleeping_sets.setdefault(user_id, set()).discard(build_id)

    async def build_continued(self, user_id: str, build_id: str, continuation: int) -> bool:
        if continuation <= self.runs.get(build_id, 0):
            return False
        self.runs[build_id] = continuation
        if self.ended.get(build_id, 0) > continuation:
            return False
        running = self.running_sets.setdefault(user_id, set())
        added = build_id not in running
        running.add(build_id)
        return added

    async def running(self, user_id: str) -> set[str]:
        return set(self.running_sets.get(user_id, set()))

    async def add_topup(
        self, user_id: str, topup_id: str, amount: int, at: datetime, *, replay: bool = False
    ) -> TopUpState:
        if not replay and not self.marked_intact:
            raise SpendLost("lost")
        if (user_id, topup_id) in self.topup_states:
            return self.topup_states[(user_id, topup_id)]
        self.topup_states[(user_id, topup_id)] = "credited"
        self.topup_list.setdefault(user_id, {})[topup_id] = (amount, at)
        return "new"

    async def topup_woken(self, user_id: str, topup_id: str) -> None:
        self.topup_states[(user_id, topup_id)] = "woken"

    async def topups(self, user_id: str, since: datetime, until: datetime) -> int:
        made = self.topup_list.get(user_id, {}).values()
        return sum(amount for amount, at in made if since <= at < until)

    async def wake_generation(self, build_id: str) -> str:
        return self.generations.get(build_id, "0")

    async def slept(self, build_id: str, period: str) -> str | None:
        return self.slept_marks.get((build_id, period))

    async def mark_slept(
        self, user_id: str, build_id: str, period: str, generation: str, ttl_s: int
    ) -> None:
        self.slept_marks[(build_id, period)] = generation
        self.sleeping_sets.setdefault(user_id, set()).add(build_id)

    async def resumed(self, user_id: str, build_id: str, generation: str) -> None:
        if self.generations.get(build_id) == generation:
            return
        self.generations[build_id] = generation
        self.sleeping_sets.setdefault(user_id, set()).discard(build_id)

    async def sleeping(self, user_id: str) -> set[str]:
        return set(self.sleeping_sets.get(user_id, set()))

    async def intact(self) -> bool:
        return self.marked_intact

    async def begin_rebuild(self) -> str:
        token = uuid.uuid4().hex
        self.rebuilds.add(token)
        return token

    async def finish_rebuild(self, token: str) -> bool:
        if token not in self.rebuilds:
            return False
        self.rebuilds.discard(token)
        self.marked_intact = True
        return True


@dataclass
class FakeCommands:
    now: list[Envelope] = field(default_factory=list)
    scheduled: dict[tuple[str, str], tuple[Envelope, datetime]] = field(default_factory=dict)

    async def publish(self, msg: Envelope) -> None:
        self.now.append(msg)

    async def publish_at(self, msg: Envelope, at: datetime, name: str) -> None:
        self.scheduled[(msg.build_id, name)] = (msg, at)


@dataclass
class FixedClock:
    at: datetime

    def now(self) -> datetime:
        return self.at


NOW = datetime(2025, 3, 31, 23, 30, tzinfo=UTC)


@pytest.fixture
def deps() -> Deps:
    return Deps(store=FakeStore(), clock=FixedClock(NOW), config=kiln_config.default())


def iteration(model: str = "claude-sonnet-4-5", **usage: int) -> IterationCompleted:
    return IterationCompleted(
        build_id="b1",
        user_id="u1",
        iteration=1,
        model=model,
        usage=Usage(**usage),
        stop_reason="tool_use",
        occurred_at=NOW,
    )


def test_price_of_every_token_kind() -> None:
    # sonnet: $3 in, $15 out, $3.75 cache write, $0.30 cache read per Mtok = micro-USD per token
    event = iteration(
        input_tokens=100,
        output_tokens=10,
        cache_creation_input_tokens=4,
        cache_read_input_tokens=10,
    )
    assert spending.cost_of(kiln_config.default(), event) == 300 + 150 + 15 + 3


def test_fractions_are_rounded_up_once_over_the_sum() -> None:
    config = kiln_config.default()
    # haiku cache read is $0.10/Mtok: 3 tokens = 0.3 micro-USD -> 1; 10 tokens = exactly 1
    assert spending.cost_of(config, iteration("claude-haiku-4-5", cache_read_input_tokens=3)) == 1
    assert spending.cost_of(config, iteration("claude-haiku-4-5", cache_read_input_tokens=10)) == 1
    # 0.5 + 0.5 sums to 1 (not 2, as rounding each part would give)
    price = Price(
        since=date(2025, 1, 1),
        input=Decimal("0.5"),
        output=Decimal("0.5"),
        cache_write_5m=Decimal(0),
        cache_write_1h=Decimal(0),
        cache_read=Decimal(0),
    )
    spec = ModelSpec(context_window=1000, max_output_tokens=10, thinking="none", prices=[price])
    custom = KilnConfig(tiers={}, models={"m": spec})
    assert spending.cost_of(custom, iteration("m", input_tokens=1, output_tokens=1)) == 1
    assert spending.cost_of(config, iteration()) == 0


def test_large_usage_is_exact() -> None:
    # 1M opus output tokens at $75/Mtok = $75
    event = iteration("claude-opus-4-1", output_tokens=1_000_000)
    assert spending.cost_of(kiln_config.default(), event) == 75_000_000


async def test_an_unknown_model_is_charged_at_the_fallback_and_counted_once(
    deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    config = deps.config
    before = metrics.UNPRICED_ITERATIONS.labels("budget", "gpt-x")._value.get()
    event = iteration("gpt-x", input_tokens=10, output_tokens=10)
    # the most expensive model of the table: claude-opus-4-1 at $15 / $75 per Mtok
    assert config.fallback_model == "claude-opus-4-1"
    assert spending.cost_of(config, event) == 150 + 750
    with caplog.at_level(logging.ERROR):
        first = await spending.charge_iteration(deps, event)
        again = await spending.charge_iteration(deps, event)  # a redelivery: not charged again
    assert (first.applied, first.amount_micro_usd, again.applied) == (True, 150 + 750, False)
    assert metrics.UNPRICED_ITERATIONS.labels("budget", "gpt-x")._value.get() == before + 1
    assert caplog.text.count("no price for model 'gpt-x'") == 1


async def test_an_unknown_model_is_never_free(deps: Deps) -> None:
    charged = await spending.charge_iteration(deps, iteration("gpt-x", input_tokens=1))
    assert charged.applied and charged.amount_micro_usd == 15
    assert await spending.spent_build(deps, "b1") == 15


def test_a_dated_snapshot_id_is_priced_as_its_model() -> None:
    config = kiln_config.default()
    event = iteration("claude-haiku-4-5-20251001", input_tokens=1000)
    assert spending.cost_of(config, event) == 1000  # $1 per Mtok
    assert config.resolve("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"


async def test_charged_once_per_event(deps: Deps) -> None:
    event = iteration(input_tokens=1000)
    first = await spending.charge_iteration(deps, event)
    again = await spending.charge_iteration(deps, event)
    assert (first.amount_micro_usd, first.applied) == (3000, True)
    assert (again.amount_micro_usd, again.applied) == (3000, False)
    assert await spending.spent_build(deps, "b1") == 3000
    assert await spending.spent_today(deps, "u1") == 3000
    assert await spending.spent_this_month(deps, "u1") == 3000
    # another iteration (another event) adds up
    await spending.charge_iteration(deps, iteration(output_tokens=100))
    assert await spending.spent_build(deps, "b1") == 4500


async def test_concurrent_charges_of_one_event_apply_once(deps: Deps) -> None:
    event = iteration(input_tokens=10)
    results = await asyncio.gather(*(spending.charge_iteration(deps, event) for _ in range(5)))
    assert sum(r.applied for r in results) == 1
    assert await spending.spent_build(deps, "b1") == 30


async def test_the_day_is_the_events_utc_day_not_the_clocks(deps: Deps) -> None:
    # 00:30 on April 1st at UTC+2 is 22:30 on March 31st UTC
    local = datetime(2025, 4, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    event = iteration(input_tokens=1).model_copy(update={"occurred_at": local})
    await spending.charge_iteration(deps, event)
    assert await deps.store.user_day("u1", "2025-03-31") == 3
    assert await deps.store.user_month("u1", "2025-03") == 3
    assert await deps.store.user_month("u1", "2025-04") == 0
    # the clock decides what "today" means for reads
    later = Deps(deps.store, FixedClock(NOW + timedelta(hours=1)), deps.config)
    assert await spending.spent_today(later, "u1") == 0
    assert await spending.spent_today(deps, "u1") == 3


async def test_running_builds_follow_start_and_end(deps: Deps) -> None:
    started = [BuildRequested(build_id=f"b{i}", user_id="u1", idea_brief="x") for i in range(4)]
    for event in started:
        await spending.build_started(deps, event)
        await spending.build_started(deps, event)  # redelivered
    assert await spending.running_builds(deps, "u1") == {"b0", "b1", "b2", "b3"}
    await spending.build_ended(
        deps,
        BuildCompleted(build_id="b0", user_id="u1", summary="", iterations=1, cost_micro_usd=0),
    )
    await spending.build_ended(
        deps,
        BuildFailed(build_id="b1", user_id="u1", reason="internal", iterations=1, cost_micro_usd=0),
    )
    await spending.build_ended(
        deps, BuildCancelled(build_id="b2", user_id="u1", reason="", iterations=1, cost_micro_usd=0)
    )
    assert await spending.running_builds(deps, "u1") == {"b3"}
    # a BuildRequested redelivered after the build ended does not bring it back
    await spending.build_started(deps, started[0])
    assert await spending.running_builds(deps, "u1") == {"b3"}


def continued(build_id: str, k: int, after: str = "completed") -> BuildContinued:
    return BuildContinued(
        build_id=build_id,
        user_id="u1",
        continuation=k,
        after=after,  # type: ignore[arg-type]
        message_id=f"m{k}",
        iterations=1,
        cost_micro_usd=0,
    )


def completed(build_id: str, k: int = 0) -> BuildCompleted:
    return BuildCompleted(
        build_id=build_id, user_id="u1", summary="", iterations=1, cost_micro_usd=0, continuation=k
    )


async def test_a_continued_build_runs_again_once_per_run_whatever_the_order(deps: Deps) -> None:
    await spending.build_started(deps, BuildRequested(build_id="b1", user_id="u1", idea_brief="x"))
    await spending.build_ended(deps, completed("b1"))
    assert await spending.running_builds(deps, "u1") == set()
    await spending.build_continued(deps, continued("b1", 1))
    await spending.build_continued(deps, continued("b1", 1))  # delivered twice: one effect
    assert await spending.running_builds(deps, "u1") == {"b1"}
    # the first run's end delivered again, after the continuation: it stays running
    await spending.build_ended(deps, completed("b1"))
    assert await spending.running_builds(deps, "u1") == {"b1"}
    await spending.build_ended(deps, completed("b1", 1))
    assert await spending.running_builds(deps, "u1") == set()
    # a continuation handled after the end of its own run does not bring it back
    await spending.build_ended(deps, completed("b1", 2))
    await spending.build_continued(deps, continued("b1", 2))
    assert await spending.running_builds(deps, "u1") == set()
    # nor does the first run's BuildRequested redelivered
    await spending.build_started(deps, BuildRequested(build_id="b1", user_id="u1", idea_brief="x"))
    assert await spending.running_builds(deps, "u1") == set()


def test_register_consumes_each_kind_once(deps: Deps) -> None:
    class RecordingBus:
        def __init__(self) -> None:
            self.kinds: list[str] = []

        def consume(self, model: type, handler: object, *, max_workers: int = 1) -> None:
            self.kinds.append(model.kind)  # type: ignore[attr-defined]

    bus = RecordingBus()
    app.register(bus, deps)  # type: ignore[arg-type]
    assert sorted(bus.kinds) == [
        "build_cancelled",
        "build_completed",
        "build_continued",
        "build_failed",
        "build_rejected",
        "build_requested",
        "build_resumed",
        "iteration_completed",
        "top_up_requested",
    ]


def days_left(day: date) -> int:
    return UtcCalendar().period(datetime(day.year, day.month, day.day, 12, tzinfo=UTC)).days_left


def test_daily_allowance_spreads_what_is_left_over_the_days_left() -> None:
    # $5 on March 1st: 31 days left
    assert allowance.daily_allowance(5_000_000, 0, days_left(date(2025, 3, 1))) == 161_290
    # March 31st: the whole rest is today's
    assert (
        allowance.daily_allowance(5_000_000, 4_000_000, days_left(date(2025, 3, 31))) == 1_000_000
    )
    # unspent budget rolls forward: nothing spent by the 16th of a 30-day month -> 5M / 15
    assert allowance.daily_allowance(5_000_000, 0, days_left(date(2025, 4, 16))) == 333_333
    # overspent: nothing left, never negative
    assert allowance.daily_allowance(5_000_000, 6_000_000, days_left(date(2025, 4, 16))) == 0
    # February in a leap year has 29 days
    assert allowance.daily_allowance(29, 0, days_left(date(2024, 2, 1))) == 1


async def test_allowance_uses_the_users_tier_and_todays_spend(deps: Deps) -> None:
    # NOW is March 31st: the allowance is the whole month's remainder
    await spending.build_started(
        deps, BuildRequested(build_id="b9", user_id="u1", idea_brief="x", tier="pro")
    )
    earlier = iteration(output_tokens=200_000).model_copy(
        update={"occurred_at": NOW - timedelta(days=3)}
    )
    await spending.charge_iteration(deps, earlier)  # $3 on March 28th
    await spending.charge_iteration(deps, iteration(output_tokens=1_000_000))  # $15 today
    status = await allowance.allowance(deps, "u1")
    assert status.tier == "pro"
    assert status.spent_month_micro_usd == 18_000_000
    assert status.spent_today_micro_usd == 15_000_000
    assert status.allowance_today_micro_usd == 97_000_000
    assert status.remaining_today_micro_usd == 82_000_000 and not status.exhausted
    free = await allowance.allowance(deps, "u1", tier="free")
    assert free.allowance_today_micro_usd == 2_000_000 and free.exhausted
    assert free.remaining_today_micro_usd == 0
    assert (await allowance.allowance(deps, "nobody")).tier == "free"


# ------------------------------------------------------------------------------ periods


def test_utc_calendar_days_in_months() -> None:
    p = UtcCalendar().period(datetime(2024, 2, 28, 23, 59, tzinfo=UTC))
    assert (p.key, p.cycle, p.days_left) == ("2024-02-28", "2024-02", 2)
    assert p.end == datetime(2024, 2, 29, tzinfo=UTC)
    assert p.cycle_end == datetime(2024, 3, 1, tzinfo=UTC)
    # a moment in another zone is placed by its UTC time
    local = datetime(2025, 4, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert UtcCalendar().period(local).key == "2025-03-31"


def test_short_calendar_shrinks_a_day_to_seconds() -> None:
    cal = ShortCalendar(period_s=2, periods_per_cycle=3)
    p = cal.period(datetime.fromtimestamp(7.5, UTC))  # period 3 = the first of cycle 1
    assert (p.key, p.cycle, p.days_left) == ("p3", "c1", 3)
    assert (p.start.timestamp(), p.end.timestamp()) == (6, 8)
    assert (p.cycle_start.timestamp(), p.cycle_end.timestamp()) == (6, 12)
    assert cal.period(datetime.fromtimestamp(11.9, UTC)).days_left == 1
    with pytest.raises(ValueError):
        ShortCalendar(period_s=0)


def test_rfc3339_never_fires_early() -> None:
    assert rfc3339(datetime(2025, 3, 31, 23, 59, 59, 1, tzinfo=UTC)) == "2025-04-01T00:00:00Z"
    assert rfc3339(datetime(2025, 3, 31, tzinfo=UTC)) == "2025-03-31T00:00:00Z"


# ------------------------------------------------------------------------------ sleep and wake


def sleepy(allowance_micro_usd: int | None = 1_000) -> tuple[Deps, FakeCommands]:
    commands = FakeCommands()
    deps = Deps(
        store=FakeStore(),
        clock=FixedClock(NOW),
        config=kiln_config.default(),
        commands=commands,
        demo_allowance_micro_usd=allowance_micro_usd,
    )
    return deps, commands


def topup(user_id: str, topup_id: str, amount_micro_usd: int) -> TopUpRequested:
    """A top-up requested now (by the tests' clock)."""
    command = TopUpRequested.of(user_id, topup_id, amount_micro_usd)
    return command.model_copy(update={"occurred_at": NOW})


async def start(deps: Deps, *builds: str, tier: str = "free") -> None:
    for b in builds:
        await spending.build_started(
            deps, BuildRequested(build_id=b, user_id="u1", idea_brief="x", tier=tier)
        )


async def test_below_the_allowance_nothing_sleeps() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1")
    assert await spending.iteration_completed(d, iteration(input_tokens=100)) == []  # 300
    assert commands.now == [] and commands.scheduled == {}
    assert (await allowance.allowance(d, "u1")).remaining_today_micro_usd == 700


async def test_at_the_allowance_every_running_build_sleeps_once_until_the_reset() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1", "b2")
    event = iteration(input_tokens=400)  # 1_200 micro-USD
    assert await spending.iteration_completed(d, event) == ["b1", "b2"]
    sleeps = [m for m in commands.now if isinstance(m, SleepRequested)]
    assert [s.build_id for s in sleeps] == ["b1", "b2"]
    reset = datetime(2025, 4, 1, tzinfo=UTC)
    assert all(s.wake_at == reset and s.causation_id == event.event_id for s in sleeps)
    assert "daily allowance used up" in sleeps[0].reason
    for b in ("b1", "b2"):
        wake, at = commands.scheduled[(b, "budget-wake")]
        assert isinstance(wake, WakeRequested) and at == reset
    # the same event again, and another one: nothing more (once per build and period)
    assert await spending.iteration_completed(d, event) == []
    assert await spending.iteration_completed(d, iteration(input_tokens=1)) == []
    assert len(commands.now) == 2
    assert await d.store.sleeping("u1") == {"b1", "b2"}


async def test_a_woken_build_over_the_allowance_sleeps_again_at_once() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))
    resumed = BuildResumed(build_id="b1", user_id="u1", reason="woken by user")
    await spending.build_woken(d, resumed)
    await spending.build_woken(d, resumed)  # redelivered: the same wake generation
    # asleep again without another iteration (the agent, behind the closed gate, calls no model)
    assert await d.store.sleeping("u1") == {"b1"}
    first, second = (m for m in commands.now if isinstance(m, SleepRequested))
    assert first.event_id != second.event_id and second.causation_id == resumed.event_id
    assert await spending.iteration_completed(d, iteration(input_tokens=1)) == []


async def test_a_continued_build_over_the_allowance_sleeps_again() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))  # slept this period
    await spending.build_ended(d, completed("b1"))
    await spending.build_continued(d, continued("b1", 1))
    assert await spending.iteration_completed(d, iteration(input_tokens=1)) == ["b1"]
    assert len([m for m in commands.now if isinstance(m, SleepRequested)]) == 2


async def test_a_top_up_wakes_the_sleeping_builds_and_raises_the_allowance() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1", "b2")
    await spending.iteration_completed(d, iteration(input_tokens=400))  # 1_200 of 1_000
    await spending.build_ended(
        d, BuildCancelled(build_id="b2", user_id="u1", reason="", iterations=1, cost_micro_usd=0)
    )
    command = topup("u1", "t1", 5_000)
    woken = await allowance.top_up(d, command)
    assert woken == {"b1"}
    wakes = [m for m in commands.now if isinstance(m, WakeRequested)]
    assert [(w.build_id, w.reason, w.causation_id) for w in wakes] == [
        ("b1", "top-up", command.event_id)
    ]
    status = await allowance.allowance(d, "u1")
    assert status.allowance_today_micro_usd == 6_000 and not status.exhausted


async def test_a_top_up_delivered_twice_is_applied_once() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))  # asleep
    command = topup("u1", "t1", 5_000)
    assert await allowance.top_up(d, command) == {"b1"}
    sent = list(commands.now)
    # the same message again, and the same top-up id under another event id and amount
    assert await allowance.top_up(d, command) == set()
    again = topup("u1", "t1", 9_000).with_id(uuid.uuid4())
    assert await allowance.top_up(d, again) == set()
    assert commands.now == sent
    assert (await allowance.allowance(d, "u1")).allowance_today_micro_usd == 6_000
    # another user's top-up of the same id is another top-up
    assert await allowance.top_up(d, topup("u2", "t1", 1)) == set()
    assert await d.store.topups("u2", NOW - timedelta(days=1), NOW + timedelta(days=1)) == 1


async def test_a_top_up_credited_before_a_crash_sends_its_wakes_when_redelivered() -> None:
    d, commands = sleepy(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))
    command = topup("u1", "t1", 5_000)
    # credited, then the service died before it sent the wakes
    await d.store.add_topup("u1", "t1", 5_000, command.occurred_at)
    assert await allowance.top_up(d, command) == {"b1"}
    assert [m.build_id for m in commands.now if isinstance(m, WakeRequested)] == ["b1"]
    assert (await allowance.allowance(d, "u1")).allowance_today_micro_usd == 6_000


async def test_a_top_up_spreads_over_the_cycle_from_the_next_day() -> None:
    d, _ = sleepy(None)
    await d.store.add_topup("u1", "t1", 31_000, NOW - timedelta(days=30))  # March 1st
    # free tier: $5 + 0.031 over the 1 day left (March 31st)
    assert (await allowance.allowance(d, "u1")).allowance_today_micro_usd == 5_031_000


async def test_when_the_cycle_is_spent_the_wake_is_at_the_next_cycle() -> None:
    d, commands = sleepy(None)
    mid = datetime(2025, 3, 10, 12, tzinfo=UTC)
    d = Deps(d.store, FixedClock(mid), d.config, commands=commands)
    await start(d, "b1")
    big = iteration("claude-haiku-4-5", output_tokens=1_000_000).model_copy(
        update={"occurred_at": mid}
    )  # $5: the free tier's month
    assert await spending.iteration_completed(d, big) == ["b1"]
    (sleep,) = commands.now
    assert isinstance(sleep, SleepRequested) and "monthly budget used up" in sleep.reason
    assert sleep.wake_at == datetime(2025, 4, 1, tzinfo=UTC)


async def test_the_per_build_cap_is_not_the_budgets_business() -> None:
    # The agent ends a build over its cap (BuildFailed cost_limit); the budget only counts.
    d, commands = sleepy(10**9)
    await start(d, "b1")
    over_cap = iteration("claude-haiku-4-5", output_tokens=300_000)  # $1.50 > free's $1 cap
    assert await spending.iteration_completed(d, over_cap) == []
    assert commands.now == [] and await spending.spent_build(d, "b1") == 1_500_000


# ------------------------------------------------------------------------------ the gates


@dataclass
class FakeGates:
    """The gates' bucket; ``log`` (shared with the commands) records the order of writes."""

    log: list[str]
    values: dict[str, tuple[BudgetGate, int]] = field(default_factory=dict)
    revision: int = 0
    interfere: list[BudgetGate] = field(default_factory=list)  # written by "another replica"

    async def read(self, user_id: str) -> tuple[BudgetGate | None, int]:
        gate, revision = self.values.get(user_id, (None, 0))
        if self.interfere:  # someone writes between this read and the next write
            self._put(self.interfere.pop(0))
        return gate, revision

    def _put(self, gate: BudgetGate) -> None:
        self.revision += 1
        self.values[gate.user_id] = (gate, self.revision)

    async def write(self, gate: BudgetGate, revision: int) -> bool:
        if self.values.get(gate.user_id, (None, 0))[1] != revision:
            return False
        self._put(gate)
        self.log.append(f"gate {gate.state}")
        return True

    def of(self, user_id: str) -> BudgetGate | None:
        return self.values.get(user_id, (None, 0))[0]


@dataclass
class LoggedCommands(FakeCommands):
    log: list[str] = field(default_factory=list)

    async def publish(self, msg: Envelope) -> None:
        self.log.append(f"{msg.kind} {msg.build_id}")
        await super().publish(msg)


def gated(allowance_micro_usd: int = 1_000) -> tuple[Deps, LoggedCommands, FakeGates]:
    commands = LoggedCommands()
    gates = FakeGates(commands.log)
    deps = Deps(
        store=FakeStore(),
        clock=FixedClock(NOW),
        config=kiln_config.default(),
        commands=commands,
        demo_allowance_micro_usd=allowance_micro_usd,
        gates=gates,
    )
    return deps, commands, gates


async def test_the_gate_closes_at_the_allowance_before_any_sleep_is_requested() -> None:
    d, commands, gates = gated(1_000)
    await start(d, "b1", "b2")
    await spending.iteration_completed(d, iteration(input_tokens=100))  # 300 of 1_000
    assert gates.of("u1") is None and commands.log == []  # open: never written
    await spending.iteration_completed(d, iteration(input_tokens=400))  # 1_500
    assert commands.log == ["gate closed", "sleep_requested b1", "sleep_requested b2"]
    gate = gates.of("u1")
    assert (
        gate is not None and gate.closed_at(NOW) and gate.until == datetime(2025, 4, 1, tzinfo=UTC)
    )
    assert (gate.spent_micro_usd, gate.allowance_micro_usd) == (1_500, 1_000)
    sleep = commands.now[0]
    assert isinstance(sleep, SleepRequested) and sleep.reason == gate.sleep_reason
    # a straggler's charge keeps it closed with the newer figures; no second sleep
    await spending.iteration_completed(d, iteration(input_tokens=1))
    assert gates.of("u1").spent_micro_usd == 1_503  # type: ignore[union-attr]
    assert len(commands.now) == 2


async def test_a_top_up_opens_the_gate_before_it_wakes_the_builds() -> None:
    d, commands, gates = gated(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))  # 1_200 of 1_000
    commands.log.clear()
    await allowance.top_up(d, topup("u1", "small", 100))  # 1_100: still used up
    assert gates.of("u1").state == "closed"  # type: ignore[union-attr]
    commands.log.clear()
    assert await allowance.top_up(d, topup("u1", "t1", 5_000)) == {"b1"}
    assert commands.log == ["gate open", "wake_requested b1"]
    assert not gates.of("u1").closed_at(NOW)  # type: ignore[union-attr]


async def test_a_charge_computed_on_figures_older_than_a_top_up_does_not_close_the_gate() -> None:
    d, _, gates = gated(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))  # closed
    # while the next charge computes, a top-up lands and opens the gate (another replica)
    await d.store.add_topup("u1", "t1", 5_000, NOW)
    gates.interfere.append(BudgetGate.opened("u1"))
    await spending.iteration_completed(d, iteration(input_tokens=1))
    # recomputed on the newer figures: left open
    assert gates.of("u1").state == "open"  # type: ignore[union-attr]


async def test_a_build_started_while_the_allowance_is_used_up_sleeps_at_once() -> None:
    d, commands, _ = gated(1_000)
    await start(d, "b1")
    await spending.iteration_completed(d, iteration(input_tokens=400))
    # the agent may have started b2 on a gate it saw open a moment before: its wake is scheduled
    await spending.build_requested(
        d, BuildRequested(build_id="b2", user_id="u1", idea_brief="x", tier="free")
    )
    assert ("b2", "budget-wake") in commands.scheduled
    assert [m.build_id for m in commands.now if isinstance(m, SleepRequested)] == ["b1", "b2"]
    assert await d.store.sleeping("u1") == {"b1", "b2"}
