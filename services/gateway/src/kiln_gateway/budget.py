"""The caller's spend and allowance: the budget service's answer, with the tier's limits."""

from __future__ import annotations

from dataclasses import dataclass

from kiln_runtime.config import KilnConfig

from .model import Caller
from .ports import Budget


@dataclass(frozen=True)
class BudgetView:
    user_id: str
    tier: str
    day: str
    month: str
    spent_today_micro_usd: int
    spent_month_micro_usd: int
    monthly_budget_micro_usd: int
    daily_allowance_micro_usd: int
    remaining_today_micro_usd: int
    per_build_cap_micro_usd: int
    concurrent_builds: int
    period_end: str
    topups_micro_usd: int
    source: str  # "budget": the budget service's own figure
    sleeping_builds: list[str]


async def view(
    budget: Budget, config: KilnConfig, caller: Caller, sleeping: list[str] | None = None
) -> BudgetView:
    """The budget service's allowance for the current period (it knows the spend, the top-ups
    and the period's length), with the per-build cap and concurrency of the tier it applies."""
    status = await budget.status(caller.user_id, caller.tier)
    tier = config.tier(status.tier)
    return BudgetView(
        user_id=caller.user_id,
        tier=status.tier,
        day=status.period,
        month=status.cycle,
        spent_today_micro_usd=status.spent_period_micro_usd,
        spent_month_micro_usd=status.spent_cycle_micro_usd,
        monthly_budget_micro_usd=status.monthly_budget_micro_usd,
        daily_allowance_micro_usd=status.allowance_micro_usd,
        remaining_today_micro_usd=status.remaining_micro_usd,
        per_build_cap_micro_usd=tier.per_build_cap_micro_usd,
        concurrent_builds=tier.concurrent_builds,
        period_end=status.period_end.isoformat(),
        topups_micro_usd=status.topups_cycle_micro_usd,
        source="budget",
        sleeping_builds=sleeping or [],
    )
