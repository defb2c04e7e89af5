"""The caller's spend and allowance, read from the budget service's counters (a thin read)."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kiln_runtime.config import KilnConfig

from .model import Caller
from .ports import SpendReader


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
    source: str  # "budget": the budget service's own figure; "estimate": computed here
    sleeping_builds: list[str]


async def view(
    spend: SpendReader,
    config: KilnConfig,
    caller: Caller,
    now: datetime,
    sleeping: list[str] | None = None,
) -> BudgetView:
    """The budget service's allowance for the current period when it has one (it knows top-ups
    and the period's length); otherwise an estimate with UTC days: what is left of the month
    before today over the days left, today included (unspent budget rolls forward)."""
    status = await spend.status(caller.user_id)
    if status and datetime.fromisoformat(status["period_end"]) > now:
        tier = config.tier(status.get("tier") or caller.tier)
        allowance = int(status["allowance_micro_usd"])
        spent_period = int(status["spent_period_micro_usd"])
        return BudgetView(
            user_id=caller.user_id,
            tier=caller.tier,
            day=status["period"],
            month=status["cycle"],
            spent_today_micro_usd=spent_period,
            spent_month_micro_usd=int(status["spent_cycle_micro_usd"]),
            monthly_budget_micro_usd=int(status["monthly_budget_micro_usd"]),
            daily_allowance_micro_usd=allowance,
            remaining_today_micro_usd=max(0, allowance - spent_period),
            per_build_cap_micro_usd=tier.per_build_cap_micro_usd,
            concurrent_builds=tier.concurrent_builds,
            period_end=status["period_end"],
            topups_micro_usd=int(status.get("topups_cycle_micro_usd", 0)),
            source="budget",
            sleeping_builds=sleeping or [],
        )
    tier = config.tier(caller.tier)
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    today, this_month = await spend.spent(caller.user_id, day, month)
    monthly = tier.monthly_budget_micro_usd
    days_left = calendar.monthrange(now.year, now.month)[1] - now.day + 1
    before_today = max(0, this_month - today)
    allowance = max(0, monthly - before_today) // days_left
    return BudgetView(
        user_id=caller.user_id,
        tier=caller.tier,
        day=day,
        month=month,
        spent_today_micro_usd=today,
        spent_month_micro_usd=this_month,
        monthly_budget_micro_usd=monthly,
        daily_allowance_micro_usd=allowance,
        remaining_today_micro_usd=max(0, allowance - today),
        per_build_cap_micro_usd=tier.per_build_cap_micro_usd,
        concurrent_builds=tier.concurrent_builds,
        period_end=(
            datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        ).isoformat(),
        topups_micro_usd=0,
        source="estimate",
        sleeping_builds=sleeping or [],
    )
