"""The caller's spend and allowance, read from the budget service's counters (a thin read)."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime

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


async def view(spend: SpendReader, config: KilnConfig, caller: Caller, now: datetime) -> BudgetView:
    """The day's allowance is what is left of the month (before today) over the days left,
    today included: unspent budget rolls forward."""
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
    )
