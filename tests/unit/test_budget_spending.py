"""The budget's domain with an in-memory store: pricing, rounding, charge-once, running builds."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kiln_budget import app, spending
from kiln_budget.ports import Charge
from kiln_budget.spending import Deps
from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    IterationCompleted,
    Usage,
)
from kiln_runtime import config as kiln_config
from kiln_runtime.config import KilnConfig, Price
from kiln_runtime.errors import PermanentError


@dataclass
class FakeStore:
    charged: set[uuid.UUID] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)
    running_sets: dict[str, set[str]] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    tiers: dict[str, str] = field(default_factory=dict)

    async def set_tier(self, user_id: str, tier: str) -> None:
        self.tiers[user_id] = tier

    async def tier(self, user_id: str) -> str | None:
        return self.tiers.get(user_id)

    def _add(self, key: str, amount: int) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    async def charge(self, charge: Charge) -> bool:
        await asyncio.sleep(0)  # let concurrent callers interleave
        if charge.event_id in self.charged:
            return False
        self.charged.add(charge.event_id)
        d = charge.day
        self._add(f"day:{charge.user_id}:{d}", charge.amount_micro_usd)
        self._add(f"month:{charge.user_id}:{d.year}-{d.month}", charge.amount_micro_usd)
        self._add(f"build:{charge.build_id}", charge.amount_micro_usd)
        return True

    async def user_day(self, user_id: str, day: date) -> int:
        return self.counters.get(f"day:{user_id}:{day}", 0)

    async def user_month(self, user_id: str, year: int, month: int) -> int:
        return self.counters.get(f"month:{user_id}:{year}-{month}", 0)

    async def build(self, build_id: str) -> int:
        return self.counters.get(f"build:{build_id}", 0)

    async def build_started(self, user_id: str, build_id: str) -> bool:
        if build_id in self.ended:
            return False
        running = self.running_sets.setdefault(user_id, set())
        added = build_id not in running
        running.add(build_id)
        return added

    async def build_ended(self, user_id: str, build_id: str) -> None:
        self.ended.add(build_id)
        self.running_sets.setdefault(user_id, set()).discard(build_id)

    async def running(self, user_id: str) -> set[str]:
        return set(self.running_sets.get(user_id, set()))


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
        input=Decimal("0.5"),
        output=Decimal("0.5"),
        cache_write=Decimal(0),
        cache_read=Decimal(0),
    )
    custom = KilnConfig(tiers={}, prices={"m": price})
    assert spending.cost_of(custom, iteration("m", input_tokens=1, output_tokens=1)) == 1
    assert spending.cost_of(config, iteration()) == 0


def test_large_usage_is_exact() -> None:
    # 1M opus output tokens at $75/Mtok = $75
    event = iteration("claude-opus-4-1", output_tokens=1_000_000)
    assert spending.cost_of(kiln_config.default(), event) == 75_000_000


def test_unknown_model_is_a_permanent_error_with_the_reason() -> None:
    with pytest.raises(PermanentError, match="no price for model 'gpt-x'"):
        spending.cost_of(kiln_config.default(), iteration("gpt-x", input_tokens=1))


async def test_unknown_model_charges_nothing(deps: Deps) -> None:
    with pytest.raises(PermanentError):
        await spending.charge_iteration(deps, iteration("gpt-x", input_tokens=1))
    assert await spending.spent_build(deps, "b1") == 0


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
    assert await deps.store.user_day("u1", date(2025, 3, 31)) == 3
    assert await deps.store.user_month("u1", 2025, 3) == 3
    assert await deps.store.user_month("u1", 2025, 4) == 0
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
        "build_failed",
        "build_requested",
        "iteration_completed",
    ]


def test_daily_allowance_spreads_what_is_left_over_the_days_left() -> None:
    # $5 on March 1st: 31 days left
    assert spending.daily_allowance(5_000_000, 0, date(2025, 3, 1)) == 161_290
    # March 31st: the whole rest is today's
    assert spending.daily_allowance(5_000_000, 4_000_000, date(2025, 3, 31)) == 1_000_000
    # unspent budget rolls forward: nothing spent by the 16th of a 30-day month -> 5M / 15
    assert spending.daily_allowance(5_000_000, 0, date(2025, 4, 16)) == 333_333
    # overspent: nothing left, never negative
    assert spending.daily_allowance(5_000_000, 6_000_000, date(2025, 4, 16)) == 0
    # February in a leap year has 29 days
    assert spending.daily_allowance(29, 0, date(2024, 2, 1)) == 1


async def test_allowance_uses_the_users_tier_and_todays_spend(deps: Deps) -> None:
    # NOW is March 31st: the allowance is the whole month's remainder
    await spending.build_started(
        deps, BuildRequested(build_id="b9", user_id="u1", idea_brief="x", tier="pro")
    )
    earlier = iteration(input_tokens=1_000_000).model_copy(
        update={"occurred_at": NOW - timedelta(days=3)}
    )
    await spending.charge_iteration(deps, earlier)  # $3 on March 28th
    await spending.charge_iteration(deps, iteration(output_tokens=1_000_000))  # $15 today
    status = await spending.allowance(deps, "u1")
    assert status.tier == "pro"
    assert status.spent_month_micro_usd == 18_000_000
    assert status.spent_today_micro_usd == 15_000_000
    assert status.allowance_today_micro_usd == 97_000_000
    assert status.remaining_today_micro_usd == 82_000_000 and not status.exhausted
    free = await spending.allowance(deps, "u1", tier="free")
    assert free.allowance_today_micro_usd == 2_000_000 and free.exhausted
    assert free.remaining_today_micro_usd == 0
    assert (await spending.allowance(deps, "nobody")).tier == "free"
