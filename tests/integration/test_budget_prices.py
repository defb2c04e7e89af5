"""Prices on real NATS and Redis: the budget charges what the Messages API answers with — a dated
snapshot id as its model, a model with no price at the fallback's prices (never free, never
dead-lettered) — at the price in force when the call was made."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from nats.aio.client import Client

from kiln_budget import bootstrap, recovery, spending
from kiln_budget.deps import Deps
from kiln_contracts import IterationCompleted, Usage
from tests.integration.test_budget_sleep import (  # noqa: F401  (nc: a fixture)
    FixedClock,
    later,
    nc,
    started,
    stopped,
    until,
)

pytestmark = pytest.mark.integration


def iteration(uid: str, n: int, model: str, at: datetime, **usage: int) -> IterationCompleted:
    return IterationCompleted(
        build_id=f"p{n}{uid}",
        user_id=f"u{uid}",
        iteration=1,
        model=model,
        usage=Usage(**usage),
        stop_reason="tool_use",
        occurred_at=at,
    )


async def test_dated_ids_unknown_models_and_dated_prices_are_charged(
    infra: dict[str, str],
    nc: Client,  # noqa: F811
    uid: str,
) -> None:
    # the budget's periods are seconds long: its clock stands still at the moment the events are
    # dated, so the day they are charged to is the day that is read back however slow the run
    now = later()
    budget = await started(infra, f"budget-{uid}", FixedClock(now))
    try:
        await _charged_at_their_prices(budget, uid, now)
    finally:
        await stopped(budget)


async def _charged_at_their_prices(budget: bootstrap.Wiring, uid: str, now: datetime) -> None:
    deps = budget.deps
    await recovery.ensure_intact(deps)  # a fresh Redis: rebuilt first, so the events are live
    events = [
        # an alias answered with its dated snapshot: Haiku 4.5 at $1 per Mtok input
        (iteration(uid, 0, "claude-haiku-4-5-20251001", now, input_tokens=1000), 1000),
        # Sonnet 5.5's cache reads: $0.20 per Mtok before 2026-10-07, $0.10 from then on
        (
            iteration(uid, 1, "claude-sonnet-5-5", datetime(2026, 10, 6, tzinfo=UTC),
                      cache_read_input_tokens=10_000),
            2000,
        ),
        (iteration(uid, 2, "claude-sonnet-5-5", now, cache_read_input_tokens=10_000), 1000),
        # no entry: the fallback (the most expensive model, $75 per Mtok output), not free
        (iteration(uid, 3, "claude-nova-9", now, output_tokens=100), 7500),
    ]  # fmt: skip
    for event, _ in events:
        await budget.bus.publish(event)
    for event, cost in events:  # charged (so not dead-lettered), each at its price
        await until(lambda b=event.build_id, c=cost: _spent(deps, b, c))
    # (counted once in kiln_unpriced_iterations_total: tests/unit/test_budget_spending.py)
    assert await spending.spent_today(deps, f"u{uid}") == 1000 + 1000 + 7500


async def _spent(deps: Deps, build_id: str, cost: int) -> bool:
    return await spending.spent_build(deps, build_id) == cost
