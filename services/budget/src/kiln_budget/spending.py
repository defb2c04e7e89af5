"""The budget's domain: price each iteration's token usage and charge it exactly once.

Plain async functions over the ports (no broker here). Amounts are integer micro-dollars.
"""

from __future__ import annotations

import calendar
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime

from kiln_contracts import (
    BuildCancelled,
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    IterationCompleted,
)
from kiln_runtime.config import KilnConfig
from kiln_runtime.errors import PermanentError

from .ports import Charge, Clock, SpendStore

log = logging.getLogger(__name__)

BuildEnded = BuildCompleted | BuildFailed | BuildCancelled


@dataclass(frozen=True)
class Deps:
    store: SpendStore
    clock: Clock
    config: KilnConfig


@dataclass(frozen=True)
class Charged:
    amount_micro_usd: int
    applied: bool  # False: this event was charged before (a redelivery or another replica)


def utc_day(moment: datetime) -> date:
    """The UTC calendar day of ``moment`` (a naive datetime is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).date()


def cost_of(config: KilnConfig, event: IterationCompleted) -> int:
    """Micro-dollars for the iteration's usage at the model's prices; unknown model: permanent."""
    try:
        price = config.price(event.model)
    except KeyError as err:
        raise PermanentError(
            f"cannot price iteration {event.iteration}: no price for model {event.model!r} "
            f"(known: {', '.join(sorted(config.prices))})"
        ) from err
    return price.cost_micro_usd(event.usage)


async def charge_iteration(deps: Deps, event: IterationCompleted) -> Charged:
    """Charge the user (day and month of the event's UTC time) and the build, once per event."""
    amount = cost_of(deps.config, event)
    applied = await deps.store.charge(
        Charge(
            event_id=event.event_id,
            user_id=event.user_id,
            build_id=event.build_id,
            day=utc_day(event.occurred_at),
            amount_micro_usd=amount,
        )
    )
    extra = {"build_id": event.build_id, "event_id": event.event_id, "iteration": event.iteration}
    if applied:
        log.info("charged %d micro-USD to %s", amount, event.user_id, extra=extra)
    else:
        log.info("iteration already charged; nothing to do", extra=extra)
    return Charged(amount, applied)


async def build_started(deps: Deps, event: BuildRequested) -> None:
    await deps.store.build_started(event.user_id, event.build_id)
    await deps.store.set_tier(event.user_id, event.tier)


async def build_ended(deps: Deps, event: BuildEnded) -> None:
    await deps.store.build_ended(event.user_id, event.build_id)


# ------------------------------------------------------------------------------ reads


async def spent_today(deps: Deps, user_id: str) -> int:
    return await deps.store.user_day(user_id, utc_day(deps.clock.now()))


async def spent_this_month(deps: Deps, user_id: str) -> int:
    today = utc_day(deps.clock.now())
    return await deps.store.user_month(user_id, today.year, today.month)


async def spent_build(deps: Deps, build_id: str) -> int:
    return await deps.store.build(build_id)


async def running_builds(deps: Deps, user_id: str) -> set[str]:
    return await deps.store.running(user_id)


# ------------------------------------------------------------------------------ allowance


@dataclass(frozen=True)
class Allowance:
    """A user's daily allowance: what is left of the month's budget over the days left in it."""

    tier: str
    monthly_budget_micro_usd: int
    spent_month_micro_usd: int
    spent_today_micro_usd: int
    allowance_today_micro_usd: int

    @property
    def remaining_today_micro_usd(self) -> int:
        return max(0, self.allowance_today_micro_usd - self.spent_today_micro_usd)

    @property
    def exhausted(self) -> bool:
        return self.spent_today_micro_usd >= self.allowance_today_micro_usd


def daily_allowance(monthly_budget: int, spent_before_today: int, today: date) -> int:
    """Today's allowance: the budget left at the start of today over the days left (today too).

    Unspent allowance rolls forward: a quiet day raises every later day's allowance.
    """
    days_in_month = calendar.monthrange(today.year, today.month)[1]
    days_left = days_in_month - today.day + 1
    return max(0, monthly_budget - spent_before_today) // days_left


async def allowance(deps: Deps, user_id: str, tier: str | None = None) -> Allowance:
    """The user's allowance today (the tier last seen in their BuildRequested, else ``free``)."""
    today = utc_day(deps.clock.now())
    tier_name = tier or await deps.store.tier(user_id) or "free"
    monthly = deps.config.tier(tier_name).monthly_budget_micro_usd
    spent_month = await deps.store.user_month(user_id, today.year, today.month)
    spent_today = await deps.store.user_day(user_id, today)
    return Allowance(
        tier=tier_name,
        monthly_budget_micro_usd=monthly,
        spent_month_micro_usd=spent_month,
        spent_today_micro_usd=spent_today,
        allowance_today_micro_usd=daily_allowance(monthly, spent_month - spent_today, today),
    )
