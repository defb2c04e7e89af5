"""The budget service's settings (environment variables: ``KILN_`` + the field's name, or its
alias)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import AliasChoices, Field

from kiln_runtime.settings import CommonSettings


class BudgetSettings(CommonSettings):
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "KILN_REDIS_URL"),
    )
    redis_timeout_s: float = Field(default=5.0, gt=0)
    budget_workers: int = Field(default=8, ge=1, le=64)
    # Unset: UTC calendar days in UTC calendar months. Set (tests, the demo): an allowance period
    # ("day") of this many seconds, KILN_BUDGET_PERIODS_PER_CYCLE of them to a "month".
    budget_period_s: float | None = Field(default=None, gt=0)
    budget_periods_per_cycle: int = Field(default=30, ge=1, le=366)
    # Set (the demo): a fixed allowance per period instead of the tier's budget spread over the
    # days left, e.g. 0.001 so that one iteration puts the build to sleep.
    budget_demo_allowance_usd: Decimal | None = Field(default=None, ge=0)

    @property
    def demo_allowance_micro_usd(self) -> int | None:
        if self.budget_demo_allowance_usd is None:
            return None
        return int(self.budget_demo_allowance_usd * 1_000_000)
